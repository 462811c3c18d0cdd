"""A small, strict reader of pcap and pcapng files: TCP segments and the ICMP errors that
quote them, nothing else. Pure code (bytes in, records out), no scapy: it is faster for
this one job and says exactly where a file is damaged.

Formats: pcap (draft-ietf-opsawg-pcap: microsecond and nanosecond magic, either byte
order) and pcapng (draft-ietf-opsawg-pcapng: SHB/IDB/EPB/SPB/obsolete PB, if_tsresol,
opt_comment, several sections). Link types: Ethernet (VLAN tags too), Linux cooked v1
and v2 (tcpdump -i any), raw IP, BSD loopback.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass

# Flag bits of the TCP header (RFC 9293 section 3.1).
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20



def flags_label(flags: int, payload: int = 0) -> str:
    """How the ladder and the capture comments name a segment: "SYN+ACK", "RST",
    "ACK len=5" (an RST is "RST" whatever else is set: it answers or aborts)."""
    if flags & RST:
        return "RST"
    names = [n for bit, n in ((SYN, "SYN"), (FIN, "FIN"), (ACK, "ACK")) if flags & bit]
    text = "+".join(names) or "(no flags)"
    return f"{text} len={payload}" if payload else text


PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D
MAX_RECORD = 1 << 24  # no real capture has a 16 MiB frame: a bigger length means damage

LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2 = 0, 1, 113, 276
LINKTYPES_RAW = {12, 14, 101}
LINKTYPE_IPV4, LINKTYPE_IPV6 = 228, 229
ETH_IPV4, ETH_IPV6, ETH_VLAN = 0x0800, 0x86DD, {0x8100, 0x88A8, 0x9100}

ICMP_ERRORS = {3: "unreachable", 11: "time-exceeded", 12: "parameter-problem"}
ICMP6_ERRORS = {1: "unreachable", 3: "time-exceeded", 4: "parameter-problem"}
# (type, code) -> name: RFC 792 and RFC 1812 (ICMP), RFC 4443 (ICMPv6)
ICMP_NAMES = {
    (3, 0): "net-unreachable", (3, 1): "host-unreachable", (3, 2): "protocol-unreachable",
    (3, 3): "port-unreachable", (3, 4): "fragmentation-needed", (3, 9): "net-prohibited",
    (3, 10): "host-prohibited", (3, 13): "admin-prohibited", (11, 0): "ttl-exceeded",
}
ICMP6_NAMES = {(1, 0): "no-route", (1, 1): "admin-prohibited", (1, 3): "address-unreachable",
               (1, 4): "port-unreachable", (3, 0): "hop-limit-exceeded"}


class CaptureError(ValueError):
    """The file is not a capture, or is damaged (the message says where)."""


@dataclass(frozen=True)
class Segment:
    """One TCP segment as captured."""

    index: int  # 1-based frame number in the file, as Wireshark counts
    time: float  # Unix time
    src: str  # "ip:port" (IPv6 as "[ip]:port")
    dst: str
    flags: int
    seq: int
    ack: int
    payload: int  # bytes of TCP payload (from the IP length, not the captured length)
    ttl: int  # IPv4 TTL or IPv6 hop limit
    comment: str = ""  # pcapng opt_comment, if any

    def has(self, flags: int) -> bool:
        return self.flags & flags == flags


@dataclass(frozen=True)
class IcmpError:
    """An ICMP(v6) error that quotes a TCP header: who it blames and what it quotes."""

    index: int
    time: float
    reporter: str  # IP address of the router/NAT/host that sent the error
    to: str  # IP address it was sent to
    icmp_type: int
    code: int
    quoted_src: str  # the quoted segment's "ip:port"s, as the error carries them
    quoted_dst: str
    quoted_seq: int
    ttl: int
    v6: bool = False
    comment: str = ""


    @property
    def name(self) -> str:
        """"port-unreachable", "admin-prohibited", ... or "type/code"."""
        names = ICMP6_NAMES if self.v6 else ICMP_NAMES
        return names.get((self.icmp_type, self.code), f"{self.icmp_type}/{self.code}")


@dataclass(frozen=True)
class CaptureContents:
    frames: int
    segments: tuple[Segment, ...]
    icmp_errors: tuple[IcmpError, ...]
    linktypes: tuple[int, ...]
    fmt: str  # "pcap" or "pcapng"
    damage: str | None = None  # why reading stopped early; what came before is above


_ENDPOINTS: dict[tuple[bytes, int], str] = {}
_ENDPOINTS_MAX = 1 << 16  # a scan's capture has many: start again rather than grow


def _endpoint(ip: bytes, port: int) -> str:
    text = _ENDPOINTS.get((ip, port))
    if text is None:
        if len(_ENDPOINTS) >= _ENDPOINTS_MAX:
            _ENDPOINTS.clear()
        text = (f"{ip[0]}.{ip[1]}.{ip[2]}.{ip[3]}:{port}" if len(ip) == 4
                else f"[{ipaddress.IPv6Address(ip)}]:{port}")
        _ENDPOINTS[(ip, port)] = text
    return text


def _ip_text(ip: bytes) -> str:
    return str(ipaddress.ip_address(ip))


def _network_offset(linktype: int, frame: bytes) -> tuple[int, int] | None:
    """(offset of the IP header, IP version hint 4/6/0) for a frame, or None if not IP."""
    if linktype == LINKTYPE_ETHERNET:
        if len(frame) < 14:
            return None
        off, ethertype = 12, int.from_bytes(frame[12:14], "big")
        while ethertype in ETH_VLAN and len(frame) >= off + 6:
            off += 4
            ethertype = int.from_bytes(frame[off:off + 2], "big")
        return (off + 2, 4 if ethertype == ETH_IPV4 else 6 if ethertype == ETH_IPV6 else -1)
    if linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            return None
        proto = int.from_bytes(frame[14:16], "big")
        return (16, 4 if proto == ETH_IPV4 else 6 if proto == ETH_IPV6 else -1)
    if linktype == LINKTYPE_LINUX_SLL2:
        if len(frame) < 20:
            return None
        proto = int.from_bytes(frame[0:2], "big")
        return (20, 4 if proto == ETH_IPV4 else 6 if proto == ETH_IPV6 else -1)
    if linktype in LINKTYPES_RAW:
        return (0, 0)
    if linktype == LINKTYPE_IPV4:
        return (0, 4)
    if linktype == LINKTYPE_IPV6:
        return (0, 6)
    if linktype == LINKTYPE_NULL:
        if len(frame) < 4:
            return None
        family = int.from_bytes(frame[:4], "little")  # in the capturing host's order
        if family > 0xFFFF:
            family = int.from_bytes(frame[:4], "big")
        return (4, 4 if family == 2 else 6 if family in (10, 24, 28, 30) else -1)
    return None


def _tcp_header(data: bytes, off: int, end: int) -> tuple[int, int, int, int, int, int] | None:
    """(sport, dport, seq, ack, flags, header length) or None if cut short."""
    if end - off < 20:
        return None
    sport, dport, seq, ack, off_flags = struct.unpack_from("!HHIIH", data, off)
    return sport, dport, seq, ack, off_flags & 0x3F, (off_flags >> 12) * 4


def decode_frame(index: int, time: float, linktype: int, frame: bytes,
                 comment: str = "") -> Segment | IcmpError | None:
    """The TCP segment or ICMP error in one captured frame, or None (anything else)."""
    where = _network_offset(linktype, frame)
    if where is None:
        return None
    off, version = where
    if len(frame) <= off:
        return None
    if version == 0:
        version = frame[off] >> 4
    if version == 4:
        return _decode_ipv4(index, time, frame, off, comment)
    if version == 6:
        return _decode_ipv6(index, time, frame, off, comment)
    return None


def _decode_ipv4(index: int, time: float, frame: bytes, off: int,
                 comment: str) -> Segment | IcmpError | None:
    if len(frame) < off + 20 or frame[off] >> 4 != 4:
        return None
    ihl = (frame[off] & 0x0F) * 4
    total = int.from_bytes(frame[off + 2:off + 4], "big")
    frag = int.from_bytes(frame[off + 6:off + 8], "big") & 0x1FFF
    ttl, proto = frame[off + 8], frame[off + 9]
    src, dst = frame[off + 12:off + 16], frame[off + 16:off + 20]
    if ihl < 20 or frag:
        return None  # a later fragment carries no transport header
    start = off + ihl
    if proto == 6:
        tcp = _tcp_header(frame, start, len(frame))
        if tcp is None:
            return None
        sport, dport, seq, ack, flags, thl = tcp
        payload = max(0, total - ihl - thl) if total else max(0, len(frame) - start - thl)
        return Segment(index, time, _endpoint(src, sport), _endpoint(dst, dport), flags, seq,
                       ack, payload, ttl, comment)
    if proto == 1 and len(frame) >= start + 8 and frame[start] in ICMP_ERRORS:
        return _quoted(index, time, frame, start + 8, _ip_text(src), _ip_text(dst),
                       frame[start], frame[start + 1], ttl, False, comment)
    return None


def _decode_ipv6(index: int, time: float, frame: bytes, off: int,
                 comment: str) -> Segment | IcmpError | None:
    if len(frame) < off + 40 or frame[off] >> 4 != 6:
        return None
    plen = int.from_bytes(frame[off + 4:off + 6], "big")
    proto, hlim = frame[off + 6], frame[off + 7]
    src, dst = frame[off + 8:off + 24], frame[off + 24:off + 40]
    start = off + 40
    if proto == 6:
        tcp = _tcp_header(frame, start, len(frame))
        if tcp is None:
            return None
        sport, dport, seq, ack, flags, thl = tcp
        return Segment(index, time, _endpoint(src, sport), _endpoint(dst, dport), flags, seq,
                       ack, max(0, plen - thl), hlim, comment)
    if proto == 58 and len(frame) >= start + 8 and frame[start] in ICMP6_ERRORS:
        return _quoted(index, time, frame, start + 8, _ip_text(src), _ip_text(dst),
                       frame[start], frame[start + 1], hlim, True, comment)
    return None


def _quoted(index: int, time: float, frame: bytes, inner: int, reporter: str, to: str,
            icmp_type: int, code: int, ttl: int, v6: bool, comment: str) -> IcmpError | None:
    """The TCP header an ICMP error quotes (RFC 792: IP header + at least 8 bytes)."""
    if not v6 and len(frame) >= inner + 20 and frame[inner] >> 4 == 4 and frame[inner + 9] == 6:
        ihl = (frame[inner] & 0x0F) * 4
        src, dst, tcp_at = frame[inner + 12:inner + 16], frame[inner + 16:inner + 20], inner + ihl
    elif v6 and len(frame) >= inner + 40 and frame[inner] >> 4 == 6 and frame[inner + 6] == 6:
        src, dst, tcp_at = frame[inner + 8:inner + 24], frame[inner + 24:inner + 40], inner + 40
    else:
        return None
    if len(frame) < tcp_at + 8:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", frame, tcp_at)
    return IcmpError(index, time, reporter, to, icmp_type, code, _endpoint(src, sport),
                     _endpoint(dst, dport), seq, ttl, v6, comment)


# --- file formats ---------------------------------------------------------------------------

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


def _pcap_frames(data: bytes) -> Iterator[Frame]:
    order, unit = PCAP_MAGICS[data[:4]]
    if len(data) < 24:
        raise CaptureError(f"truncated: the pcap file header needs 24 bytes, the file has "
                           f"{len(data)}")
    major, _minor = struct.unpack_from(order + "HH", data, 4)
    linktype = struct.unpack_from(order + "I", data, 20)[0] & 0xFFFF
    if major != 2:
        raise CaptureError(f"damaged: pcap version {major} (expected 2)")
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
    off, count, order = 0, 0, "<"
    interfaces: list[_Interface] = []
    while off < len(data):
        if off + 12 > len(data):
            raise CaptureError(f"truncated: the file ends inside a block header at byte {off}",
                               count)
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
            count += 1
            yield ((high << 32 | low) * iface.resolution, iface.linktype,
                   data[start:start + caplen], comment)
        elif btype == 3:  # Simple Packet Block: no time stamp, interface 0
            if not interfaces:
                raise CaptureError(f"damaged: packet block at byte {off} before any interface",
                                   count)
            orig = struct.unpack_from(order + "I", data, body)[0]
            count += 1
            frame = data[body + 4:body + 4 + min(orig, end - body - 4)]
            yield 0.0, interfaces[0].linktype, frame, ""
        off += length


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
