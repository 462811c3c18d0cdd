"""synprobe analyze on files: the reference captures, other formats, damaged input, and
the replay on hand-made segments. No network, no root."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synprobe.analyze.command import analyze_bytes, analyze_file
from synprobe.analyze.ladder import arrow_text, draw, ladder_only
from synprobe.analyze.tcp import find_attempts
from synprobe.cli import main
from synprobe.packets.decode import ACK, FIN, PSH, RST, SYN, IcmpError, Segment
from synprobe.packets.reader import CaptureContents, read_capture
from tests import schemas

CAPTURES = Path(__file__).resolve().parent.parent / "captures"

# The original README's drawings (simulsyn README), exactly; the two side-by-side ones
# split into their halves.
README_THREE_WAY = """\
   CLOSED                CLOSED
     |            (listen) |
   CLOSED                LISTEN
     | (connect)           |
  SYN-SENT               LISTEN
     | --------SYN-------> |
  SYN-SENT            SYN-RECEIVED
     | <-----SYN+ACK------ |
ESTABLISHED           SYN-RECEIVED
     | --------ACK-------> |
ESTABLISHED           ESTABLISHED"""

README_SIMULTANEOUS = """\
   CLOSED                CLOSED
     | (connect)           |
     |           (connect) |
  SYN-SENT              SYN-SENT
     | --------SYN-------> |
     | <-------SYN-------- |
SYN-RECEIVED          SYN-RECEIVED
     | ------SYN+ACK-----> |
     | <-----SYN+ACK------ |
