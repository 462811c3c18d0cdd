"""Captured packets as small frozen records, and the pcap format (pure; no scapy).

``parse_frame`` turns one captured Ethernet (or raw IPv4) frame into a ``Seen`` that the
classifiers read. ICMP errors carry the quoted header of the packet they answer
(RFC 792), parsed into ``inner_*`` so a classifier can tell which probe they answer.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
ETH_P_IP = 0x0800

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED = 3, 11

_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")
PCAP_MAGIC = 0xA1B2C3D4
PCAP_SNAPLEN = 262144


@dataclass(frozen=True)
class Seen:
    """One IPv4 TCP or ICMP packet as a probe sees it."""

    t: float  # capture time (seconds; time.time())
    outgoing: bool  # sent by this host (AF_PACKET PACKET_OUTGOING)
    src: str
    dst: str
    ttl: int
    proto: int  # 6 TCP, 1 ICMP
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
        return self.proto == 6 and self.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN

    @property
    def is_rst(self) -> bool:
        return self.proto == 6 and bool(self.flags & TCP_RST)

    @property
    def is_icmp_error(self) -> bool:
        return self.proto == 1 and self.icmp_type in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED)


def _ip(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw))


def parse_ipv4(data: bytes, t: float = 0.0, outgoing: bool = False) -> Seen | None:
    """Parse an IPv4 packet; None for anything that is not TCP or ICMP over IPv4."""
    if len(data) < 20 or data[0] >> 4 != 4:
        return None
    ihl = (data[0] & 0x0F) * 4
    proto = data[9]
    ttl = data[8]
    src, dst = _ip(data[12:16]), _ip(data[16:20])
    body = data[ihl:]
    if proto == 6 and len(body) >= 14:
        sport, dport, seq = struct.unpack_from("!HHI", body)
        return Seen(t, outgoing, src, dst, ttl, 6, sport, dport, body[13], seq)
    if proto == 1 and len(body) >= 8:
        itype, icode = body[0], body[1]
        inner = parse_ipv4(body[8:]) if itype in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED) else None
        if inner is None and len(body) >= 28 and itype in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED):
            # A quote of 20 + 8 bytes is enough for the addresses and ports (RFC 792).
            q = body[8:]
            if q[0] >> 4 == 4:
                qihl = (q[0] & 0x0F) * 4
                ports = q[qihl:qihl + 4]
                sp, dp = struct.unpack("!HH", ports) if len(ports) == 4 else (0, 0)
                return Seen(t, outgoing, src, dst, ttl, 1, icmp_type=itype, icmp_code=icode,
                            inner_src=_ip(q[12:16]), inner_dst=_ip(q[16:20]),
                            inner_sport=sp, inner_dport=dp)
        if inner is not None:
            return Seen(t, outgoing, src, dst, ttl, 1, icmp_type=itype, icmp_code=icode,
                        inner_src=inner.src, inner_dst=inner.dst, inner_sport=inner.sport,
                        inner_dport=inner.dport)
        return Seen(t, outgoing, src, dst, ttl, 1, icmp_type=itype, icmp_code=icode)
    return None


def parse_frame(frame: bytes, linktype: int = LINKTYPE_ETHERNET, t: float = 0.0,
                outgoing: bool = False) -> Seen | None:
    if linktype == LINKTYPE_RAW:
        return parse_ipv4(frame, t, outgoing)
    if len(frame) < 14:
        return None
    offset = 12
    ethertype = struct.unpack_from("!H", frame, offset)[0]
    if ethertype == 0x8100 and len(frame) >= 18:  # one VLAN tag
        offset += 4
        ethertype = struct.unpack_from("!H", frame, offset)[0]
    if ethertype != ETH_P_IP:
        return None
    return parse_ipv4(frame[offset + 2:], t, outgoing)


# --- pcap (the classic libpcap format; tshark and tcpdump read it) ----------------------

def pcap_header(linktype: int = LINKTYPE_ETHERNET) -> bytes:
    return _PCAP_HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, PCAP_SNAPLEN, linktype)


def pcap_record(t: float, frame: bytes) -> bytes:
    sec = int(t)
    usec = min(999999, int(round((t - sec) * 1e6)))
    return _PCAP_RECORD.pack(sec, usec, len(frame), len(frame)) + frame


def write_pcap(path: str, frames: Iterable[tuple[float, bytes]],
               linktype: int = LINKTYPE_ETHERNET) -> int:
    count = 0
    with open(path, "wb") as out:
        out.write(pcap_header(linktype))
        for t, frame in frames:
            out.write(pcap_record(t, frame))
            count += 1
    return count


def read_pcap(data: bytes) -> tuple[int, Iterator[tuple[float, bytes]]]:
    """(linktype, frames) of a classic pcap. Raises ValueError if it is not one."""
    if len(data) < _PCAP_HEADER.size:
        raise ValueError("not a pcap file: too short")
    magic = struct.unpack_from("<I", data)[0]
    if magic == PCAP_MAGIC:
        endian, nano = "<", False
    elif magic == 0xD4C3B2A1:
        endian, nano = ">", False
    elif magic == 0xA1B23C4D:
        endian, nano = "<", True
    else:
        raise ValueError(f"not a pcap file: magic {magic:#x}")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]

    def frames() -> Iterator[tuple[float, bytes]]:
        off = _PCAP_HEADER.size
        rec = struct.Struct(endian + "IIII")
        while off + rec.size <= len(data):
            sec, frac, incl, _orig = rec.unpack_from(data, off)
            off += rec.size
            yield sec + frac / (1e9 if nano else 1e6), data[off:off + incl]
            off += incl

    return linktype, frames()


def seen_from_pcap(data: bytes, local_ips: Iterable[str] = ()) -> list[Seen]:
    """Every TCP/ICMP packet of a pcap; ``outgoing`` is set from the host's addresses."""
    mine = set(local_ips)
    linktype, frames = read_pcap(data)
    out = []
    for t, frame in frames:
        seen = parse_frame(frame, linktype, t)
        if seen is not None:
            if seen.src in mine:
                seen = Seen(**{**seen.__dict__, "outgoing": True})
            out.append(seen)
    return out
