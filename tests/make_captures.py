"""Record each TCP opening scenario in the NAT lab with tcpdump at several points.

Run as root to regenerate captures/ (python tests/make_captures.py [--out captures]);
the live tests (test_analyze_lab.py) import the same scenarios and record them afresh.

Each scenario is two plain sockets (or one) whose connect() calls start at set times,
and NAT profiles chosen so that the first SYN is dropped, rejected or crosses the other.
tcpdump runs inside the namespaces at the host, at its NAT's inside (lan) and public
(wan) side, and on the NAT with -i any (inside and outside at once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from simulsyn_core._internal.signals import sigterm_as_interrupt
from synprobe import lab as labmod

TCPDUMP_READY_S = 5.0
TCPDUMP_STOP_S = 3.0
SETTLE_S = 0.2  # after the last packet, before tcpdump stops
PORT = 40100  # every scenario binds this port on both hosts (NATs preserve it)
LISTEN_PORT = 7001
PEERS_START_S = 1.0  # the peers' Python starts well within this, even on a busy machine
HOLD_RATE_BIT = 8000  # the router's rate while it holds packets (simultaneous open)

# name -> (node, interface); "any" captures a NAT's inside and outside at once.
POINTS: dict[str, tuple[str, str]] = {
    "ha": ("ha", "eth0"), "ga-lan": ("ga", "lan"), "ga-wan": ("ga", "wan"),
    "ga-any": ("ga", "any"), "gb-wan": ("gb", "wan"), "hb": ("hb", "eth0"),
}

# One side of a scenario, run inside a host namespace. Prints one JSON line.
PEER = r"""
import json, socket, sys, time
mode, local, remote, start_at, timeout = sys.argv[1:6]
lip, lport = local.rsplit(":", 1)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((lip, int(lport)))
out = {"mode": mode}
if mode == "listen":
    s.listen(1)
    s.settimeout(float(timeout))
    print(json.dumps({"listening": True}), flush=True)
    try:
        conn, _ = s.accept()
        conn.settimeout(2.0)
        conn.sendall(b"hello\n")
        conn.recv(64)
        conn.close()
        out["accepted"] = True
    except OSError as exc:
        out["error"] = str(exc)
else:
    rip, rport = remote.rsplit(":", 1)
    time.sleep(max(0.0, float(start_at) - time.time()))
    s.settimeout(float(timeout))
    t = time.time()
    try:
        s.connect((rip, int(rport)))
        out["connected"] = True
        s.sendall(b"hi\n")
        s.settimeout(2.0)
        s.recv(64)
    except OSError as exc:
        out["error"] = type(exc).__name__ + ": " + str(exc)
    out["connect_at"] = t
