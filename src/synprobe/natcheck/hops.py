"""hops: routers from the host up to and including the NAT, measured by which TTL opens
a hole (the number a TTL-limited first SYN needs: it must pass our NAT and die before
the peer's).

The host sends SYNs with TTL 1..MAX_TTL, each from its own fresh port; the broker then
sends a SYN from its probe port to the public port each SYN would have mapped to (known
when the NAT preserves ports). A SYN whose TTL ran out before the NAT created no
conntrack entry (the NAT confirms an entry only after forwarding), so the broker's SYN to
it is unsolicited and filtered; the smallest TTL whose hole passes the broker's SYN is
hops + 1. ICMP time-exceeded answers name the routers on the way (``path``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..packets.seen import Seen
from . import craft
from . import protocol as P

MAX_TTL = P.MAX_REFLECT


@dataclass(frozen=True)
class HopsProbe:
    host_ip: str
    server_ip: str
    probe_port: int
    local_ports: tuple[int, ...]  # local_ports[i] sends TTL i + 1


def build(probe: HopsProbe) -> list[bytes]:
    return [craft.syn(probe.host_ip, probe.server_ip, port, probe.probe_port,
                      P.Seq.HOPS + ttl, ttl=ttl)
            for ttl, port in enumerate(probe.local_ports, start=1)]


def path(probe: HopsProbe, seen: Sequence[Seen]) -> list[str | None]:
    """The router that answered time-exceeded for each TTL (None: no answer)."""
    out: list[str | None] = []
    for port in probe.local_ports:
        hit = next((s.src for s in seen if not s.outgoing and s.is_time_exceeded
                    and s.inner_sport == port
                    and s.inner_dport == probe.probe_port), None)
        out.append(hit)
    return out


def classify(probe: HopsProbe, seen: Sequence[Seen]) -> tuple[int | None, str]:
    limit = "hop limit" if ":" in probe.host_ip else "TTL"  # IPv6 names it so
    opened = [any(not s.outgoing and s.is_syn and s.src == probe.server_ip
                  and s.sport == probe.probe_port and s.dport == port for s in seen)
              for port in probe.local_ports]
    if not any(opened):
        return None, (f"no SYN with {limit} 1..{len(probe.local_ports)} opened a hole the "
                      "server's SYN could pass")
    first = opened.index(True) + 1
    if not all(opened[first - 1:]):
        return None, (f"holes opened by {limit} {first} and up were not all passed: "
                      "inconsistent")
    if first == 1:
        return None, f"even a SYN with {limit} 1 opened the hole (is the host its own NAT?)"
    return first - 1, (f"a SYN with {limit} {first - 1} died before the last NAT, {limit} "
                       f"{first} opened the hole")
