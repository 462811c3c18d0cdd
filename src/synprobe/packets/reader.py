"""The one reader of capture files: pcap and pcapng in, frames out. Strict: it says
exactly where a file is damaged. Pure code, no scapy.

Formats: pcap (draft-ietf-opsawg-pcap: microsecond and nanosecond magic, either byte
order) and pcapng (draft-ietf-opsawg-pcapng: SHB/IDB/EPB/SPB/obsolete PB, if_tsresol,
opt_comment, several sections). ``read_capture`` decodes a whole file with the one
decoder (``decode.decode_frame``).

Streamed: a file is read one record at a time (never more than ``MAX_RECORD`` bytes at
once), and its first bytes are checked before anything else is read, so a file that is
not a capture (or /dev/zero) is refused after its first 8 bytes.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .decode import IcmpError, Segment, decode_frame

PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D
MAX_RECORD = 1 << 24  # no real capture has a 16 MiB frame: a bigger length means damage
# A time stamp at or past 9999-12-31T23:59:59Z (Python's datetime ends with year 9999) is
# damage: no capture was taken then.
MAX_TIME = 253402300799.0
# The smallest pcapng blocks that hold what is read of them (header and trailer included).
MIN_BLOCK = {1: 20, 2: 32, 3: 16, 6: 32}


class CaptureError(ValueError):
    """The file is not a capture, or is damaged (the message, one line, says where)."""


Frame = tuple[float, int, bytes, str]  # (Unix time, link type, frame bytes, comment)
Source = bytes | bytearray | memoryview | BinaryIO


class _Input:
    """A binary stream read in exact counts, with the offset of the next byte."""

    def __init__(self, source: Source) -> None:
        self.stream: BinaryIO = (io.BytesIO(bytes(source))
                                 if isinstance(source, (bytes, bytearray, memoryview))
                                 else source)
        self.offset = 0

    def read(self, count: int) -> bytes:
        """Up to ``count`` bytes: fewer only at the end of the file."""
        parts: list[bytes] = []
        wanted = count
        try:
            while wanted > 0:
                chunk = self.stream.read(wanted)
                if not chunk:
                    break
                parts.append(chunk)
                wanted -= len(chunk)
        except OSError as exc:
            raise CaptureError(f"cannot read it at byte {self.offset + count - wanted}: "
                               f"{exc.strerror or exc}") from None
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.offset += len(data)
        return data


def _format_of(head: bytes) -> str:
    """"pcap" or "pcapng" from a file's first bytes; CaptureError if neither."""
    if len(head) == 0:
        raise CaptureError("empty file (0 bytes): not a pcap or pcapng capture")
    if head[:4] in PCAP_MAGICS:
        return "pcap"
    if len(head) >= 4 and int.from_bytes(head[:4], "little") == PCAPNG_SHB:
        return "pcapng"
    raise CaptureError(f"not a pcap or pcapng capture (it starts with bytes "
                       f"{head[:8].hex(' ')})")


class FrameReader:
    """The frames of a pcap or pcapng file or stream, read as they are asked for.

    ``fmt`` is known once the first frame is asked for (or the file refused)."""

    def __init__(self, source: Source) -> None:
        self._input = _Input(source)
        self.fmt = "pcap"

    def __iter__(self) -> Iterator[Frame]:
        head = self._input.read(8)
        self.fmt = _format_of(head)
        if self.fmt == "pcap":
            yield from _pcap_frames(self._input, head)
        else:
            yield from _pcapng_frames(self._input, head)


def iter_frames(data: Source) -> Iterator[Frame]:
    """Every frame of a pcap or pcapng file (its bytes, or a binary stream). Raises
    CaptureError on anything malformed."""
    return iter(FrameReader(data))


def read_pcap(data: bytes) -> tuple[int, Iterator[tuple[float, bytes]]]:
    """(link type, (time, frame) pairs) of a classic pcap file, such as nat-check writes.
    Raises CaptureError (a ValueError) if it is not one, or is damaged."""
    if data[:4] not in PCAP_MAGICS:
        raise CaptureError(f"not a pcap capture (it starts with bytes {data[:8].hex(' ')})")
    _order, _unit, linktype = _pcap_header(data[:24], len(data))
    source = _Input(data)
    head = source.read(8)
    return linktype, ((time, frame) for time, _link, frame, _note in _pcap_frames(source, head))


def _pcap_header(header: bytes, size: int) -> tuple[str, float, int]:
    """(byte order, time unit, link type) of a classic pcap file from its first 24 bytes
    (``size``: how many the file has, if fewer)."""
    order, unit = PCAP_MAGICS[header[:4]]
    if len(header) < 24:
        raise CaptureError(f"truncated: the pcap file header needs 24 bytes, the file has "
                           f"{size}")
    major, _minor = struct.unpack_from(order + "HH", header, 4)
    linktype = struct.unpack_from(order + "I", header, 20)[0] & 0xFFFF
    if major != 2:
        raise CaptureError(f"damaged: pcap version {major} (expected 2)")
    return order, unit, linktype


def _checked_time(time: float, packet: int, off: int) -> float:
    if not 0.0 <= time < MAX_TIME:
        raise CaptureError(f"damaged: packet {packet} at byte {off} has an impossible time "
                           f"stamp ({time:.6g} s after 1970, past the year 9999)")
    return time


