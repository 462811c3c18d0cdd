"""punch --pcap: roles, the pcapng writer, a capture on loopback, the no-privilege path and
the punch path staying free of scapy. (The NAT lab run is in test_capture_lab.py.)"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from synprobe.analyze.command import analyze_file
from synprobe.packets.decode import ACK, FIN, RST, SYN
from synprobe.packets.reader import read_capture
from synprobe.packets.writer import PcapNgWriter, cooked_header
from synprobe.punch_pcap import Roles, RunPacket, packet_role
from tests import schemas
from tests.helpers import free_port

from .helpers import SYNPROBE, loopback_broker, wait_for_stderr

PEER = "203.0.113.2:40100"
BROKER = "192.0.2.10:8086"


def test_roles_name_each_stage_of_a_run() -> None:
    roles = Roles([BROKER])
    names = [roles.name(s) for s in [
        RunPacket(True, BROKER, SYN), RunPacket(False, BROKER, SYN | ACK),
        RunPacket(True, BROKER, ACK), RunPacket(True, BROKER, ACK, 40),
        RunPacket(True, PEER, SYN), RunPacket(False, PEER, SYN),
        RunPacket(True, PEER, SYN | ACK), RunPacket(False, PEER, ACK),
        RunPacket(True, PEER, ACK, 6), RunPacket(False, PEER, FIN | ACK),
    ]]
    assert names == [
        "broker: SYN from us to 192.0.2.10:8086", "broker: SYN+ACK from 192.0.2.10:8086",
        "broker: ACK from us to 192.0.2.10:8086",
        "broker: ACK, 40 B of data from us to 192.0.2.10:8086",
        "punch: SYN from us to 203.0.113.2:40100", "punch: SYN from 203.0.113.2:40100",
        "punch: SYN+ACK from us to 203.0.113.2:40100", "punch: ACK from 203.0.113.2:40100",
        "chat: ACK, 6 B of data from us to 203.0.113.2:40100",
        "chat: FIN+ACK from 203.0.113.2:40100"]


def test_simultaneous_open_is_opened_by_the_two_syn_acks_and_rst_starts_over() -> None:
    roles = Roles([])
    for packet in (RunPacket(True, PEER, SYN), RunPacket(False, PEER, SYN),
                   RunPacket(True, PEER, SYN | ACK), RunPacket(False, PEER, SYN | ACK)):
        assert roles.name(packet).startswith("punch:")
    assert roles.name(RunPacket(True, PEER, ACK, 3)).startswith("chat:")
    assert roles.name(RunPacket(False, PEER, RST | ACK)) == "chat: RST from 203.0.113.2:40100"
    assert roles.name(RunPacket(True, PEER, SYN)).startswith("punch:")
    assert packet_role(RunPacket(False, PEER, icmp="port-unreachable", reporter="203.0.113.2"),
                       []) == ("punch: ICMP port-unreachable from 203.0.113.2 about our "
                               "segment to 203.0.113.2:40100")


def _ipv4_tcp(src: bytes, dst: bytes, sport: int, dport: int, flags: int, seq: int) -> bytes:
    tcp = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + seq.to_bytes(4, "big") \
        + bytes(4) + bytes([0x50, flags]) + b"\xff\xff" + bytes(4)
    return bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0]) + src + dst + tcp


def test_pcapng_writer_round_trips_through_the_reader(tmp_path: Path) -> None:
    out = io.BytesIO()
    pcap = PcapNgWriter(out)
    a, b = bytes([10, 1, 0, 2]), bytes([203, 0, 113, 2])
    pcap.write("eth0", 1700000000.123456789,
               cooked_header(4, 1, b"\x02" * 6, 0x0800) + _ipv4_tcp(a, b, 40100, 40100, SYN, 7),
               "punch: SYN from us to 203.0.113.2:40100")
    pcap.write("lo", 1700000000.5, cooked_header(0, 772, b"", 0x0800)
               + _ipv4_tcp(b, a, 40100, 40100, SYN | ACK, 9))
    contents = read_capture(out.getvalue())
    assert contents.damage is None and contents.fmt == "pcapng" and contents.linktypes == (113,)
    first, second = contents.segments
    assert (first.src, first.dst, first.flags, first.seq) == ("10.1.0.2:40100",
                                                              "203.0.113.2:40100", SYN, 7)
    assert first.time == pytest.approx(1700000000.123456789, abs=1e-6)
    assert first.comment == "punch: SYN from us to 203.0.113.2:40100" and second.comment == ""
    path = tmp_path / "w.pcapng"
    path.write_bytes(out.getvalue())
    proc = _tshark(path, "-T", "fields", "-e", "frame.interface_name", "-e", "frame.comment")
    assert proc.stdout.splitlines() == ["eth0\tpunch: SYN from us to 203.0.113.2:40100", "lo\t"]


def _tshark(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.fail("tshark is needed (Debian: apt-get install tshark)")
    proc = subprocess.run([tshark, "-r", str(path), *extra], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def _listening_peer() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(15)
    return srv


def _free_port() -> int:
    return free_port()


def _punch_loopback(tmp_path: Path, extra: list[str], prefix: list[str] | None = None,
                    probe: str = "") -> subprocess.CompletedProcess[str]:
    """One punch --peer to a listening socket on loopback; the peer sends one line."""
    srv = _listening_peer()
    port = srv.getsockname()[1]
    argv = ["punch", "--peer", f"127.0.0.1:{port}", "--local-port", str(_free_port()),
            "--timeout", "10", "--json", "-v", *extra]
    code = ("import sys\nfrom synprobe.cli import main\ncode = main(sys.argv[1:])\n"
            f"{probe}\nsys.exit(code)")
    env = {**os.environ, "SYNPROBE_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen([*(prefix or []), sys.executable, "-c", code, *argv],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b"\x05hello")
            conn.shutdown(socket.SHUT_WR)
            out, err = proc.communicate("bye\n", timeout=30)
    finally:
        srv.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _require_net_raw() -> None:
    """A capture needs CAP_NET_RAW: as an ordinary user the test is skipped (as the lab
    tests are), under CI (SYNPROBE_REQUIRE_LAB=1) it fails."""
    if not _has_net_raw():
        if os.environ.get("SYNPROBE_REQUIRE_LAB") == "1":
            pytest.fail("CAP_NET_RAW required (SYNPROBE_REQUIRE_LAB=1)", pytrace=False)
        pytest.skip("a capture needs CAP_NET_RAW (root)")


def _has_net_raw() -> bool:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()
    except PermissionError:
        return False
    return True


def test_pcap_on_loopback_has_the_whole_run_with_roles(tmp_path: Path) -> None:
    _require_net_raw()  # without it: the next test, the no-privilege path
    pcap = tmp_path / "run.pcapng"
    run = _punch_loopback(tmp_path, ["--pcap", str(pcap)])
    assert run.returncode == 0, run.stderr
    report = schemas.loads("punch", run.stdout.splitlines()[0])
    (attempt,) = analyze_file(str(pcap)).attempts
    assert attempt.kind == "three-way" and attempt.established
    assert attempt.endpoints[0] == report["local"]
    frames = _tshark(pcap, "-T", "fields", "-e", "frame.comment").stdout.splitlines()
    assert frames[0] == f"punch: SYN from us to {report['peer']}"
    assert frames[1] == f"punch: SYN+ACK from {report['peer']}"
    assert any(f.startswith("chat: ACK, 6 B of data from") for f in frames)
    assert f"capture: {len(frames)} packet(s) of port" in run.stderr
    # recorded for `synprobe report`
    index = (tmp_path / "state" / "pcaps.jsonl").read_text()
    assert json.loads(index)["path"] == str(pcap)


def test_without_cap_net_raw_the_punch_runs_and_says_the_capture_was_skipped(
        tmp_path: Path) -> None:
    prefix = []
    if _has_net_raw():
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.fail("setpriv (util-linux) is needed to drop CAP_NET_RAW")
        prefix = [setpriv, "--bounding-set=-net_raw", "--"]
    pcap = tmp_path / "run.pcapng"
    run = _punch_loopback(tmp_path, ["--pcap", str(pcap)], prefix)
    assert run.returncode == 0, run.stderr
    assert schemas.loads("punch", run.stdout.splitlines()[0])["established"] is True
    skipped = [line for line in run.stderr.splitlines() if "capture skipped" in line]
    assert len(skipped) == 1 and "needs CAP_NET_RAW" in skipped[0]
    assert not pcap.exists() and not (tmp_path / "state" / "pcaps.jsonl").exists()


@pytest.mark.parametrize("extra", [[], ["--pcap", "PCAP"]])
def test_the_punch_path_never_imports_scapy(tmp_path: Path, extra: list[str]) -> None:
    extra = [str(tmp_path / "x.pcapng") if e == "PCAP" else e for e in extra]
    run = _punch_loopback(tmp_path, extra,
                          probe="print('scapy loaded' if 'scapy' in sys.modules else "
                                "'no scapy', file=sys.stderr)")
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines()[-1] == "no scapy"


def test_pcap_in_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run([*SYNPROBE, "punch", "--peer", "127.0.0.1:9", "--local-port", "1",
                           "--pcap", str(tmp_path / "no" / "x.pcapng")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"synprobe: --pcap {tmp_path / 'no' / 'x.pcapng'}: "
                                   f"cannot write in {tmp_path / 'no'}")


def test_sigterm_while_waiting_for_the_peer_still_closes_and_records_the_pcap(
        tmp_path: Path) -> None:
    pcap = tmp_path / "wait.pcapng"
    env = {**os.environ, "SYNPROBE_STATE_DIR": str(tmp_path / "state")}
    with loopback_broker() as (_, port):
        proc = subprocess.Popen([*SYNPROBE, "punch", "--broker", f"127.0.0.1:{port}",
                                 "--session", "alone", "--timeout", "30", "-v", "--pcap",
                                 str(pcap)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        try:
            err = wait_for_stderr(proc, "waiting for the peer", 20)
            proc.send_signal(signal.SIGTERM)
            err += proc.communicate(timeout=30)[1]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    # SIGTERM unwinds like Ctrl-C (README: exit 130), with or without the privilege.
    assert proc.returncode == 130, err
    assert "interrupted" in err
    if not _has_net_raw():
        assert "capture skipped" in err and not pcap.exists()
        return
    assert "capture: " in err and "interrupted" in err
    (broker,) = analyze_file(str(pcap)).attempts
    assert broker.kind == "three-way" and broker.endpoints[1] == f"127.0.0.1:{port}"
    assert json.loads((tmp_path / "state" / "pcaps.jsonl").read_text())["path"] == str(pcap)
