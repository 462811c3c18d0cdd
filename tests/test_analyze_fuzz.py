"""synprobe analyze on thousands of damaged copies of the reference captures: every one
ends with exit 0 or 7 and one plain line per problem, never a traceback or "internal
error". In-process (the click entry point), not a process per mutant.

Mutants, made deterministically from captures/*.pcap*: truncations at every record or
block boundary and a few bytes either side of it, bit flips, block and record length
edits, pcapng time stamp and if_tsresol edits, option length edits."""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from synprobe.cli import main
from tests import schemas

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
REFERENCE = sorted(CAPTURES.glob("*.pcap*"))
BIT_FLIPS = 120  # per capture
# No mutant may hang the reader: each analyze run is bounded (a total budget made the
# test fail on a loaded machine; speed is bench_analyze's).
MUTANT_LIMIT_S = 5.0


def records(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of every pcap record (after the 24-byte header) or pcapng block."""
    out = []
    if data[:4] == b"\x0a\x0d\x0d\x0a":
        off = 0
        while off + 8 <= len(data):
            length = struct.unpack_from("<I", data, off + 4)[0]
            out.append((off, length))
            off += length
    else:
        off = 24
        while off + 16 <= len(data):
            caplen = struct.unpack_from("<I", data, off + 8)[0]
            out.append((off, 16 + caplen))
            off += 16 + caplen
    return out


def _put(data: bytes, off: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    if off + struct.calcsize(fmt) <= len(out):
        struct.pack_into(fmt, out, off, value)
    return bytes(out)


def _pcapng_mutants(data: bytes, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    blocks = records(data)
    for n, (off, length) in enumerate(blocks):
        btype = struct.unpack_from("<I", data, off)[0]
        for bad in (0, 4, 8, 12, 16, 20, 24, 28, length - 4, length + 4, 1 << 24, 0xFFFFFFFF):
            yield f"block {n} length {bad}", _put(data, off + 4, "<I", bad)
            yield f"block {n} trailer {bad}", _put(data, off + length - 4, "<I", bad)
        # the file ending with this block, its length (and trailer) cut to 12..28 bytes
        for short in (12, 16, 20, 24, 28):
            head = data[off:off + short - 4]
            cut = bytearray(head + struct.pack("<I", short))
            struct.pack_into("<I", cut, 4, short)
            yield f"ends in a {short}-byte block {n}", data[:off] + bytes(cut)
        if btype == 1:  # IDB: its options (if_tsresol among them)
            for resol in (0, 1, 3, 6, 9, 12, 19, 0x7F, 0x80, 0x81, 0x9F, 0xBF, 0xFF):
                option = struct.pack("<HHB3x", 9, 1, resol) + struct.pack("<HH", 0, 0)
                body = data[off + 8:off + 16] + option
                block = struct.pack("<II", 1, 12 + len(body)) + body
                block += struct.pack("<I", len(block) + 4)
                yield f"if_tsresol {resol:#x}", data[:off] + block + data[off + length:]
        if btype in (6, 2):  # packet blocks: time stamp, interface, captured length
            high_at = off + (12 if btype == 6 else 12)
            for high in (0, 0x7FFFFFFF, 0xFFFFFFFF, 0x00FFFFFF):
                yield f"block {n} ts high {high:#x}", _put(data, high_at, "<I", high)
            yield f"block {n} interface 7", _put(data, off + 8, "<I" if btype == 6 else "<H", 7)
            for caplen in (0, 1, length, length - 28, 0xFFFFFFFF):
                yield f"block {n} caplen {caplen}", _put(data, off + 20, "<I", caplen)
            # an option whose length runs past the block
            options_at = off + 28 + (struct.unpack_from("<I", data, off + 20)[0] + 3) // 4 * 4
            if options_at + 4 <= off + length - 4:
                for olen in (0xFFFF, length, 3):
                    yield f"block {n} option length {olen}", _put(data, options_at + 2, "<H",
                                                                   olen)
        if btype == 0x0A0D0D0A:
            yield f"section {n} byte order", _put(data, off + 8, "<I", 0x12345678)
            yield f"section {n} big endian", _put(data, off + 8, ">I", 0x4D3C2B1A)


def _pcap_mutants(data: bytes, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    for field_at, name in ((4, "version"), (20, "link type")):
        for value in (0, 1, 3, 0xFFFF):
            yield f"{name} {value}", _put(data, field_at, "<H", value)
    for n, (off, length) in enumerate(records(data)):
        for caplen in (0, 1, 13, length, length - 17, 1 << 24, 0xFFFFFFFF):
            yield f"record {n} caplen {caplen}", _put(data, off + 8, "<I", caplen)
        for sec in (0, 0x7FFFFFFF, 0xFFFFFFFF):
            yield f"record {n} seconds {sec:#x}", _put(data, off, "<I", sec)
        for frac in (999_999, 1_000_000, 0xFFFFFFFF):
            yield f"record {n} fraction {frac}", _put(data, off + 4, "<I", frac)
    yield "nanosecond magic", b"\x4d\x3c\xb2\xa1" + data[4:]


def mutants(path: Path) -> Iterator[tuple[str, bytes]]:
    data = path.read_bytes()
    rng = random.Random(f"{path.name}-11")
    boundaries = {0, len(data)} | {off for off, _length in records(data)}
    if data[:4] != b"\x0a\x0d\x0d\x0a":
        boundaries.add(24)
    for at in sorted(boundaries):
        for delta in (-4, -1, 0, 1, 4, 8, 16, 20):
            if 0 <= at + delta < len(data):
                yield f"cut at {at + delta}", data[:at + delta]
    for _ in range(BIT_FLIPS):
        flipped = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 8))):
            at = rng.randrange(len(flipped))
            flipped[at] ^= 1 << rng.randrange(8)
        yield f"bits flipped {bytes(flipped) != data}", bytes(flipped)
    for _ in range(20):  # a random byte run overwritten
        at = rng.randrange(len(data))
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        yield f"junk at {at}", data[:at] + junk + data[at + len(junk):]
    yield from (_pcapng_mutants(data, rng) if data[:4] == b"\x0a\x0d\x0d\x0a"
                else _pcap_mutants(data, rng))


def test_thousands_of_mutants_exit_0_or_7_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mutant"
    tried, codes = 0, {0: 0, 7: 0}
    for reference in REFERENCE:
        for n, (what, data) in enumerate(mutants(reference)):
            path.write_bytes(data)
            args = ["analyze", "--json", str(path)] if n % 2 else ["analyze", str(path)]
            start = time.monotonic()
            code = main(args)
            elapsed = time.monotonic() - start
            out, err = capsys.readouterr()
            label = f"{reference.name}, {what}: exit {code}, stderr {err!r}"
            assert elapsed < MUTANT_LIMIT_S, f"{label}: {elapsed:.1f} s"
            assert code in (0, 7), label
            assert "Traceback" not in out + err and "internal error" not in err, label
            if n % 2:
                schemas.loads("analyze", out)  # also for a damaged capture (exit 7)
            if code == 7:
                assert err.startswith(f"synprobe: {path}: ") and err.count("\n") == 1, label
            else:
                assert err == "", label
            codes[code] += 1
            tried += 1
    assert tried >= 3000, tried
    assert codes[0] and codes[7], codes  # both kinds of outcome happen


def _epb_at_end(length: int) -> bytes:
    """A valid little-endian pcapng (SHB, IDB) then a packet block of ``length`` bytes."""
    shb = struct.pack("<IIIHHq", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1) + struct.pack("<I", 28)
    idb = struct.pack("<IIHHI", 1, 20, 101, 0, 0) + struct.pack("<I", 20)
    epb = struct.pack("<II", 6, length) + b"\x00" * (length - 12) + struct.pack("<I", length)
    return shb + idb + epb


@pytest.mark.parametrize("length", [12, 16, 20, 24, 28])
def test_a_pcapng_ending_in_a_short_packet_block(tmp_path: Path, length: int,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "short.pcapng"
    path.write_bytes(_epb_at_end(length))
    assert main(["analyze", str(path)]) == 7
    assert capsys.readouterr().err == (f"synprobe: {path}: damaged: block at byte 48 (type "
                                       f"0x6) is {length} bytes, too short for its fields\n")


@pytest.mark.parametrize("resol", [0, 0x80])  # seconds; 2^0 s
def test_a_time_stamp_past_year_9999(tmp_path: Path, resol: int,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = (CAPTURES / "punch.a.pcapng").read_bytes()
    off, length = records(data)[1]
    option = struct.pack("<HHB3x", 9, 1, resol) + struct.pack("<HH", 0, 0)
    body = data[off + 8:off + 16] + option
    idb = struct.pack("<II", 1, 12 + len(body)) + body
    idb += struct.pack("<I", len(idb) + 4)
    path = tmp_path / "seconds.pcapng"
    path.write_bytes(data[:off] + idb + data[off + length:])
    assert main(["analyze", str(path)]) == 7
    err = capsys.readouterr().err
    assert err.startswith(f"synprobe: {path}: damaged: packet 1 at byte ")
    assert "impossible time stamp" in err and err.count("\n") == 1


def test_zeros_are_refused_after_the_first_bytes(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    sparse = tmp_path / "zeros"
    with sparse.open("wb") as f:
        f.truncate(1 << 40)  # 1 TiB of zeros, sparse: reading it all would never end
    for path in (str(sparse), "/dev/zero"):
        start = time.process_time()  # CPU time: reading more than its head would show
        assert main(["analyze", path]) == 7
        assert capsys.readouterr().err == (f"synprobe: {path}: not a pcap or pcapng capture "
                                           "(it starts with bytes 00 00 00 00 00 00 00 00)\n")
        assert time.process_time() - start < 1.0