def _pcap_frames(source: _Input, head: bytes) -> Iterator[Frame]:
    header = head + source.read(24 - len(head))
    order, unit, linktype = _pcap_header(header, len(header))
    record = struct.Struct(order + "IIII")
    count = 0
    while True:
        off = source.offset
        raw = source.read(16)
        if not raw:
            return
        if len(raw) < 16:
            raise CaptureError(f"truncated: the file ends inside the header of packet "
                               f"{count + 1} (byte {off})")
        sec, frac, caplen, _origlen = record.unpack(raw)
        if caplen > MAX_RECORD or (unit == 1e-6 and frac >= 1_000_000):
            raise CaptureError(f"damaged: packet {count + 1} at byte {off} has an impossible "
                               f"header (length {caplen}, fraction {frac})")
        frame = source.read(caplen)
        if len(frame) < caplen:
            raise CaptureError(f"truncated: the file ends inside packet {count + 1} "
                               f"(byte {off}: {caplen} bytes announced, "
                               f"{len(frame)} present)")
        count += 1
        yield _checked_time(sec + frac * unit, count, off), linktype, frame, ""


@dataclass(frozen=True)
class _Interface:
    linktype: int
    resolution: float


def _tsresol(value: int) -> float:
    return 2.0 ** -(value & 0x7F) if value & 0x80 else 10.0 ** -value


def _options(data: bytes, off: int, end: int, order: str) -> Iterator[tuple[int, bytes]]:
    while off + 4 <= end:
        code, length = struct.unpack_from(order + "HH", data, off)
        if code == 0:
            return
        value = data[off + 4:off + 4 + length]
        if len(value) < length:
            return
        yield code, value
        off += 4 + (length + 3) // 4 * 4


def _pcapng_frames(source: _Input, head: bytes) -> Iterator[Frame]:
    order = "<"
    interfaces: list[_Interface] = []
    count = 0
    pending = head  # bytes already read of the next block
    while True:
        off = source.offset - len(pending)
        start = pending + source.read(12 - len(pending))
        pending = b""
        if not start:
            return
        if len(start) < 12:
            raise CaptureError(f"truncated: the file ends inside a block header at byte {off}")
        btype = struct.unpack_from(order + "I", start)[0]
        if btype == PCAPNG_SHB:
            bom = start[8:12]
            if bom == b"\x4d\x3c\x2b\x1a":
                order = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                order = ">"
            else:
                raise CaptureError(f"damaged: section header at byte {off} has no valid "
                                   "byte-order magic")
            interfaces = []
        length = struct.unpack_from(order + "I", start, 4)[0]
        if length < 12 or length % 4 or length > MAX_RECORD:
            raise CaptureError(f"damaged: block at byte {off} (type {btype:#x}) claims length "
                               f"{length}")
        rest = source.read(length - 12)
        if len(rest) < length - 12:
            raise CaptureError(f"truncated: the file ends inside a block at byte {off} "
                               f"({length} bytes announced, {12 + len(rest)} present)")
        data = start + rest
        if struct.unpack_from(order + "I", data, length - 4)[0] != length:
            raise CaptureError(f"damaged: block at byte {off} has mismatched lengths")
        if length < MIN_BLOCK.get(btype, 12):
            raise CaptureError(f"damaged: block at byte {off} (type {btype:#x}) is {length} "
                               f"bytes, too short for its fields")
        body, end = 8, length - 4
        if btype == 1:  # Interface Description Block
            linktype = struct.unpack_from(order + "H", data, body)[0]
            resolution = 1e-6
            for code, value in _options(data, body + 8, end, order):
                if code == 9 and value:
                    resolution = _tsresol(value[0])
            interfaces.append(_Interface(linktype, resolution))
        elif btype in (6, 2):  # Enhanced Packet Block, obsolete Packet Block
            if btype == 6:
                if_id, high, low, caplen, _orig = struct.unpack_from(order + "IIIII", data, body)
            else:
                if_id, _drops, high, low, caplen, _orig = struct.unpack_from(
                    order + "HHIIII", data, body)
            first = body + 20
            if if_id >= len(interfaces) or first + caplen > end:
                raise CaptureError(f"damaged: packet block at byte {off} names interface "
                                   f"{if_id} or overruns its block")
            iface = interfaces[if_id]
            comment = ""
            for code, value in _options(data, first + (caplen + 3) // 4 * 4, end, order):
                if code == 1:
                    comment = value.decode("utf-8", "replace")
            count += 1
            yield (_checked_time((high << 32 | low) * iface.resolution, count, off),
                   iface.linktype, data[first:first + caplen], comment)
        elif btype == 3:  # Simple Packet Block: no time stamp, interface 0
            if not interfaces:
                raise CaptureError(f"damaged: packet block at byte {off} before any interface")
            orig = struct.unpack_from(order + "I", data, body)[0]
            count += 1
            frame = data[body + 4:body + 4 + min(orig, end - body - 4)]
            yield 0.0, interfaces[0].linktype, frame, ""


@dataclass(frozen=True)
class CaptureContents:
    frames: int
    segments: tuple[Segment, ...]
    icmp_errors: tuple[IcmpError, ...]
    linktypes: tuple[int, ...]
    fmt: str  # "pcap" or "pcapng"
    damage: str | None = None  # why reading stopped early; what came before is above


def read_capture(data: Source) -> CaptureContents:
    """Decode a whole capture (its bytes, or a binary stream read as it goes); on damage,
    what came before it and ``damage`` set."""
    segments: list[Segment] = []
    icmp: list[IcmpError] = []
    linktypes: set[int] = set()
    frames = 0
    damage: str | None = None
    reader = FrameReader(data)
    try:
        for time, linktype, frame, comment in reader:
            frames += 1
            linktypes.add(linktype)
            record = decode_frame(frames, time, linktype, frame, comment)
            if isinstance(record, Segment):
                segments.append(record)
            elif isinstance(record, IcmpError):
                icmp.append(record)
    except CaptureError as exc:
        damage = str(exc)
    return CaptureContents(frames, tuple(segments), tuple(icmp), tuple(sorted(linktypes)),
                           reader.fmt, damage)