s.close()
print(json.dumps(out), flush=True)
"""


@dataclass(frozen=True)
class Connect:
    side: str  # "a" or "b"
    at_s: float  # seconds after the scenario's start
    timeout_s: float = 3.0


@dataclass(frozen=True)
class Scenario:
    name: str  # also the reference file's stem in captures/
    profile_a: str
    profile_b: str
    connects: tuple[Connect, ...]
    expect: dict[str, str]  # capture point -> kind analyze must report there
    reference: str  # the point whose capture goes into captures/ as NAME.pcap
    readme: str | None = None  # which drawing of the original README it reproduces
    listener: bool = False  # the broker host listens; A connects to it
    hold_s: float = 0.0  # the router holds the SYNs this long, so that they cross
    made: str = ""  # one line for captures/README.md
    points: tuple[str, ...] = field(default=())
    extra: dict[str, str] = field(default_factory=dict)  # point -> another file to keep

    @property
    def capture_points(self) -> tuple[str, ...]:
        return self.points or tuple(self.expect)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("three-way", "home", "home", (Connect("a", 0.1),),
             {p: "three-way" for p in ("ha", "ga-lan", "ga-wan", "ga-any")},
             "ha", readme="three-way", listener=True,
             made="host A connect()s to a listening socket on the broker host (192.0.2.10)"),
    Scenario("simultaneous-open", "home", "home", (Connect("a", 0.1), Connect("b", 0.12)),
             {p: "simultaneous-open" for p in ("ha", "ga-lan", "ga-wan", "ga-any", "gb-wan",
                                               "hb")},
             "ha", readme="simultaneous-open", hold_s=0.6,
             made="A and B connect() to each other 20 ms apart while the router between the "
                  "NATs holds packets for 0.6 s (an htb class in debt): each SYN passes its "
                  "own NAT before the other's arrives there, so both SYNs, then both SYN+ACKs, "
                  "cross in flight"),
    Scenario("syn-dropped", "home", "home", (Connect("a", 0.1), Connect("b", 0.4)),
             {"ha": "syn-dropped", "ga-lan": "syn-dropped", "ga-wan": "syn-dropped",
              "ga-any": "syn-dropped", "gb-wan": "syn-dropped", "hb": "three-way"},
             "ha", readme="syn-dropped", extra={"ga-any": "syn-dropped.nat-any.pcap"},
             made="A connect()s first: B's NAT (home) drops A's SYN silently; B connect()s "
                  "300 ms later, its SYN passes A's NAT as a reply, A answers SYN+ACK. At "
                  "host B it looks like a plain three-way handshake"),
    Scenario("syn-rejected", "original", "original", (Connect("a", 0.1), Connect("b", 0.4)),
             {"ha": "syn-rejected", "ga-lan": "syn-rejected", "ga-wan": "syn-rejected",
              "ga-any": "syn-rejected", "gb-wan": "syn-rejected", "hb": "syn-rejected"},
             "ga-wan", readme="syn-rejected",
             made="both NATs use the original README's rules: nothing protects their own "
                  "ports, so each NAT's kernel answers the other side's SYN with RST; A "
                  "connect()s first, B 300 ms later"),
    Scenario("icmp-rejected", "home", "reject-icmp-port", (Connect("a", 0.1),),
             {"ha": "syn-rejected", "ga-lan": "syn-rejected", "ga-wan": "syn-rejected",
              "ga-any": "syn-rejected", "gb-wan": "syn-rejected"},
             "ha",
             made="A connect()s to B's public address; B's NAT rejects unsolicited TCP with "
                  "ICMP port-unreachable, which ends A's connect() (ECONNREFUSED)"),
    Scenario("incomplete", "home", "home", (Connect("a", 0.1, timeout_s=2.5),),
             {p: "incomplete" for p in ("ha", "ga-lan", "ga-wan", "ga-any", "gb-wan")},
             "ha",
             made="A connect()s to B's public address and B does nothing: B's NAT drops the "
                  "SYN and its retransmissions (1 s, 3 s) until connect() times out at 2.5 s"),
]}


ON_TIME_S = 0.05  # a connect() or the router's hold this late: the scenario did not happen


@dataclass
class Recording:
    scenario: Scenario
    files: dict[str, Path]  # capture point -> pcap
    peers: list[dict[str, object]]
    start: float = 0.0  # Unix time the scenario's clock starts (at_s counts from it)
    hold_at: float | None = None  # Unix time the router began to hold packets

    def timing_problems(self) -> list[str]:
        """Why the scenario did not happen as planned (a process acted late), told by the
        processes' own clocks, not by analyze: empty when it did."""
        problems = []
        for connect, peer in zip(self.scenario.connects, self.peers, strict=False):
            try:
                at = float(json.loads(str(peer["result"]))["connect_at"])
            except (ValueError, KeyError, TypeError):
                problems.append(f"host {connect.side}: no connect time ({peer})")
                continue
            late = at - (self.start + connect.at_s)
            if late > ON_TIME_S:
                problems.append(f"host {connect.side} connect()ed {late * 1000:.0f} ms late")
        if self.scenario.hold_s:
            if self.hold_at is None:
                problems.append("the router's hold never started")
            elif self.hold_at - self.start > ON_TIME_S:
                problems.append(f"the router's hold started "
                                f"{(self.hold_at - self.start) * 1000:.0f} ms late")
        return problems


def require_tools() -> None:
    missing = [t for t in ("tcpdump", "tc", "ip") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"recording the scenarios needs {', '.join(missing)}: install "
                           "tcpdump and iproute2")


