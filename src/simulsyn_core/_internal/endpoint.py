"""Endpoints as the user types them ("ip:port", "[ipv6]:port") and as the wire carries
them. An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 peer) is kept as
the IPv4 address it stands for."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from .numbers import parse_port


@dataclass(frozen=True, order=True)
class Endpoint:
    ip: str
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    @property
    def is_v6(self) -> bool:
        return ":" in self.ip

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if self.is_v6 else socket.AF_INET

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self.ip, self.port)

    @classmethod
    def parse(cls, text: str, *, default_port: int | None = None, allow_zero_port: bool = False
              ) -> Endpoint:
        """Parse "ip:port" or "[ipv6]:port" (or the address alone when default_port is
        given). Raises ValueError."""
        text = text.strip()
        if not text:
            raise ValueError("empty address")
        host, port_text = split_host_port(text, default_port)
        try:
            ip = ip_of(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
        try:
            port = parse_port(port_text, allow_zero=allow_zero_port)
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        return cls(ip, port)

    @classmethod
    def from_sockaddr(cls, addr: tuple[str, int] | tuple[str, int, int, int]) -> Endpoint:
        return cls(ip_of(str(addr[0]).split("%", 1)[0]), int(addr[1]))


def ip_of(host: str) -> str:
    """The canonical text of an IPv4 or IPv6 address (IPv4-mapped IPv6 as IPv4).
    Raises ValueError."""
    if not host.isascii():
        raise ValueError(f"{host!r} is not an IP address")
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def split_host_port(text: str, default_port: int | None) -> tuple[str, str]:
    """("host", "port") of "host:port", "[v6]:port", "[v6]" or "host" (the last two with
    ``default_port``). A bare IPv6 address needs brackets when a port follows."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: no closing ]")
        if not rest:
            if default_port is None:
                raise ValueError(f"{text!r}: expected [IPV6]:PORT")
            return host, str(default_port)
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
        return host, rest[1:]
    if text.count(":") > 1:  # a bare IPv6 address: no port in it
        if default_port is None:
            raise ValueError(f"{text!r}: write an IPv6 endpoint as [ADDRESS]:PORT")
        return text, str(default_port)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"{text!r}: expected IP:PORT")
        return text, str(default_port)
    return host, port_text
