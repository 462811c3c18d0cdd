"""The public API between two NATed hosts of the lab (issue 15): examples/send_file.py
moves 20 MB through ``simulsyn_core.connect`` and through ``simulsyn_core.aio.connect``;
a cancelled ``aio.connect`` in the middle of its punch leaves no socket open (/proc)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from synprobe import lab as labmod
from synprobe.lab.harness import BROKER_IPS, BROKER_PORT, SYNPROBE
from tests.helpers import communicate_within

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "send_file.py"
BROKER = f"{BROKER_IPS[0]}:{BROKER_PORT}"
SIZE = 20 * 1024 * 1024
RELAY_SIZE = 2 * 1024 * 1024
CODE_WAIT_S = 15.0
RUN_LIMIT_S = 120.0


def _read_code(proc: subprocess.Popen[bytes]) -> str:
    """The code the sender prints on stdout (``code: N-word-word``), within CODE_WAIT_S."""
    assert proc.stdout is not None
    seen = b""
    end = time.monotonic() + CODE_WAIT_S
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            seen += chunk
            m = re.search(rb"code: (\S+)\n", seen)
            if m:
                return m.group(1).decode()
            if not chunk:
                break
    raise AssertionError(f"the sender printed no code: {seen!r}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _results(procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, Any]:
    """Each side's program ended with exit 0 and printed one JSON object: those objects."""
    out = {}
    for side, proc in procs.items():
        stdout, stderr = communicate_within(proc, RUN_LIMIT_S)
        assert proc.returncode == 0 and stdout.strip(), stderr.decode(errors="replace")
        out[side] = json.loads(stdout)
    return out


def _finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    _, err = communicate_within(proc, RUN_LIMIT_S)
    return proc.returncode, err.decode(errors="replace")


@pytest.mark.lab
@pytest.mark.parametrize("variant", ["blocking", "aio"])
def test_the_example_sends_20_mb_between_two_nated_hosts(make_lab, tmp_path: Path,
                                                         variant: str) -> None:
    lab = make_lab("home", "home")
    labmod.start_broker(lab)  # no --relay: the file must go over the punched connection
    _send_file(lab, tmp_path, ["--aio"] if variant == "aio" else [], SIZE, "direct")


@pytest.mark.lab
def test_the_example_sends_through_the_relay_when_the_punch_fails(make_lab,
                                                                  tmp_path: Path) -> None:
    # Both NATs drop every inbound SYN: no punch connects; the broker relays (its default
    # limits: 1 MB/s per session, hence a smaller file).
    lab = make_lab("syn-drop-all", "syn-drop-all")
    labmod.start_broker(lab, ["--relay"])
    _send_file(lab, tmp_path, [], RELAY_SIZE, "relay")