ESTABLISHED           ESTABLISHED"""

README_SIDE_BY_SIDE = """\
   CLOSED                CLOSED      CLOSED                CLOSED
     | (connect)           |           | (connect)           |
  SYN-SENT               CLOSED     SYN-SENT               CLOSED
     | --------SYN-------> |           | ----SYN-> (dropped) |
  SYN-SENT               CLOSED     SYN-SENT               CLOSED
     | <-------RST-------- |           |           (connect) |
   CLOSED                CLOSED     SYN-SENT              SYN-SENT
     |           (connect) |           | <-------SYN-------- |
   CLOSED               SYN-SENT  SYN-RECEIVED            SYN-SENT
     | <-------SYN-------- |           | ------SYN+ACK-----> |
   CLOSED               SYN-SENT  SYN-RECEIVED          ESTABLISHED
     | --------RST-------> |           | <-------ACK-------- |
   CLOSED                CLOSED   ESTABLISHED           ESTABLISHED"""
SPLIT_AT = 34
README_SYN_REJECTED = "\n".join(line[:SPLIT_AT].rstrip()
                                for line in README_SIDE_BY_SIDE.splitlines())
README_SYN_DROPPED = "\n".join(line[SPLIT_AT:].rstrip()
                               for line in README_SIDE_BY_SIDE.splitlines())
README_DRAWINGS = {"three-way": README_THREE_WAY, "simultaneous-open": README_SIMULTANEOUS,
                   "syn-rejected": README_SYN_REJECTED, "syn-dropped": README_SYN_DROPPED}

# Every capture in captures/ and what analyze must say: (kind, established, seen at).
EXPECTED = {
    "three-way.pcap": [("three-way", True, "host-a")],
    "simultaneous-open.pcap": [("simultaneous-open", True, "host-a")],
    "syn-dropped.pcap": [("syn-dropped", True, "host-a")],
    "syn-dropped.nat-any.pcap": [("syn-dropped", True, "several")],
    "syn-rejected.pcap": [("syn-rejected", False, "path")],
    "icmp-rejected.pcap": [("syn-rejected", False, "host-a")],
    "incomplete.pcap": [("incomplete", False, "host-a")],
    "punch.a.pcapng": [("three-way", True, "host-a"), ("syn-dropped", True, "host-a")],
    "punch.b.pcapng": [("three-way", True, "host-a"), ("three-way", True, "host-a")],
    # A primed punch (home A, original B): A's TTL-limited SYN alone, then A's full SYN
    # answered by B's primed socket; at B, its TTL-limited SYN and A's SYN meeting it.
    "primed.a.pcapng": [("three-way", True, "host-a"), ("primed", False, "unknown"),
                        ("three-way", True, "host-a")],
    "primed.b.pcapng": [("three-way", True, "host-a"), ("primed", True, "host-a")],
    "primed.nat-a.pcap": [("three-way", True, "path"), ("primed", False, "unknown"),
                          ("three-way", True, "path")],
}


def test_every_reference_capture_is_listed() -> None:
    on_disk = sorted(p.name for p in CAPTURES.glob("*.pcap*"))
    assert on_disk == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reference_capture_classified(name: str) -> None:
    result = analyze_file(str(CAPTURES / name))
    assert result.problem is None
    got = [(a.kind, a.established, a.vantage_point) for a in result.attempts]
    assert got == EXPECTED[name]


@pytest.mark.parametrize("scenario", sorted(README_DRAWINGS))
def test_reference_capture_draws_the_original_readme(scenario: str) -> None:
    (attempt,) = analyze_file(str(CAPTURES / f"{scenario}.pcap")).attempts
    assert ladder_only(draw(attempt)) == README_DRAWINGS[scenario]


def test_the_readme_halves_are_what_the_original_draws() -> None:
    # Guard the split: each half keeps its own title row's states and arrows.
    assert "RST" in README_SYN_REJECTED and "RST" not in README_SYN_DROPPED
    assert "(dropped)" in README_SYN_DROPPED


def test_nat_any_capture_matches_both_sides_of_the_nat() -> None:
    (attempt,) = analyze_file(str(CAPTURES / "syn-dropped.nat-any.pcap")).attempts
    assert set(attempt.views) == {("10.1.0.2:40100", "203.0.113.2:40100"),
                                  ("198.51.100.2:40100", "203.0.113.2:40100")}
    assert "10.1.0.2:40100 and 198.51.100.2:40100" in attempt.vantage
    # Each packet once: the same ladder as the capture taken at the host.
    (at_host,) = analyze_file(str(CAPTURES / "syn-dropped.pcap")).attempts
    assert ladder_only(draw(attempt)) == ladder_only(draw(at_host))


def test_icmp_rejection_is_drawn_from_the_path() -> None:
    (attempt,) = analyze_file(str(CAPTURES / "icmp-rejected.pcap")).attempts
    diagram = draw(attempt)
    assert "---SYN-> (rejected) |" in diagram
    assert "<--ICMP port-unr--- |" in diagram and "from 203.0.113.2" in diagram
    assert diagram.splitlines()[-1].split() == ["CLOSED", "CLOSED"]


def test_a_primed_punch_is_drawn_with_its_ttl_limited_syn_and_the_crossing() -> None:
    # At A's NAT's public side: the SYN left the NAT with TTL 1 and the router answered.
    _, primed, _ = analyze_file(str(CAPTURES / "primed.nat-a.pcap")).attempts
    lines = draw(primed).splitlines()
    assert "| -----SYN ttl=1----> |" in lines[3] and "died on the way by its TTL" in lines[3]
    assert "| <---ICMP ttl-exc--- |" in lines[5] and "from 198.51.100.1" in lines[5]
    # At host B: its own TTL-limited SYN and its ICMP, then A's full SYN reaches the
    # primed socket, still in SYN-SENT, which answers SYN+ACK: the hole was open.
    _, at_b = analyze_file(str(CAPTURES / "primed.b.pcapng")).attempts
    lines = draw(at_b).splitlines()
    assert "-----SYN ttl=2----> |" in lines[3] and "punch: SYN from us" in lines[3]
    assert "<---ICMP ttl-exc---" in lines[5] and "punch: ICMP ttl-exceeded" in lines[5]
    syn_in = next(i for i, line in enumerate(lines) if "| <-------SYN-------- |" in line)
    assert lines[syn_in - 1].split() == ["SYN-SENT", "SYN-SENT"]
    assert lines[syn_in + 1].split() == ["SYN-RECEIVED", "SYN-SENT"]
    assert "------SYN+ACK----->" in lines[syn_in + 2]
    assert lines[-2].split() == ["ESTABLISHED", "ESTABLISHED"]


def test_punch_pcap_carries_each_packet_s_role() -> None:
    broker, punch = analyze_file(str(CAPTURES / "punch.a.pcapng")).attempts
    assert broker.endpoints[1] == "192.0.2.10:8086"
    lines = draw(punch).splitlines()
    assert lines[3].endswith(f"punch: SYN from us to {punch.endpoints[1]}")
    assert lines[7].endswith(f"punch: SYN from {punch.endpoints[1]}")


def test_every_arrow_has_its_time_and_frame() -> None:
    (attempt,) = analyze_file(str(CAPTURES / "syn-dropped.pcap")).attempts
    arrows = [line for line in draw(attempt).splitlines() if ">" in line or "<" in line]
    assert len(arrows) == 4
    times = [float(line.split(" ms")[0].split()[-1]) for line in arrows]
    assert times[0] == 0.0 and times == sorted(times) and 250 < times[1] < 400


# --- the command ------------------------------------------------------------------------------

def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["analyze", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_the_documented_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--json", str(CAPTURES / "simultaneous-open.pcap"),
                             str(CAPTURES / "three-way.pcap"))
    assert code == 0 and err == ""
    doc = schemas.loads("analyze", out)
    assert [c["kind"] for c in doc["connections"]] == ["simultaneous-open", "three-way"]
    first = doc["connections"][0]
    assert first["endpoints"] == ["10.1.0.2:40100", "203.0.113.2:40100"]
    assert first["established"] is True
    assert isinstance(first["first_packet_time"], float) and first["first_packet_time"] > 1e9
    assert first["first_packet_utc"].endswith("Z")
    assert "host A (10.1.0.2:40100)" in first["vantage"]
    assert ladder_only(first["diagram"]) == README_SIMULTANEOUS
    assert [a["label"] for a in first["arrows"]] == ["SYN", "SYN", "SYN+ACK", "SYN+ACK"]
    assert first["final_states"] == {"A": "ESTABLISHED", "B": "ESTABLISHED"}
    assert [f["error"] for f in doc["files"]] == [None, None]


def test_text_form_has_a_table_and_the_diagrams(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, str(CAPTURES / "syn-rejected.pcap"))
    assert code == 0
    assert "198.51.100.2:40100 -> 203.0.113.2:40100  syn-rejected" in out
    assert README_SYN_REJECTED in ladder_only(out)
    code, brief, _ = run_cli(capsys, "--brief", str(CAPTURES / "syn-rejected.pcap"))
    assert code == 0 and "SYN-SENT" not in brief and "syn-rejected" in brief


# --- other writers' formats --------------------------------------------------------------------

def _editcap(src: Path, dst: Path, fmt: str) -> None:
    if shutil.which("editcap") is None:
        pytest.fail("editcap (Debian: wireshark-common / tshark) is needed for this test")
    subprocess.run(["editcap", "-F", fmt, str(src), str(dst)], check=True, timeout=30)


@pytest.mark.parametrize("fmt", ["pcapng", "nsecpcap"])
def test_wireshark_formats_give_the_same_analysis(tmp_path: Path, fmt: str) -> None:
    converted = tmp_path / f"x.{fmt}"
    _editcap(CAPTURES / "syn-dropped.nat-any.pcap", converted, fmt)
    original = analyze_file(str(CAPTURES / "syn-dropped.nat-any.pcap")).attempts
    again = analyze_file(str(converted)).attempts
    assert [draw(a) for a in again] == [draw(a) for a in original]


def big_endian(pcap: bytes) -> bytes:
    """The same capture as a big-endian host would have written it."""
    out = bytearray(b"\xa1\xb2\xc3\xd4")
    out += struct.pack(">HHiIII", *struct.unpack_from("<HHiIII", pcap, 4))
    off = 24
    while off < len(pcap):
        sec, usec, caplen, length = struct.unpack_from("<IIII", pcap, off)
        out += struct.pack(">IIII", sec, usec, caplen, length) + pcap[off + 16:off + 16 + caplen]
        off += 16 + caplen
    return bytes(out)


def test_big_endian_pcap() -> None:
    data = (CAPTURES / "three-way.pcap").read_bytes()
    assert data[:4] == b"\xd4\xc3\xb2\xa1"
    swapped = analyze_bytes("x", big_endian(data))
    assert [draw(a) for a in swapped.attempts] == [
        draw(a) for a in analyze_bytes("x", data).attempts]


# --- damaged and wrong input: one line, exit 7, never a traceback ------------------------------

def _pcap(records: list[tuple[float, bytes]], linktype: int = 101) -> bytes:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)]
    for t, frame in records:
        out.append(struct.pack("<IIII", int(t), int(round(t % 1 * 1e6)), len(frame), len(frame)))
        out.append(frame)
    return b"".join(out)


def _ipv4(proto: int, payload: bytes, src: str = "10.0.0.1", dst: str = "10.0.0.2",
          ttl: int = 64) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, ttl, proto, 0,
                         bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
    return header + payload


def _tcp(sport: int, dport: int, flags: int, seq: int, ack: int = 0, data: bytes = b"") -> bytes:
    return struct.pack("!HHIIHHHH", sport, dport, seq, ack, (5 << 12) | flags, 65535, 0,
                       0) + data


def test_damaged_inputs_exit_7_with_one_line(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    good = (CAPTURES / "syn-dropped.pcap").read_bytes()
    pcapng = tmp_path / "ok.pcapng"
    _editcap(CAPTURES / "syn-dropped.pcap", pcapng, "pcapng")
    bad_block = bytearray(pcapng.read_bytes())
    shb_len = struct.unpack_from("<I", bad_block, 4)[0]
    idb_len = struct.unpack_from("<I", bad_block, shb_len + 4)[0]
    struct.pack_into("<I", bad_block, shb_len + idb_len + 4, 13)  # the first packet's length
    udp_only = _pcap([(1.0, _ipv4(17, b"\x00\x35\x00\x35\x00\x08\x00\x00"))])
    cases = {
        "empty.pcap": (b"", "empty file"),
        "notes.txt": (b"hello, this is not a capture\n", "not a pcap or pcapng capture"),
        "truncated.pcap": (good[:len(good) - 30], "truncated: the file ends inside packet"),
        "header-only.pcap": (good[:20], "truncated: the pcap file header"),
        "damaged.pcapng": (bytes(bad_block), "damaged"),
        "udp.pcap": (udp_only, "no TCP in its 1 packet(s)"),
        "noheader.pcap": (good[:24], "a capture with no packets"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        for extra in ([], ["--json"]):
            code, out, err = run_cli(capsys, *extra, str(path))
            assert code == 7, name
            assert err.count("\n") == 1 and err.startswith(f"synprobe: {path}: "), (name, err)
            assert message in err, (name, err)
            assert "Traceback" not in out + err
            if extra:
                schemas.loads("analyze", out)  # still valid JSON on stdout


def _pcapng_blocks(data: bytes) -> list[int]:
    """The offsets of a little-endian pcapng file's blocks."""
    offsets, off = [], 0
    while off < len(data):
        offsets.append(off)
        off += struct.unpack_from("<I", data, off + 4)[0]
    return offsets


