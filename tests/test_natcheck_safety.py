"""Safety of nat-check: firewall rules never outlive a run, probes go only to connected
clients, and missing privileges are told in one line."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.wire import ProtocolError
from synprobe import lab as labmod
from synprobe.natcheck import protocol as P
from synprobe.natcheck.server import Check, ProbeServer
from tests import schemas

SERVER = f"{labmod.BROKER_IPS[0]}:{labmod.BROKER_PORT}"


WAIT_S = 10.0


def tagged(lab: labmod.Lab, node: str) -> list[str]:
    out = lab.run(node, ["iptables", "-S"], check=True).stdout
    return [line for line in out.splitlines() if "synprobe-natcheck" in line]


def start_broker(lab: labmod.Lab) -> subprocess.Popen[bytes]:
    return labmod.start_broker(lab, extra=["--probe"], stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen[bytes], sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=WAIT_S)
        pytest.fail(f"broker ignored signal {sig}")
    return proc.returncode, (err or b"").decode(errors="replace")


@pytest.mark.lab
def test_broker_rules_go_on_sigterm_sigint_and_after_sigkill_restart(
        make_lab: Callable[..., labmod.Lab]) -> None:
    lab = make_lab("home", "home")
    proc = start_broker(lab)
    assert len(tagged(lab, "br")) == 2  # the probe port's DROP, the ICMP port's REJECT
    rc, _ = stop(proc, signal.SIGTERM)
    assert rc == 0 and tagged(lab, "br") == []

    proc = start_broker(lab)
    rc, _ = stop(proc, signal.SIGINT)
    assert rc == 130 and tagged(lab, "br") == []

    proc = start_broker(lab)
    stop(proc, signal.SIGKILL)
    left = tagged(lab, "br")
    assert len(left) == 2, "a SIGKILLed broker cannot clean up: its rules stay until restart"
    proc = start_broker(lab)
    assert tagged(lab, "br") == left  # the restart removed the old ones and added its own
    rc, err = stop(proc, signal.SIGTERM)
    assert "removed 2 firewall rule(s) a previous run left" in err
    assert rc == 0 and tagged(lab, "br") == []


_ASK = """
import socket, sys
def ask(lines):
    s = socket.create_connection(("{ip}", {port}), timeout=5)
    for line in lines:
        s.sendall(line.encode() + b"\\n")
    data = b""
    while b"ERROR" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    return data.decode().strip().replace("\\n", " | ")
print(ask(["SSYN1 NC_PROBE unsolicited=40000 filter=40001"]))
print(ask(["SSYN1 NC_HELLO", "SSYN1 NC_PROBE unsolicited=40000 filter=40001 target={other}"]))
print(ask(["SSYN1 NC_REFLECT ports=40000"]))
"""


@pytest.mark.lab
def test_probe_for_an_address_not_connected_is_refused(
        make_lab: Callable[..., labmod.Lab], tmp_path: Path) -> None:
    lab = make_lab("home", "firewall")
    start_broker(lab)
    other = lab.side("b").public
    pcap = tmp_path / "hb.pcap"
    capture = lab.popen("hb", ["tcpdump", "-n", "-U", "-i", "eth0", "-c", "1", "-w", str(pcap),
                               "tcp[tcpflags] & tcp-syn != 0"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_line(capture, b"listening on", WAIT_S)  # tcpdump is capturing now
        script = _ASK.format(ip=labmod.BROKER_IPS[0], port=labmod.BROKER_PORT, other=other)
        out = lab.run("ha", ["python3", "-c", script], check=True).stdout
        answers = out.strip().splitlines()
        assert len(answers) == 3
        assert all("ERROR" in a and "refused" in a for a in answers), out
        assert "NC_INFO" in answers[1]  # the hello was served; the foreign target was not
        # A marker SYN from hB itself: tcpdump (-c 1) stops at the first SYN it sees, so
        # if the broker had sent one, it would be the one captured, not the marker.
        lab.run("hb", ["python3", "-c", "import socket; s = socket.socket(); "
                       "s.settimeout(0.2); s.connect_ex(('192.0.2.10', 9))"], timeout=10)
        capture.communicate(timeout=WAIT_S)
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.communicate(timeout=WAIT_S)
    seen = lab.run("hb", ["tcpdump", "-n", "-r", str(pcap)], check=True).stdout.splitlines()
    assert len(seen) == 1 and " > 192.0.2.10.9: " in seen[0], (
        f"the broker sent a SYN to a host that never asked: {seen}")


def wait_for_line(proc: subprocess.Popen[bytes], needle: bytes, timeout_s: float) -> None:
    """Read proc's stderr (bounded) until a line holds ``needle``."""
    assert proc.stderr is not None
    end = time.monotonic() + timeout_s
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while needle not in buf:
            remaining = end - time.monotonic()
            assert remaining > 0, f"no {needle!r} within {timeout_s:.0f} s: {buf!r}"
            if sel.select(remaining):
                chunk = os.read(proc.stderr.fileno(), 4096)
                assert chunk, f"ended before {needle!r}: {buf!r}"
                buf += chunk


