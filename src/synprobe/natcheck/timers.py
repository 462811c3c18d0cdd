"""syn_sent_lifetime_s: how long the hole an outgoing SYN opens stays open for the reply
SYN (conntrack's SYN_SENT timeout on Linux, 120 s by default; RFC 5382 REQ-5 asks at
least 4 min for a transitory connection idle timeout).

In one pass: the host sends one SYN per wait from its own fresh port (tagged
``Seq.TIMER + i``); the broker answers SYN i after waits[i] seconds. The lifetime lies
between the longest wait that still passed and the shortest one that did not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..packets.seen import Seen
from . import craft
from . import protocol as P

WAIT_LADDER = (1, 2, 4, 6, 8, 12, 16, 24, 32, 45, 60, 90, 110, 130, 150, 200, 280)


def waits_for(max_wait_s: float) -> list[float]:
    """At most MAX_TIMERS waits up to max_wait_s, spread over the ladder (pure)."""
    ladder = [float(w) for w in WAIT_LADDER if w < max_wait_s] + [float(max_wait_s)]
    if len(ladder) <= P.MAX_TIMERS:
        return ladder
    step = (len(ladder) - 1) / (P.MAX_TIMERS - 1)
    picked = sorted({ladder[round(i * step)] for i in range(P.MAX_TIMERS)})
    return picked


@dataclass(frozen=True)
class TimersProbe:
    host_ip: str
    server_ip: str
    probe_port: int
    local_ports: tuple[int, ...]
    waits: tuple[float, ...]


def build(probe: TimersProbe) -> list[bytes]:
    return [craft.syn(probe.host_ip, probe.server_ip, port, probe.probe_port, P.Seq.TIMER + i)
            for i, port in enumerate(probe.local_ports)]


def passed(probe: TimersProbe, seen: Sequence[Seen]) -> list[bool]:
    return [any(not s.outgoing and s.is_syn and s.src == probe.server_ip
                and s.sport == probe.probe_port and s.dport == port for s in seen)
            for port in probe.local_ports]


def closed_after(probe: TimersProbe, seen: Sequence[Seen]) -> float | None:
    """The shortest wait whose hole was found closed (None: every hole was open)."""
    closed = [w for w, p in zip(probe.waits, passed(probe, seen), strict=True) if not p]
    return min(closed) if closed else None


def classify(probe: TimersProbe, seen: Sequence[Seen]) -> tuple[float | None, str]:
    ok = passed(probe, seen)
    pairs = sorted(zip(probe.waits, ok, strict=True))
    open_at = [w for w, p in pairs if p]
    closed_at = [w for w, p in pairs if not p]
    if not open_at:
        return None, f"even the shortest wait ({pairs[0][0]:g} s) found the hole closed"
    low = max(open_at)
    if any(w < low for w in closed_at):
        return None, "holes closed out of order: " + ", ".join(
            f"{w:g}s={'open' if p else 'closed'}" for w, p in pairs)
    if not closed_at:
        return low, f"still open after the largest wait, {low:g} s (raise --max-wait)"
    return low, f"open after {low:g} s, closed after {min(closed_at):g} s"