def test_damaged_pcapng_message_is_one_plain_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = (CAPTURES / "punch.a.pcapng").read_bytes()
    shb, idb, first_packet, second_packet = _pcapng_blocks(data)[:4]
    assert (shb, idb, first_packet) == (0, 52, 92)
    cut = tmp_path / "cut.pcapng"  # ends 6 bytes into the second packet's block header
    cut.write_bytes(data[:second_packet + 6])
    no_interface = tmp_path / "no-interface.pcapng"  # a simple packet block before any IDB
    no_interface.write_bytes(data[:idb] + struct.pack("<IIII", 3, 20, 4, 0)
                             + struct.pack("<I", 20))
    expected = {
        cut: f"truncated: the file ends inside a block header at byte {second_packet} "
             "(the 1 packet(s) before it were analysed)",
        no_interface: f"damaged: packet block at byte {idb} before any interface",
    }
    for path, message in expected.items():
        code, _out, err = run_cli(capsys, "--brief", str(path))
        assert (code, err) == (7, f"synprobe: {path}: {message}\n")
        code, out, _err = run_cli(capsys, "--json", str(path))
        assert (code, schemas.loads("analyze", out)["files"][0]["error"]) == (7, message)


def test_truncated_capture_still_shows_what_it_could_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = (CAPTURES / "syn-dropped.pcap").read_bytes()
    path = tmp_path / "cut.pcap"
    path.write_bytes(good[:len(good) - 30])
    code, out, err = run_cli(capsys, str(path))
    assert code == 7 and "syn-dropped" in out
    assert "packet(s) before it were analysed" in err