@contextlib.contextmanager
def tcpdump(lab: labmod.Lab, point: str, path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """tcpdump at one capture point, running before this yields; stopped on every exit."""
    node, iface = POINTS[point]
    # --immediate-mode: without it libpcap hands packets over in ring-buffer blocks, and
    # what sits in the last block when tcpdump is stopped never reaches the file.
    proc = lab.popen(node, ["tcpdump", "--immediate-mode", "-i", iface, "-n", "-U", "-Z", "root",
                            "-w", str(path), "tcp or icmp"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_listening(proc, point)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(TCPDUMP_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(TCPDUMP_STOP_S)
        if proc.stderr is not None:
            proc.stderr.close()


def _wait_listening(proc: subprocess.Popen[bytes], point: str) -> None:
    """tcpdump prints "listening on IFACE" once its capture is open."""
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    seen = b""
    end = time.monotonic() + TCPDUMP_READY_S
    while time.monotonic() < end:
        chunk = proc.stderr.read(4096) or b""
        seen += chunk
        if b"listening on" in seen:
            return
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise RuntimeError(f"tcpdump at {point} did not start: {seen.decode(errors='replace')}")


def _hold_router(lab: labmod.Lab, hold_s: float, at: float) -> subprocess.Popen[bytes]:
    """Make the router hold the packets on both its links from Unix time ``at`` for
    ``hold_s``, then release them together: the kernel here has neither netem nor plug, so
    an htb class (which lets a packet through on credit, then makes the next wait until
    the debt is paid) is put into debt by one blocker datagram per link, sent at ``at`` by
    the process returned."""
    lab.run("rt", ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
    for iface in ("wa", "wb"):
        for cmd in (["tc", "qdisc", "add", "dev", iface, "root", "handle", "1:", "htb",
                     "default", "10", "r2q", "1"],
                    ["tc", "class", "add", "dev", iface, "parent", "1:", "classid", "1:10",
                     "htb", "rate", f"{HOLD_RATE_BIT // 1000}kbit", "burst", "1", "cburst", "1",
                     "quantum", "1500"]):
            proc = lab.run("rt", cmd)
            if proc.returncode != 0:
                raise RuntimeError(f"tc in the lab failed: {proc.stderr.strip()}")
    size = int(hold_s * HOLD_RATE_BIT / 8) - 42  # minus Ethernet, IP and UDP headers
    targets = ", ".join(f"('{lab.side(s).gateway_wan}', 9)" for s in ("a", "b"))
    return lab.popen("rt", [sys.executable, "-c", "import socket, time\n"
                            f"time.sleep(max(0.0, {at} - time.time()))\n"
                            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                            f"for t in ({targets},): s.sendto(bytes({size}), t)\n"
                            "print(time.time())"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _warm_neighbours(lab: labmod.Lab) -> None:
    """Resolve every lab link's ARP entries first, so no ARP waits in a scenario."""
    for node, target in (("ha", "203.0.113.2"), ("hb", "198.51.100.2"), ("ha", "192.0.2.10"),
                         ("hb", "192.0.2.10")):
        lab.run(node, [sys.executable, "-c",
                       "import socket; s=socket.socket(); s.settimeout(0.3); "
                       f"s.connect_ex(('{target}', 9)); s.close()"], timeout=5)


def record(lab: labmod.Lab, scenario: Scenario, out_dir: Path) -> Recording:
    """Run one scenario in a lab that is up (profiles as the scenario says)."""
    require_tools()
    a, b = lab.side("a"), lab.side("b")
    _warm_neighbours(lab)
    files = {p: out_dir / f"{scenario.name}.{p}.pcap" for p in scenario.capture_points}
    remote = {"a": f"{b.public}:{PORT}", "b": f"{a.public}:{PORT}"}
    if scenario.listener:
        remote["a"] = f"{labmod.BROKER_IPS[0]}:{LISTEN_PORT}"
    peers: list[dict[str, object]] = []
    with contextlib.ExitStack() as stack:
        for point, path in files.items():
            stack.enter_context(tcpdump(lab, point, path))
        listener = None
        if scenario.listener:
            listener = lab.popen("br", [sys.executable, "-c", PEER, "listen",
                                        f"{labmod.BROKER_IPS[0]}:{LISTEN_PORT}", "-", "0",
                                        "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            labmod.wait_for_listen(lab, "br", labmod.BROKER_IPS[0], LISTEN_PORT, 5.0)
        start = time.time() + PEERS_START_S
        blocker = _hold_router(lab, scenario.hold_s, start) if scenario.hold_s else None
        procs = [lab.popen("h" + c.side, [sys.executable, "-c", PEER, "connect",
                                          f"0.0.0.0:{PORT}", remote[c.side],
                                          str(start + c.at_s), str(c.timeout_s)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for c in scenario.connects]
        for proc, connect in zip(procs, scenario.connects, strict=True):
            out, err = _finish(proc, connect.timeout_s + 5)
            peers.append({"side": connect.side, "result": out, "stderr": err})
        if listener is not None:
            out, err = _finish(listener, 6)
            peers.append({"side": "listener", "result": out, "stderr": err})
        hold_at = None
        if blocker is not None:
            out, err = _finish(blocker, 5)
            if blocker.returncode != 0:
                raise RuntimeError(f"blocker datagrams failed: {err}")
            hold_at = float(out)
        time.sleep(SETTLE_S)
    return Recording(scenario, files, peers, start, hold_at)


def _finish(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[str, str]:
    return _finish_with(proc, b"", timeout_s)


def record_in_new_lab(scenario: Scenario, out_dir: Path, lab_id: str) -> Recording:
    lab = labmod.Lab(scenario.profile_a, scenario.profile_b, lab_id=lab_id)
    with sigterm_as_interrupt(), lab:
        return record(lab, scenario, out_dir)


def record_punch(lab: labmod.Lab, out_dir: Path, session: str = "ref", name: str = "punch",
                 strategy: str = "plain") -> dict[str, Path]:
    """`synprobe punch --pcap` on both hosts (A registers first) through a lab that is up;
    -> side: the pcapng it wrote."""
    from concurrent.futures import ThreadPoolExecutor

    labmod.start_broker(lab)
    files = {side: out_dir / f"{name}.{side}.pcapng" for side in ("a", "b")}
    procs = {}
    for side in ("a", "b"):
        procs[side] = lab.popen("h" + side, [
            *labmod.SYNPROBE, "punch", "--broker", f"{labmod.BROKER_IPS[0]}:8086",
            "--session", session, "--timeout", "15", "--pcap", str(files[side]),
            "--strategy", strategy],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # not into the user's own state: `synprobe report` would bundle these
            env={**os.environ, "SYNPROBE_STATE_DIR": str(out_dir / "state")})
        time.sleep(0.3)

    def finish(side: str) -> tuple[str, str]:
        return _finish_with(procs[side], f"hello from {side.upper()}\n".encode(), 30)

    with ThreadPoolExecutor(2) as pool:
        outcomes = dict(zip(procs, pool.map(finish, procs), strict=True))
    for side, proc in procs.items():
        if proc.returncode != 0:
            raise RuntimeError(f"punch on host {side} failed: {outcomes[side][1]}")
    return files


def record_primed(out: Path, work: Path) -> None:
    """A primed punch (the default strategy) between `home` (A) and `original` (B), with
    `punch --pcap` on both hosts and tcpdump on A's NAT's public side."""
    lab = labmod.Lab("home", "original", lab_id=f"cap{os.getpid() % 10000}")
    with sigterm_as_interrupt(), lab, tcpdump(lab, "ga-wan", work / "primed.nat-a.pcap"):
        files = record_punch(lab, work, name="primed", strategy="auto")
        time.sleep(SETTLE_S)
    for path in [*files.values(), work / "primed.nat-a.pcap"]:
        shutil.copyfile(path, out / path.name)
        print(f"{out / path.name}: a primed punch")


def _finish_with(proc: subprocess.Popen[bytes], stdin: bytes, timeout_s: float
                 ) -> tuple[str, str]:
    try:
        out, err = proc.communicate(stdin, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=5)
    return out.decode(errors="replace").strip(), err.decode(errors="replace").strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "captures"))
    parser.add_argument("names", nargs="*", help=f"scenarios (default all: "
                                                 f"{', '.join(SCENARIOS)}, punch, primed)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".recording"
    work.mkdir(exist_ok=True)
    try:
        for name in args.names or [*SCENARIOS, "punch", "primed"]:
            if name == "punch":
                lab = labmod.Lab("home", "home", lab_id=f"cap{os.getpid() % 10000}")
                with sigterm_as_interrupt(), lab:
                    for side, path in record_punch(lab, work).items():
                        shutil.copyfile(path, out / path.name)
                        print(f"{out / path.name}: synprobe punch --pcap on host {side}")
                continue
            if name == "primed":
                record_primed(out, work)
                continue
            scenario = SCENARIOS[name]
            rec = record_in_new_lab(scenario, work, f"cap{os.getpid() % 10000}")
            if rec.timing_problems():  # not the opening it is named after: keep the old one
                print(f"{name}: did not happen as planned, not kept: "
                      f"{'; '.join(rec.timing_problems())}", file=sys.stderr)
                return 1
            kept = {scenario.reference: f"{name}.pcap", **scenario.extra}
            for point, file_name in kept.items():
                shutil.copyfile(rec.files[point], out / file_name)
                print(f"{out / file_name}: {name} at {point}")
            print(f"  peers: {json.dumps(rec.peers)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
