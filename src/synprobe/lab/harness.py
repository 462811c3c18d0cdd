"""Running the project's own commands in a lab: a broker on the broker host, a punch on
each NATed host, their results."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from simulsyn_core._internal.exitcodes import ExitStatus, ToolError

from .netns import Lab
from .profiles import BROKER_IPS, BROKER_IPS6, BROKER_PORT

SYNPROBE = [sys.executable, "-m", "synprobe"]
# A broker with --probe imports scapy first (over a second alone, several on a loaded
# 2-core machine running four test workers): this is a bound, not the usual wait.
BROKER_READY_TIMEOUT_S = 20.0


def wait_for_listen(lab: Lab, node: str, ip: str, port: int, timeout_s: float,
                    proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait (bounded) until a TCP socket listens on ip:port inside node; with ``proc``,
    fail at once if that process ends first."""
    end = time.monotonic() + timeout_s
    needle = f"{ip}:{port}"
    while time.monotonic() < end:
        out = lab.run(node, ["ss", "-Htln"], check=False).stdout
        if needle in out:
            return
        if proc is not None and proc.poll() is not None:
            raise ToolError(ExitStatus.ERROR, f"lab: the process meant to listen on {needle} "
                                              f"in {node} exited with {proc.returncode}")
        time.sleep(0.05)
    raise ToolError(ExitStatus.ERROR, f"lab: nothing listens on {needle} in {node} after "
                                      f"{timeout_s:.0f} s")


