"""nat-check's view of a captured packet: ``Seen``, a small frozen record of one TCP
segment or ICMP(v6) error (IPv4 or IPv6), made from what the one decoder
(``decode.decode_frame``) returns.
The classifiers read lists of these, from a live capture or from a capture file."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from .decode import (
    ACK,
    ICMP6_DEST_UNREACH,
    ICMP6_TIME_EXCEEDED,
    ICMP_DEST_UNREACH,
    ICMP_TIME_EXCEEDED,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    LINKTYPE_ETHERNET,
    RST,
    SYN,
    IcmpError,
    Segment,
    decode_frame,
)
from .reader import iter_frames


@dataclass(frozen=True)
class Seen:
    """One TCP segment or ICMP(v6) error as a probe sees it (addresses without brackets;
    an ICMPv6 error keeps its own type and code, proto 58)."""

    t: float  # capture time (seconds; Unix time)
    outgoing: bool  # sent by this host (AF_PACKET PACKET_OUTGOING)
    src: str
    dst: str
    ttl: int
    proto: int  # 6 TCP, 1 ICMP, 58 ICMPv6
    sport: int = 0
    dport: int = 0
    flags: int = 0  # TCP flags
    seq: int = 0
    icmp_type: int = -1
    icmp_code: int = -1
    inner_src: str = ""  # ICMP errors: the quoted packet
    inner_dst: str = ""
    inner_sport: int = 0
    inner_dport: int = 0

    @property
    def is_syn(self) -> bool:
        return self.proto == IPPROTO_TCP and self.flags & (SYN | ACK | RST) == SYN

    @property
    def is_rst(self) -> bool:
        return self.proto == IPPROTO_TCP and bool(self.flags & RST)

    @property
    def is_icmp_error(self) -> bool:
        return self.is_unreachable or self.is_time_exceeded

    @property
    def is_unreachable(self) -> bool:
        """ICMP destination unreachable (type 3) or ICMPv6's (type 1)."""
        return (self.proto, self.icmp_type) in ((IPPROTO_ICMP, ICMP_DEST_UNREACH),
                                                (IPPROTO_ICMPV6, ICMP6_DEST_UNREACH))

    @property
    def is_time_exceeded(self) -> bool:
        """ICMP time exceeded (type 11) or ICMPv6's (type 3): a hop limit ran out."""
        return (self.proto, self.icmp_type) in ((IPPROTO_ICMP, ICMP_TIME_EXCEEDED),
                                                (IPPROTO_ICMPV6, ICMP6_TIME_EXCEEDED))


def _split(endpoint: str) -> tuple[str, int]:
    ip, _, port = endpoint.rpartition(":")
    return ip.removeprefix("[").removesuffix("]"), int(port)


def seen_of(record: Segment | IcmpError | None, t: float, outgoing: bool) -> Seen | None:
    """nat-check's view of a decoded packet (None for anything else)."""
    if isinstance(record, Segment):
        (src, sport), (dst, dport) = _split(record.src), _split(record.dst)
        return Seen(t, outgoing, src, dst, record.ttl, IPPROTO_TCP, sport, dport, record.flags,
                    record.seq)
    if isinstance(record, IcmpError):
        (inner_src, inner_sport) = _split(record.quoted_src)
        (inner_dst, inner_dport) = _split(record.quoted_dst)
        return Seen(t, outgoing, record.reporter, record.to, record.ttl,
                    IPPROTO_ICMPV6 if record.v6 else IPPROTO_ICMP,
                    icmp_type=record.icmp_type, icmp_code=record.code, inner_src=inner_src,
                    inner_dst=inner_dst, inner_sport=inner_sport, inner_dport=inner_dport)
    return None


def parse_frame(frame: bytes, linktype: int = LINKTYPE_ETHERNET, t: float = 0.0,
                outgoing: bool = False) -> Seen | None:
    """The ``Seen`` of one captured frame, or None if it is no TCP segment or ICMP(v6) error."""
    return seen_of(decode_frame(0, t, linktype, frame), t, outgoing)


def seen_from_pcap(data: bytes, local_ips: Iterable[str] = ()) -> list[Seen]:
    """Every packet of a capture file as ``Seen``; ``outgoing`` is set from the host's
    addresses. Raises CaptureError (a ValueError) on a damaged file."""
    mine = set(local_ips)
    out = []
    for t, linktype, frame, _comment in iter_frames(data):
        seen = parse_frame(frame, linktype, t)
        if seen is not None:
            if seen.src in mine:
                seen = dataclasses.replace(seen, outgoing=True)
            out.append(seen)
    return out
