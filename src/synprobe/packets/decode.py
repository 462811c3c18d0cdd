"""The one frame decoder: a captured frame in, the TCP segment or the ICMP error that
quotes one out, nothing else. Pure code (bytes in, records out), no scapy: it is faster
for this one job than a general dissector.

Link types: Ethernet (VLAN tags too), Linux cooked v1 and v2 (tcpdump -i any, a cooked
packet socket), raw IP, BSD loopback; IPv4 and IPv6. ICMP errors carry the header of the
packet they answer (RFC 792, RFC 4443): ``IcmpError`` holds the quoted endpoints, so a
reader can tell which segment an error is about.
"""

from __future__ import annotations

import ipaddress
import struct
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


LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2 = 0, 1, 113, 276
LINKTYPE_RAW = 101
LINKTYPES_RAW = {12, 14, LINKTYPE_RAW}
LINKTYPE_IPV4, LINKTYPE_IPV6 = 228, 229
ETH_IPV4, ETH_IPV6, ETH_VLAN = 0x0800, 0x86DD, {0x8100, 0x88A8, 0x9100}

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_ICMPV6 = 1, 6, 58
ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED, ICMP_PARAMETER_PROBLEM = 3, 11, 12
ICMP_ERRORS = {ICMP_DEST_UNREACH: "unreachable", ICMP_TIME_EXCEEDED: "time-exceeded",
               ICMP_PARAMETER_PROBLEM: "parameter-problem"}
ICMP6_DEST_UNREACH, ICMP6_TIME_EXCEEDED = 1, 3  # RFC 4443 section 3
ICMP6_ERRORS = {1: "unreachable", 3: "time-exceeded", 4: "parameter-problem"}
# (type, code) -> name: RFC 792 and RFC 1812 (ICMP), RFC 4443 (ICMPv6)
ICMP_NAMES = {
    (3, 0): "net-unreachable", (3, 1): "host-unreachable", (3, 2): "protocol-unreachable",
    (3, 3): "port-unreachable", (3, 4): "fragmentation-needed", (3, 9): "net-prohibited",
    (3, 10): "host-prohibited", (3, 13): "admin-prohibited", (11, 0): "ttl-exceeded",
}
ICMP6_NAMES = {(1, 0): "no-route", (1, 1): "admin-prohibited", (1, 3): "address-unreachable",
               (1, 4): "port-unreachable", (3, 0): "hop-limit-exceeded"}


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
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


_ENDPOINTS: dict[tuple[bytes, int], str] = {}
_ENDPOINTS_MAX = 1 << 12  # a scan's capture has many: start again rather than grow


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


