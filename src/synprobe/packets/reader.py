"""The one reader of capture files: pcap and pcapng in, frames out. Strict: it says
exactly where a file is damaged. Pure code, no scapy.

Formats: pcap (draft-ietf-opsawg-pcap: microsecond and nanosecond magic, either byte
order) and pcapng (draft-ietf-opsawg-pcapng: SHB/IDB/EPB/SPB/obsolete PB, if_tsresol,
opt_comment, several sections). ``read_capture`` decodes a whole file with the one
decoder (``decode.decode_frame``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .decode import IcmpError, Segment, decode_frame

PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D
MAX_RECORD = 1 << 24  # no real capture has a 16 MiB frame: a bigger length means damage


class CaptureError(ValueError):
    """The file is not a capture, or is damaged (the message, one line, says where)."""


Frame = tuple[float, int, bytes, str]  # (Unix time, link type, frame bytes, comment)


def iter_frames(data: bytes) -> Iterator[Frame]:
    """Every frame of a pcap or pcapng file. Raises CaptureError on anything malformed."""
    if len(data) == 0:
        raise CaptureError("empty file (0 bytes): not a pcap or pcapng capture")
    head = data[:4]
    if head in PCAP_MAGICS:
        yield from _pcap_frames(data)
    elif len(data) >= 4 and int.from_bytes(head, "little") == PCAPNG_SHB:
        yield from _pcapng_frames(data)
    else:
        raise CaptureError(f"not a pcap or pcapng capture (it starts with bytes "
                           f"{data[:8].hex(' ')})")


def read_pcap(data: bytes) -> tuple[int, Iterator[tuple[float, bytes]]]:
    """(link type, (time, frame) pairs) of a classic pcap file, such as nat-check writes.
    Raises CaptureError (a ValueError) if it is not one, or is damaged."""
    if data[:4] not in PCAP_MAGICS:
        raise CaptureError(f"not a pcap capture (it starts with bytes {data[:8].hex(' ')})")
    _order, _unit, linktype = _pcap_header(data)
    return linktype, ((time, frame) for time, _link, frame, _note in _pcap_frames(data))


def _pcap_header(data: bytes) -> tuple[str, float, int]:
    """(byte order, time unit, link type) of a classic pcap file."""
    order, unit = PCAP_MAGICS[data[:4]]
    if len(data) < 24:
        raise CaptureError(f"truncated: the pcap file header needs 24 bytes, the file has "
                           f"{len(data)}")
    major, _minor = struct.unpack_from(order + "HH", data, 4)
    linktype = struct.unpack_from(order + "I", data, 20)[0] & 0xFFFF
    if major != 2:
        raise CaptureError(f"damaged: pcap version {major} (expected 2)")
    return order, unit, linktype


def _pcap_frames(data: bytes) -> Iterator[Frame]:
    order, unit, linktype = _pcap_header(data)
    record = struct.Struct(order + "IIII")
    off, count = 24, 0
    while off < len(data):
        if off + 16 > len(data):
            raise CaptureError(f"truncated: the file ends inside the header of packet "
                               f"{count + 1} (byte {off})")
        sec, frac, caplen, _origlen = record.unpack_from(data, off)
        if caplen > MAX_RECORD or (unit == 1e-6 and frac >= 1_000_000):
            raise CaptureError(f"damaged: packet {count + 1} at byte {off} has an impossible "
                               f"header (length {caplen}, fraction {frac})")
        if off + 16 + caplen > len(data):
            raise CaptureError(f"truncated: the file ends inside packet {count + 1} "
                               f"(byte {off}: {caplen} bytes announced, "
                               f"{len(data) - off - 16} present)")
        count += 1
        yield sec + frac * unit, linktype, data[off + 16:off + 16 + caplen], ""
        off += 16 + caplen


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


def _pcapng_frames(data: bytes) -> Iterator[Frame]:
    off, order = 0, "<"
    interfaces: list[_Interface] = []
    while off < len(data):
        if off + 12 > len(data):
            raise CaptureError(f"truncated: the file ends inside a block header at byte {off}")
        btype = struct.unpack_from(order + "I", data, off)[0]
        if btype == PCAPNG_SHB:
            bom = data[off + 8:off + 12]
            if bom == b"\x4d\x3c\x2b\x1a":
                order = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                order = ">"
            else:
                raise CaptureError(f"damaged: section header at byte {off} has no valid "
                                   "byte-order magic")
            interfaces = []
        length = struct.unpack_from(order + "I", data, off + 4)[0]
        if length < 12 or length % 4 or length > MAX_RECORD:
            raise CaptureError(f"damaged: block at byte {off} (type {btype:#x}) claims length "
                               f"{length}")
        if off + length > len(data):
            raise CaptureError(f"truncated: the file ends inside a block at byte {off} "
                               f"({length} bytes announced, {len(data) - off} present)")
        if struct.unpack_from(order + "I", data, off + length - 4)[0] != length:
            raise CaptureError(f"damaged: block at byte {off} has mismatched lengths")
        body, end = off + 8, off + length - 4
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
            start = body + 20
            if if_id >= len(interfaces) or start + caplen > end:
                raise CaptureError(f"damaged: packet block at byte {off} names interface "
                                   f"{if_id} or overruns its block")
            iface = interfaces[if_id]
            comment = ""
            for code, value in _options(data, start + (caplen + 3) // 4 * 4, end, order):
                if code == 1:
                    comment = value.decode("utf-8", "replace")
            yield ((high << 32 | low) * iface.resolution, iface.linktype,
                   data[start:start + caplen], comment)
        elif btype == 3:  # Simple Packet Block: no time stamp, interface 0
            if not interfaces:
                raise CaptureError(f"damaged: packet block at byte {off} before any interface")
            orig = struct.unpack_from(order + "I", data, body)[0]
            frame = data[body + 4:body + 4 + min(orig, end - body - 4)]
            yield 0.0, interfaces[0].linktype, frame, ""
        off += length


@dataclass(frozen=True)
class CaptureContents:
    frames: int
    segments: tuple[Segment, ...]
    icmp_errors: tuple[IcmpError, ...]
    linktypes: tuple[int, ...]
    fmt: str  # "pcap" or "pcapng"
    damage: str | None = None  # why reading stopped early; what came before is above


def read_capture(data: bytes) -> CaptureContents:
    """Decode a whole capture; on damage, what came before it and ``damage`` set."""
    segments: list[Segment] = []
    icmp: list[IcmpError] = []
    linktypes: set[int] = set()
    frames = 0
    damage: str | None = None
    try:
        for time, linktype, frame, comment in iter_frames(data):
            frames += 1
            linktypes.add(linktype)
            record = decode_frame(frames, time, linktype, frame, comment)
            if isinstance(record, Segment):
                segments.append(record)
            elif isinstance(record, IcmpError):
                icmp.append(record)
    except CaptureError as exc:
        damage = str(exc)
    fmt = "pcapng" if data[:4] == PCAPNG_SHB.to_bytes(4, "little") else "pcap"
    return CaptureContents(frames, tuple(segments), tuple(icmp), tuple(sorted(linktypes)), fmt,
                           damage)
