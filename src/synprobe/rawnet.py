"""The host's raw-network helpers: which capabilities this process holds (the one
raw-privilege check), sending whole IPv4 or IPv6 packets through a raw socket, and what the
kernel knows about routes, interfaces and a TCP socket's RTT. Linux only."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

from simulsyn_core._internal import sockets

CAP_NET_ADMIN = 12  # linux/capability.h
CAP_NET_RAW = 13
_CAP_NAMES = {CAP_NET_RAW: "CAP_NET_RAW", CAP_NET_ADMIN: "CAP_NET_ADMIN"}
SIOCGIFADDR = 0x8915


def effective_capabilities() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing_capabilities(*caps: int) -> list[str]:
    """Names of the capabilities (of CAP_NET_RAW, CAP_NET_ADMIN) this process lacks: the
    one check before opening a packet socket, a raw socket or touching the firewall."""
    eff = effective_capabilities()
    return [_CAP_NAMES[c] for c in caps if not eff >> c & 1]


def local_ip_towards(remote_ip: str) -> str:
    """The source address the kernel picks for remote_ip (no packet is sent)."""
    with socket.socket(_family(remote_ip), socket.SOCK_DGRAM) as probe:
        probe.connect((remote_ip, 9))
        return str(probe.getsockname()[0])


def interface_of(ip: str) -> str:
    """The interface that holds ip (IPv4: SIOCGIFADDR over every interface; IPv6: the
    kernel's table /proc/net/if_inet6)."""
    if ":" in ip:
        return _interface_of_v6(ip)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR,
                                  struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == ip:
                return name
    raise OSError(f"no interface holds {ip}")


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _interface_of_v6(ip: str, table: str = "/proc/net/if_inet6") -> str:
    wanted = ipaddress.IPv6Address(ip)
    with open(table) as lines:
        for line in lines:
            fields = line.split()
            if len(fields) >= 6 and ipaddress.IPv6Address(int(fields[0], 16)) == wanted:
                return fields[5]
    raise OSError(f"no interface holds {ip}")


def tcp_rtt_s(sock: socket.socket) -> float:
    """The kernel's smoothed RTT of a connected TCP socket (0.0 if unknown)."""
    known = sockets.tcp_rtt(sock)
    return known[0] if known else 0.0


def destination(pkt: bytes) -> str:
    """The destination address of a whole IPv4 or IPv6 packet (pure), as Endpoint writes
    it (IPv6 compressed)."""
    if pkt[0] >> 4 == 6:
        return str(ipaddress.IPv6Address(pkt[24:40]))
    return socket.inet_ntoa(pkt[16:20])


def send_packets(packets: list[bytes]) -> int:
    """Send whole IPv4 or IPv6 packets (header included; the version nibble says which)
    through raw sockets. CAP_NET_RAW. An AF_INET6 IPPROTO_RAW socket takes the IPv6
    header as given (Linux's IPV6_HDRINCL, on by default for IPPROTO_RAW)."""
    by_family: dict[int, socket.socket] = {}
    try:
        for pkt in packets:
            version = pkt[0] >> 4
            if version not in by_family:
                family = socket.AF_INET6 if version == 6 else socket.AF_INET
                by_family[version] = socket.socket(family, socket.SOCK_RAW,
                                                   socket.IPPROTO_RAW)
            by_family[version].sendto(pkt, (destination(pkt), 0))
    finally:
        for raw in by_family.values():
            raw.close()
    return len(packets)