def _send_file(lab: labmod.Lab, tmp_path: Path, flags: list[str], size: int,
               path: str) -> None:
    """examples/send_file.py from host A to host B: both exit 0, over ``path``, and the
    received file is the sent one."""
    source = tmp_path / "payload.bin"
    source.write_bytes(os.urandom(size))
    out = tmp_path / "received"
    out.mkdir()
    sender = lab.popen("ha", [sys.executable, str(EXAMPLE), *flags, "send", "--broker",
                              BROKER, str(source)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    receiver = None
    try:
        code = _read_code(sender)
        receiver = lab.popen("hb", [sys.executable, str(EXAMPLE), *flags, "receive",
                                    "--broker", BROKER, "--code", code, "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        rc_r, err_r = _finish(receiver)
        rc_s, err_s = _finish(sender)
    finally:
        for proc in (sender, receiver):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert rc_r == 0, err_r
    assert rc_s == 0, err_s
    assert f"connected ({path})" in err_s and f"connected ({path})" in err_r
    assert "sha256 matches" in err_r and "receiver says: ok" in err_s
    assert "100.0%" in err_s and "100.0%" in err_r  # the progress bars
    received = out / source.name
    assert received.stat().st_size == size
    assert _sha256(received) == _sha256(source)


CANCEL_SCRIPT = """
import asyncio, json, os, sys, threading
from simulsyn_core import aio

def sockets():
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found

async def main():
    before = sockets()
    punching = asyncio.Event()
    events = []

    def on_event(text):
        events.append(text)
        if text.startswith("peer "):  # the punch starts at once (strategy plain)
            punching.set()

    task = asyncio.create_task(aio.connect(sys.argv[1], "cancel-me", strategy="plain",
                                           relay="never", timeout=40, on_event=on_event))
    await asyncio.wait_for(punching.wait(), 30)
    await asyncio.sleep(1.5)
    during = sockets() - before
    started = asyncio.get_running_loop().time()
    task.cancel()
    try:
        await task
        outcome = "returned"
    except asyncio.CancelledError:
        outcome = "cancelled"
    except BaseException as exc:
        outcome = repr(exc)
    took = asyncio.get_running_loop().time() - started
    print(json.dumps({"outcome": outcome, "took_s": took, "during": sorted(during),
                      "after": sorted(sockets() - before), "events": events,
                      "workers": [t.name for t in threading.enumerate()
                                  if t.name == "simulsyn-connect"]}))

asyncio.run(main())
"""


@pytest.mark.lab
def test_cancelling_aio_connect_mid_punch_leaves_no_socket(make_lab) -> None:
    # Both NATs drop every inbound SYN: A's punch goes on until it is cancelled.
    lab = make_lab("syn-drop-all", "syn-drop-all")
    labmod.start_broker(lab)
    peer = lab.popen("hb", [*SYNPROBE, "punch", "--broker", BROKER, "--session", "cancel-me",
                            "--strategy", "plain", "--relay", "never", "--timeout", "40",
                            "--no-chat"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    try:
        run = lab.run("ha", [sys.executable, "-c", CANCEL_SCRIPT, BROKER], timeout=RUN_LIMIT_S)
    finally:
        if peer.poll() is None:
            peer.kill()
        peer.wait(10)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps({k: result[k] for k in ("outcome", "took_s", "during", "after")}))
    assert result["outcome"] == "cancelled", json.dumps(result)
    assert result["during"], f"no socket open mid-punch: not cancelled mid-punch {result}"
    assert result["after"] == [], result
    assert result["workers"] == [], result
    assert result["took_s"] < 6.0, result


_PEER_SIDE = r"""
import json, sys
import simulsyn_core
peer, port = sys.argv[1], int(sys.argv[2])
seen = []
try:
    with simulsyn_core.connect(peer=peer, local_port=port, secret="shared words",
                               timeout=20, on_local_port=seen.append,
                               tuning=simulsyn_core.Tuning(retry_interval=0.2)) as c:
        c.sendall(f"from {port}".encode())
        c.shutdown_write()
        got = b""
        while chunk := c.recv():
            got += chunk
        print(json.dumps({"got": got.decode(), "mode": c.report.mode, "path": c.path,
                          "verifier": c.verifier, "seen": seen,
                          "authenticated": c.report.security["authenticated"]}))
except simulsyn_core.SimulsynError as exc:
    print(json.dumps({"error": exc.message}))
"""


@pytest.mark.lab
def test_peer_mode_connects_two_known_endpoints_without_a_broker(make_lab) -> None:
    """connect(peer=, local_port=): endpoints learnt some other way (home NATs keep the
    port: the public endpoint is the NAT's address and our port), a shared secret, no
    broker: the same as `synprobe punch --peer --local-port --secret`."""
    lab = make_lab("home", "home")
    ports = {"a": 41001, "b": 42002}
    procs = {side: lab.popen("h" + side, [sys.executable, "-c", _PEER_SIDE,
                                          f"{lab.side(other).public}:{ports[other]}",
                                          str(ports[side])],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for side, other in (("a", "b"), ("b", "a"))}
    out = _results(procs)
    assert out["a"].get("got") == "from 42002" and out["b"].get("got") == "from 41001", out
    for side in "ab":
        assert out[side]["mode"] == "direct" and out[side]["path"] == "direct", out
        assert out[side]["seen"] == [ports[side]] and out[side]["authenticated"], out
    assert out["a"]["verifier"] == out["b"]["verifier"] is not None


_MOVING_SIDE = r"""
import hashlib, json, sys, threading, time
import simulsyn_core
broker, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
events = []
with simulsyn_core.connect(broker, "moving-lib", secret="shared words", timeout=30,
                           on_event=events.append) as c:
    paths = [c.path]
    sent = hashlib.sha256()
    got = hashlib.sha256()
    count = [0]

    def reader():
        while chunk := c.recv():
            got.update(chunk)
            count[0] += len(chunk)

    t = threading.Thread(target=reader)
    t.start()
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        block = f"{name} {i:06d} ".encode() * 512  # 6 kB, 10 a second
        c.sendall(block)
        sent.update(block)
        i += 1
        if c.path != paths[-1]:
            paths.append(c.path)
        time.sleep(0.1)
    c.shutdown_write()
    t.join(30)
    print(json.dumps({"sent": sent.hexdigest(), "got": got.hexdigest(), "bytes": count[0],
                      "paths": paths, "path": c.path, "report": c.report.to_json(),
                      "moved": [e for e in events if "moved to the direct" in e]}))
"""
BLOCK_S = 9.0  # A's SYNs towards B dropped at A's NAT this long: the first punch fails


@pytest.mark.lab
def test_a_relayed_connection_moves_to_direct_mid_stream(make_lab) -> None:
    """connect() whose punch fails starts on the relay (path "relay") and, when a later
    punch succeeds, the same Connection moves to direct (path "direct"): each side reads
    exactly the bytes the other wrote (SHA-256), written before, during and after the
    move (the CLI's chat does the same: tests/test_lab_relay.py)."""
    lab = make_lab("home", "home")
    labmod.start_broker(lab, ["--relay"])
    rule = ["-p", "tcp", "--syn", "-s", lab.side("a").host, "-d", lab.side("b").public,
            "-j", "DROP"]
    added = lab.run("ga", ["iptables", "-I", "FORWARD", *rule])
    assert added.returncode == 0, added.stderr
    try:
        procs = {side: lab.popen("h" + side, [sys.executable, "-c", _MOVING_SIDE, BROKER,
                                              side.upper(), "16"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for side in "ab"}
        time.sleep(BLOCK_S)
    finally:
        lab.run("ga", ["iptables", "-D", "FORWARD", *rule])
    out = _results(procs)
    diag = json.dumps(out, indent=1)[:6000]
    assert out["a"]["got"] == out["b"]["sent"] and out["b"]["got"] == out["a"]["sent"], diag
    for side in "ab":
        assert out[side]["paths"] == ["relay", "direct"], diag
        assert out[side]["path"] == "direct" and out[side]["moved"], diag
        report = out[side]["report"]
        assert report["path"] == "direct" and report["upgraded_after_s"] > 0, diag