def start_broker(lab: Lab, extra: Sequence[str] = (), port: int = BROKER_PORT,
                 stderr: object = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    binds: list[str] = []
    for ip in BROKER_IPS:
        binds += ["--bind", f"{ip}:{port}"]
    for ip in BROKER_IPS6 if lab.v6 else ():  # and its IPv6 addresses in an IPv6 lab
        binds += ["--bind", f"[{ip}]:{port}"]
    proc = lab.popen("br", [*SYNPROBE, "broker", *binds, *extra], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=stderr)
    wait_for_listen(lab, "br", BROKER_IPS[0], port, BROKER_READY_TIMEOUT_S, proc)
    if lab.v6:
        wait_for_listen(lab, "br", f"[{BROKER_IPS6[0]}]", port, BROKER_READY_TIMEOUT_S, proc)
    return proc


@dataclass
class PeerRun:
    side: str
    returncode: int | None
    stdout: str
    stderr: str
    elapsed_s: float = 0.0  # from its start (imports done, see punch_pair) to its exit

    @property
    def report(self) -> dict[str, object] | None:
        """The --json object, if there is one: the first stdout line, or the last (a
        relayed chat that may move prints it when it ends)."""
        return self._json_at()[1]

    def _json_at(self) -> tuple[int | None, dict[str, object] | None]:
        lines = self.stdout.splitlines()
        for index in (0, len(lines) - 1) if lines else ():
            try:
                value = json.loads(lines[index])
            except ValueError:
                continue
            if isinstance(value, dict) and "established" in value:
                return index, value
        return None, None

    @property
    def chat_lines(self) -> list[str]:
        lines = self.stdout.splitlines()
        index = self._json_at()[0]
        return lines if index is None else lines[:index] + lines[index + 1:]


# A peer of punch_pair imports everything first, says so on fd W, and runs only once a
# byte comes on fd R: --timeout covers waiting for the peer, and an interpreter that
# starts slowly on a loaded machine must not eat into it.
_GATED = ("import os, sys\nfrom synprobe.cli import main\nimport simulsyn_core._internal.session\n"
          "r, w = int(sys.argv[1]), int(sys.argv[2])\nos.write(w, b'r')\nos.close(w)\n"
          "os.read(r, 1)\nsys.exit(main(sys.argv[3:]))")
GATE_TIMEOUT_S = 30.0


def punch_pair(lab: Lab, session: str, *, messages: tuple[str, str] = ("", ""),
               args: Sequence[str] = (), first: str = "a", stagger_s: float = 0.3,
               timeout_s: float = 30.0, broker: str | None = None,
               side_args: dict[str, Sequence[str]] | None = None,
               side_env: dict[str, dict[str, str]] | None = None,
               streams: tuple[Sequence[str], Sequence[str]] | None = None,
               every_s: float = 0.1) -> tuple[PeerRun, PeerRun]:
    """Run `synprobe punch` on hA and hB at once; returns (A's run, B's run).
    ``args`` go to both, ``side_args["a"]``/``["b"]`` to one side only; ``side_env``:
    environment variables added for one side (its own SYNPROBE_STATE_DIR, say).
    ``streams``: instead of ``messages``, lines written to each side's stdin one every
    ``every_s`` seconds from its start (then stdin is closed).

    Both are started and their imports done before either runs; then ``first`` runs
    ``stagger_s`` before the other, so the order of start is known.
    """
    # An empty state directory unless one is given: no punch in the lab reads the user's
    # last nat-check (the lab's public addresses are the same in every lab).
    with tempfile.TemporaryDirectory(prefix="synprobe-lab-state-") as state:
        env = {side: {"SYNPROBE_STATE_DIR": state, **(side_env or {}).get(side, {})}
               for side in "ab"}
        return _punch_pair(lab, session, messages, args, first, stagger_s, timeout_s,
                           broker, side_args, env, streams, every_s)


def _punch_pair(lab: Lab, session: str, messages: tuple[str, str], args: Sequence[str],
                first: str, stagger_s: float, timeout_s: float, broker: str | None,
                side_args: dict[str, Sequence[str]] | None,
                side_env: dict[str, dict[str, str]],
                streams: tuple[Sequence[str], Sequence[str]] | None = None,
                every_s: float = 0.1) -> tuple[PeerRun, PeerRun]:
    target = broker or f"{BROKER_IPS[0]}:{BROKER_PORT}"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    gates: dict[str, int] = {}
    started: dict[str, float] = {}
    order = [first, "b" if first == "a" else "a"]
    try:
        for side in order:
            go_r, go_w = os.pipe()
            ready_r, ready_w = os.pipe()
            procs[side] = lab.popen("h" + side, [
                sys.executable, "-c", _GATED, str(go_r), str(ready_w), "punch", "--broker",
                target, "--session", session, "--json", "--timeout", str(timeout_s), *args,
                *(side_args or {}).get(side, ())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(go_r, ready_w), env={**os.environ, **side_env[side]})
            os.close(go_r)
            os.close(ready_w)
            gates[side] = go_w
            ready = select.select([ready_r], [], [], GATE_TIMEOUT_S)[0]
            ok = bool(ready) and os.read(ready_r, 1) == b"r"
            os.close(ready_r)
            if not ok:
                raise ToolError(ExitStatus.ERROR, f"lab: the punch on h{side} did not start")
        for i, side in enumerate(order):
            if i:
                time.sleep(stagger_s)
            started[side] = time.monotonic()
            os.write(gates[side], b"g")
    except BaseException:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        raise
    finally:
        for fd in gates.values():
            os.close(fd)
    results: dict[str, PeerRun] = {}
    inputs = {"a": messages[0], "b": messages[1]}
    # Feed each side its message and close stdin; collect both (bounded).
    def finish(side: str) -> PeerRun:
        proc = procs[side]
        stream = streams[0 if side == "a" else 1] if streams is not None else None
        limit = timeout_s + 15 + (len(stream) * every_s if stream is not None else 0.0)
        try:
            if stream is not None:
                _write_slowly(proc, stream, every_s)
            out, err = proc.communicate(None if stream is not None else inputs[side].encode(),
                                        timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=5)
        return PeerRun(side, proc.returncode, out.decode(errors="replace"),
                       err.decode(errors="replace"), time.monotonic() - started[side])

    pool = ThreadPoolExecutor(2)
    try:
        for side, run in zip(order, pool.map(finish, order), strict=True):
            results[side] = run
    except BaseException:
        # Ctrl-C/SIGTERM: stop the peers first, or the pool would wait for them.
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        raise
    finally:
        pool.shutdown(wait=True)
    return results["a"], results["b"]


def _write_slowly(proc: subprocess.Popen[bytes], lines: Sequence[str], every_s: float) -> None:
    """Write ``lines`` to ``proc``'s stdin one every ``every_s`` seconds, then close it
    (a peer that exits early ends the writing). Its output is read afterwards: it must
    stay under the pipes' 64 KiB meanwhile."""
    assert proc.stdin is not None
    try:
        for line in lines:
            if proc.poll() is not None:
                break
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
            time.sleep(every_s)
    except BrokenPipeError:
        pass
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        proc.stdin = None
