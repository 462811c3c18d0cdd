"""Crafting probe packets with scapy (imported here, on first use only)."""

from __future__ import annotations

import threading
from typing import Any

SYN_WINDOW = 64240
SYN_MSS = 1460

_lock = threading.Lock()
_scapy: dict[str, Any] = {}


def load_scapy() -> dict[str, Any]:
    """Import the few scapy layers we need (about 0.7 s; callers may do it in a thread)."""
    with _lock:
        if not _scapy:
            from scapy.layers.inet import ICMP, IP, TCP
            from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6

            _scapy.update(IP=IP, TCP=TCP, ICMP=ICMP, IPv6=IPv6,
                          ICMPv6DestUnreach=ICMPv6DestUnreach)
    return _scapy


_preloads: list[threading.Thread] = []


def preload_in_background() -> threading.Thread:
    thread = threading.Thread(target=load_scapy, name="scapy-import", daemon=True)
    thread.start()
    _preloads.append(thread)
    return thread


def wait_preload(timeout_s: float) -> None:
    """Join the import threads (bounded): a daemon thread still inside an import when the
    interpreter exits aborts the process ("FATAL: exception not rethrown")."""
    for thread in list(_preloads):
        thread.join(timeout_s)


def syn(src: str, dst: str, sport: int, dport: int, seq: int, ttl: int = 64) -> bytes:
    """One TCP SYN as an IPv4 or IPv6 packet (by ``dst``; header included, checksums
    filled in); over IPv6 ``ttl`` is the hop limit."""
    s = load_scapy()
    network = (s["IPv6"](src=src, dst=dst, hlim=ttl) if ":" in dst
               else s["IP"](src=src, dst=dst, ttl=ttl, id=seq & 0xFFFF))
    pkt = network / s["TCP"](
        sport=sport, dport=dport, flags="S", seq=seq, window=SYN_WINDOW,
        options=[("MSS", SYN_MSS)])
    return bytes(pkt)


def icmp_port_unreachable(src: str, dst: str, quoted: bytes) -> bytes:
    """A destination unreachable, port unreachable, as a host would send it: ICMP type 3
    code 3 quoting the IP header and first 8 bytes of ``quoted`` (RFC 792), or to an IPv6
    ``dst`` ICMPv6 type 1 code 4 quoting the whole (small) packet (RFC 4443 3.1)."""
    s = load_scapy()
    if ":" in dst:
        return bytes(s["IPv6"](src=src, dst=dst) / s["ICMPv6DestUnreach"](code=4)
                     / quoted[:1232])
    header_len = (quoted[0] & 0x0F) * 4
    pkt = s["IP"](src=src, dst=dst) / s["ICMP"](type=3, code=3) / quoted[:header_len + 8]
    return bytes(pkt)