def test_missing_file_and_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, str(tmp_path / "nope.pcap"), str(tmp_path))
    assert code == 7
    assert err.splitlines() == [f"synprobe: {tmp_path / 'nope.pcap'}: cannot read it: No such "
                                "file or directory",
                                f"synprobe: {tmp_path}: cannot read it: Is a directory"]


def test_bad_file_among_good_ones_keeps_the_good_output(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    code, out, err = run_cli(capsys, "--json", str(CAPTURES / "three-way.pcap"), str(junk))
    assert code == 7 and len(schemas.loads("analyze", out)["connections"]) == 1
    assert err.startswith(f"synprobe: {junk}: not a pcap")


def test_capture_on_standard_input() -> None:
    proc = subprocess.run([sys.executable, "-m", "synprobe", "analyze", "--brief", "-"],
                          input=(CAPTURES / "syn-dropped.pcap").read_bytes(),
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert b"-: pcap, 11 packet(s), 1 connection attempt(s)" in proc.stdout
    assert b"syn-dropped" in proc.stdout


def test_as_a_process_no_traceback(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"\xd4\xc3\xb2\xa1" + b"\xff" * 40)
    proc = subprocess.run([sys.executable, "-m", "synprobe", "analyze", str(junk)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 7
    assert proc.stderr.startswith(f"synprobe: {junk}: damaged") and "Traceback" not in proc.stderr


# --- the replay on hand-made segments ----------------------------------------------------------

A, B = "10.1.0.2:4000", "203.0.113.2:5000"


def seg(n: int, t: float, src: str, flags: int, seq: int, ack: int = 0, payload: int = 0,
        ttl: int = 64) -> Segment:
    return Segment(n, t, src, B if src == A else A, flags, seq, ack, payload, ttl)


def attempts_of(*segments: Segment) -> list[tuple[str, bool]]:
    found, _ = find_attempts(CaptureContents(len(segments), segments, (), (101,), "pcap"))
    return [(a.kind, a.established) for a in found]


def test_punch_retries_on_one_4_tuple_are_separate_attempts() -> None:
    assert attempts_of(
        seg(1, 0.00, A, SYN, 100), seg(2, 0.01, B, RST | ACK, 0, 101, ttl=61),
        seg(3, 0.02, A, SYN, 200), seg(4, 0.03, B, RST | ACK, 0, 201, ttl=61),
        seg(5, 0.04, A, SYN, 300), seg(6, 0.05, B, SYN, 900, ttl=61),
        seg(7, 0.05, A, SYN | ACK, 300, 901), seg(8, 0.06, B, ACK, 901, 301, ttl=61),
    ) == [("syn-rejected", False), ("syn-rejected", False), ("syn-dropped", True)]


def test_retransmitted_first_syn_then_three_way() -> None:
    found, _ = find_attempts(CaptureContents(4, (
        seg(1, 0.0, A, SYN, 100), seg(2, 1.0, A, SYN, 100),
        seg(3, 1.01, B, SYN | ACK, 900, 101, ttl=61), seg(4, 1.02, A, ACK, 101, 901)),
        (), (101,), "pcap"))
    (attempt,) = found
    assert (attempt.kind, attempt.listener) == ("three-way", "B")
    lines = draw(attempt).splitlines()
    assert "(lost)" in lines[5] and "retransmission" in lines[7] and "(lost)" not in lines[7]


def test_connection_opened_before_the_capture_is_skipped() -> None:
    data = (seg(1, 0.0, A, ACK | PSH, 100, 900, 10), seg(2, 0.1, B, ACK, 900, 110, ttl=61),
            seg(3, 0.2, A, FIN | ACK, 110, 900))
    found, skipped = find_attempts(CaptureContents(3, data, (), (101,), "pcap"))
    assert found == [] and skipped == 3
    result = analyze_bytes("x", _pcap([(1.0, _ipv4(6, _tcp(4000, 5000, ACK, 1, 1)))]))
    assert result.problem is not None and "no connection opening (no SYN)" in result.problem


def test_unanswered_syn_is_incomplete_not_rejected() -> None:
    assert attempts_of(seg(1, 0, A, SYN, 7), seg(2, 1, A, SYN, 7)) == [("incomplete", False)]


def test_reader_handles_raw_ip_and_payload_lengths() -> None:
    data = _pcap([(5.25, _ipv4(6, _tcp(4000, 5000, ACK | PSH, 1, 2, b"hello")))])
    contents = read_capture(data)
    (segment,) = contents.segments
    assert (segment.src, segment.dst, segment.payload) == ("10.0.0.1:4000", "10.0.0.2:5000", 5)
    assert segment.time == pytest.approx(5.25)


def test_large_capture_is_read_quickly() -> None:
    """README: "about 100 000 packets in 3 to 6 s". Timed as this process's CPU time, so
    the other workers sharing the machine do not count."""
    frames = []
    for n in range(20000):  # 20000 short connections: 100000 packets
        port = 1024 + n % 60000
        frames += [(n, _ipv4(6, _tcp(port, 80, SYN, n))),
                   (n, _ipv4(6, _tcp(80, port, SYN | ACK, 7, n + 1), "10.0.0.2", "10.0.0.1")),
                   (n, _ipv4(6, _tcp(port, 80, ACK, n + 1, 8))),
                   (n, _ipv4(6, _tcp(port, 80, FIN | ACK, n + 1, 8))),
                   (n, _ipv4(6, _tcp(80, port, RST, 8), "10.0.0.2", "10.0.0.1"))]
    data = _pcap(frames)
    start = time.process_time()
    result = analyze_bytes("big", data)
    kinds = {a.kind for a in result.attempts}  # each attempt is replayed when asked for
    elapsed = time.process_time() - start
    assert len(result.attempts) == 20000
    assert kinds == {"three-way"}
    assert elapsed < 6.0, f"{elapsed:.1f} s of CPU for 100000 packets"


def _ipv6_tcp(sport: int, dport: int, flags: int, seq: int) -> bytes:
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes.fromhex("20010db8000000000000000000000002")
    tcp = _tcp(sport, dport, flags, seq)
    return struct.pack("!IHBB", 6 << 28, len(tcp), 6, 57) + src + dst + tcp


@pytest.mark.parametrize(("linktype", "frame", "src"), [
    (1, b"\x02" * 12 + b"\x81\x00\x00\x07" + b"\x08\x00" + _ipv4(6, _tcp(4000, 80, SYN, 1)),
     "10.0.0.1:4000"),  # Ethernet with an 802.1Q tag
    (0, (2).to_bytes(4, "little") + _ipv4(6, _tcp(4000, 80, SYN, 1)), "10.0.0.1:4000"),  # BSD
    (113, struct.pack("!HHH8sH", 4, 1, 6, b"\x02" * 6, 0x0800) + _ipv4(6, _tcp(4000, 80, SYN, 1)),
     "10.0.0.1:4000"),  # Linux cooked v1
    (229, _ipv6_tcp(4000, 80, SYN, 1), "[2001:db8::1]:4000"),  # raw IPv6
])
def test_link_types(linktype: int, frame: bytes, src: str) -> None:
    (segment,) = read_capture(_pcap([(1.0, frame)], linktype)).segments
    assert (segment.src, segment.flags, segment.seq) == (src, SYN, 1)


def test_icmp_error_is_matched_to_the_syn_it_quotes() -> None:
    syn = _ipv4(6, _tcp(4000, 80, SYN, 77), "10.0.0.1", "192.0.2.9")
    icmp = _ipv4(1, bytes([3, 13, 0, 0, 0, 0, 0, 0]) + syn[:28], "192.0.2.1", "10.0.0.1", 63)
    result = analyze_bytes("x", _pcap([(1.0, syn), (1.001, icmp)]))
    (attempt,) = result.attempts
    assert attempt.kind == "syn-rejected"
    assert "     | <ICMP admin-prohib- |      " in draw(attempt)
    assert "from 192.0.2.1" in draw(attempt)


def test_every_arrow_fits_between_the_bars() -> None:
    for label in ("SYN", "ICMP admin-prohib", "SYN+FIN+ACK len=65535", "ACK len=5"):
        for rightwards in (True, False):
            for note in ("", "dropped", "rejected"):
                assert len(arrow_text(label, rightwards, note)) == 19, (label, note)


def test_icmp_error_that_did_not_end_the_connect() -> None:
    """Seen in the lab (B behind reject-icmp-port): A's SYN draws an ICMP error, yet A's
    socket stays in SYN-SENT (a soft error) and answers B's SYN."""
    icmp = IcmpError(2, 0.001, "203.0.113.2", "10.1.0.2", 3, 3, A, B, 100, 62)
    found, _ = find_attempts(CaptureContents(5, (
        seg(1, 0.0, A, SYN, 100), seg(3, 0.002, B, SYN, 900, ttl=61),
        seg(4, 0.003, A, SYN | ACK, 100, 901), seg(5, 0.004, B, ACK, 901, 101, ttl=61)),
        (icmp,), (101,), "pcap"))
    (attempt,) = found
    assert (attempt.kind, attempt.established, attempt.anomalies) == ("syn-dropped", True, ())
    diagram = draw(attempt)
    assert "---SYN-> (rejected) |" in diagram
    assert "soft error: the connect() went on" in diagram
    assert diagram.splitlines()[-1].split() == ["ESTABLISHED", "ESTABLISHED"]


def test_the_table_is_drawn_as_tabulate_draws_it() -> None:
    """analyze draws its table itself (two passes, no rows kept): the same text as
    tabulate's default format, whatever the widths."""
    import random

    from tabulate import tabulate

    from synprobe.analyze.command import HEADERS, table_lines

    rng = random.Random(11)
    for size in (1, 2, 9, 120):
        rows = [(n, f"10.{rng.randrange(256)}.0.{rng.randrange(256)}:{rng.randrange(1, 65536)}"
                    f" -> [2001:db8::{rng.randrange(9999)}]:{rng.randrange(1, 65536)}",
                 rng.choice(["three-way", "syn-dropped", "primed", "simultaneous-open"]),
                 rng.choice(["yes", "no"]), "2026-11-25T12:39:10.217735Z",
                 rng.choice([1, 12, 1234567]), rng.choice(["host-a", "several", "local"]))
                for n in range(1, size + 1)]
        assert "\n".join(table_lines(lambda rows=rows: rows)) == tabulate(rows, headers=HEADERS)