class _FakeBroker:
    def __init__(self, open_conns: set[int]) -> None:
        self.open_conns = open_conns

    def is_open(self, conn: int) -> bool:
        return conn in self.open_conns


def _syn_to(dst: str) -> bytes:
    header = bytearray(20)
    header[0] = 0x45
    header[16:20] = bytes(int(x) for x in dst.split("."))
    return bytes(header)


def test_send_guard_refuses_other_addresses_closed_connections_and_spent_budget() -> None:
    server = ProbeServer(["192.0.2.10"])
    check = Check(1, "198.51.100.2", Endpoint("192.0.2.10", 8086), None, time.monotonic())
    with pytest.raises(ProtocolError, match="refused"):
        server._send(_FakeBroker({1}), check, [_syn_to("203.0.113.2")])  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="refused"):
        server._send(_FakeBroker(set()), check, [_syn_to("198.51.100.2")])  # type: ignore[arg-type]
    check.sent = P.PROBE_BUDGET
    with pytest.raises(ProtocolError, match="budget"):
        server._send(_FakeBroker({1}), check, [_syn_to("198.51.100.2")])  # type: ignore[arg-type]


@pytest.mark.lab
def test_client_rules_go_on_sigterm_and_a_killed_runs_rules_are_swept(
        make_lab: Callable[..., labmod.Lab]) -> None:
    lab = make_lab("home", "home")
    start_broker(lab)
    argv = [*labmod.SYNPROBE, "nat-check", "--server", SERVER, "--json", "--timers",
            "--max-wait", "20"]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = lab.popen("ha", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        end = time.monotonic() + WAIT_S
        while not tagged(lab, "ha") and time.monotonic() < end:
            time.sleep(0.1)
        assert tagged(lab, "ha"), "nat-check --timers never installed its rules"
        proc.send_signal(sig)
        proc.communicate(timeout=WAIT_S)
        if sig == signal.SIGTERM:
            assert proc.returncode == 130
            assert tagged(lab, "ha") == []
        else:
            assert tagged(lab, "ha"), "SIGKILL leaves the rules for the next run to sweep"
    run = lab.run("ha", [*labmod.SYNPROBE, "nat-check", "--server", SERVER, "--json"],
                  timeout=30)
    assert run.returncode == 0, run.stderr
    assert tagged(lab, "ha") == []


@pytest.mark.lab
def test_without_privileges_mapping_runs_and_one_line_names_the_capability(
        make_lab: Callable[..., labmod.Lab]) -> None:
    lab = make_lab("home", "home")
    start_broker(lab)
    drop = ["setpriv", "--bounding-set=-net_raw,-net_admin", "--inh-caps=-net_raw,-net_admin"]
    run = lab.run("ha", [*drop, *labmod.SYNPROBE, "nat-check", "--server", SERVER, "--json"],
                  timeout=30)
    assert run.returncode == 6, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "CAP_NET_RAW" in lines[0] and "CAP_NET_ADMIN" in lines[0]
    report = schemas.loads("nat-check", run.stdout)
    assert report["mapping"] == "endpoint-independent" and report["port_preservation"] is True
    assert report["filtering"] is None and "CAP_NET_RAW" in report["reasons"]["filtering"]


@pytest.mark.lab
def test_broker_without_privileges_serves_mapping_and_says_why(
        make_lab: Callable[..., labmod.Lab]) -> None:
    lab = make_lab("home", "home")
    drop = ["setpriv", "--bounding-set=-net_raw,-net_admin", "--inh-caps=-net_raw,-net_admin"]
    binds = [a for ip in labmod.BROKER_IPS for a in ("--bind", f"{ip}:{labmod.BROKER_PORT}")]
    proc = lab.popen("br", [*drop, *labmod.SYNPROBE, "broker", *binds, "--probe"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    labmod.wait_for_listen(lab, "br", labmod.BROKER_IPS[0], labmod.BROKER_PORT, WAIT_S)
    assert tagged(lab, "br") == []
    run = lab.run("ha", [*labmod.SYNPROBE, "nat-check", "--server", SERVER, "--json"],
                  timeout=30)
    assert run.returncode == 0, run.stderr
    report = schemas.loads("nat-check", run.stdout)
    assert report["mapping"] == "endpoint-independent"
    assert report["reply_syn"] is None
    assert "the broker needs CAP_NET_RAW" in report["reasons"]["reply_syn"]
    rc, err = stop(proc, signal.SIGTERM)
    assert rc == 0
    assert [line for line in err.splitlines() if "CAP_NET_RAW" in line] == [
        line for line in err.splitlines() if "raw probes" in line]


@pytest.mark.lab
def test_a_broker_without_probe_is_told_apart_exit_3(
        make_lab: Callable[..., labmod.Lab]) -> None:
    lab = make_lab("home", "home")
    labmod.start_broker(lab)  # no --probe
    run = lab.run("ha", [*labmod.SYNPROBE, "nat-check", "--server", SERVER], timeout=30)
    assert run.returncode == 3
    assert "does not serve nat-check" in run.stderr and "--probe" in run.stderr
    assert tagged(lab, "ha") == []


def test_a_flood_of_captured_syns_gets_at_most_one_probe_each_only_while_connected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe side's answers to the SYNs it captures (REPLY, TIMER): never more than one
    packet per packet received, never past the check's budget, only to the client's own
    address, and nothing once its control connection is closed (issue 11, item 6)."""
    import asyncio

    from synprobe.natcheck import server as srv
    from synprobe.packets.decode import IPPROTO_TCP, SYN
    from synprobe.packets.seen import Seen

    sent: list[bytes] = []
    monkeypatch.setattr(srv.rawnet, "send_packets", lambda pkts: sent.extend(pkts))
    monkeypatch.setattr(srv, "_syn", lambda src, dst, sport, dport, seq: _syn_to(dst))
    client = "198.51.100.2"

    def syn(sport: int, seq: int, src: str = client) -> Seen:
        return Seen(0.0, False, src, "192.0.2.10", 64, IPPROTO_TCP, sport, 8088, SYN, seq)

    async def flood() -> tuple[int, int, int]:
        server = ProbeServer(["192.0.2.10"])
        broker = _FakeBroker({1})
        server._broker = broker  # type: ignore[assignment]
        check = Check(1, client, Endpoint("192.0.2.10", 8086), None, time.monotonic())
        check.timer_waits = [0.01] * P.MAX_TIMERS
        server.checks[1] = check
        received = 0
        for _ in range(500):  # the same REPLY SYN again and again: one answer
            server._client_syn(check, syn(40000, P.Seq.REPLY))
            received += 1
        after_same = len(sent)
        for port in range(1000, 1500):  # from 500 ports: answers up to the budget
            server._client_syn(check, syn(port, P.Seq.REPLY))
            server._client_syn(check, syn(port, P.Seq.TIMER))
            received += 2
        await asyncio.sleep(0.1)  # the timers' answers
        assert len(sent) <= min(received, P.PROBE_BUDGET) and check.sent == len(sent)
        before_close = len(sent)
        broker.open_conns.clear()  # the control connection closed
        check.sent = 0
        for port in range(2000, 2100):
            server._client_syn(check, syn(port, P.Seq.REPLY))
        return after_same, before_close, len(sent)

    after_same, before_close, total = asyncio.run(flood())
    assert after_same == 1
    assert before_close == P.PROBE_BUDGET
    assert total == before_close  # nothing once the connection closed
    assert all(pkt[16:20] == bytes([198, 51, 100, 2]) for pkt in sent)
