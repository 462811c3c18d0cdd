"""IPv4 endpoints as the user types them ("ip:port") and as the wire carries them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Endpoint:
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self.ip, self.port)

    @classmethod
    def parse(cls, text: str, *, default_port: int | None = None, allow_zero_port: bool = False
              ) -> Endpoint:
        """Parse "ip:port" (or "ip" when default_port is given). Raises ValueError."""
        text = text.strip()
        if not text:
            raise ValueError("empty address")
        host, sep, port_text = text.rpartition(":")
        if not sep:
            if default_port is None:
                raise ValueError(f"{text!r}: expected IP:PORT")
            host, port_text = text, str(default_port)
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv4 address") from None
        if not port_text.isdigit():
            raise ValueError(f"{text!r}: port {port_text!r} is not a number")
        port = int(port_text)
        if not (0 if allow_zero_port else 1) <= port <= 65535:
            raise ValueError(f"{text!r}: port {port} out of range")
        return cls(str(ip), port)

    @classmethod
    def from_sockaddr(cls, addr: tuple[str, int] | tuple[str, int, int, int]) -> Endpoint:
        return cls(str(addr[0]), int(addr[1]))
