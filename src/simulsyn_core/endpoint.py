"""IPv4 endpoints as the user types them ("ip:port") and as the wire carries them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .numbers import parse_port


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
        try:
            port = parse_port(port_text, allow_zero=allow_zero_port)
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        return cls(str(ip), port)

    @classmethod
    def from_sockaddr(cls, addr: tuple[str, int] | tuple[str, int, int, int]) -> Endpoint:
        return cls(str(addr[0]), int(addr[1]))
