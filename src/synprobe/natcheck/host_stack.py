"""host_stack: what the host's own TCP does when its SYN meets an RST, an ICMP error or
a TTL-exceeded: abort connect() at once, or keep retrying.

Linux aborts a SYN-SENT socket on an RST (RFC 9293 section 3.10.7.3) and on any ICMP
destination-unreachable or time-exceeded (tcp_v4_err); RFC 5461 advises treating ICMP
as soft errors instead. A TTL-limited first SYN meets a time-exceeded, so this decides
whether such a SYN may come from the same connect() as the real attempt.

Three plain connect() calls, in parallel: to the broker's RST port, to its ICMP port,
and to the RST port with TTL 1. The capture shows whether the answer came back; the
socket shows whether connect() ended.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.sockets import connect_nonblocking, errno_name

from ..packets.seen import Seen
from .report import ConnectState, StackKind, StackReaction

WAIT_S = 0.5  # connect() has this long to end after its answer; the kernel resends at 1 s
KINDS = tuple(StackKind)


@dataclass(frozen=True)
class StackTrial:
    kind: StackKind
    target: Endpoint
    ttl: int | None


@dataclass(frozen=True)
class StackOutcome:
    kind: StackKind
    local_port: int
    outcome: str  # an errno name, or a ConnectState (PENDING: still waiting at WAIT_S)
    elapsed_s: float


def build(server_ip: str, rst_port: int, icmp_port: int) -> list[StackTrial]:
    return [StackTrial(StackKind.RST, Endpoint(server_ip, rst_port), None),
            StackTrial(StackKind.ICMP, Endpoint(server_ip, icmp_port), None),
            StackTrial(StackKind.TTL_EXCEEDED, Endpoint(server_ip, rst_port), 1)]


def _one(trial: StackTrial, out: list[StackOutcome]) -> None:
    v6 = trial.target.is_v6
    sock = socket.socket(trial.target.family, socket.SOCK_STREAM)
    try:
        if trial.ttl is not None:  # the hop limit, over IPv6
            sock.setsockopt(*((socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS) if v6
                              else (socket.IPPROTO_IP, socket.IP_TTL)), trial.ttl)
        sock.bind(("::" if v6 else "0.0.0.0", 0))
        port = sock.getsockname()[1]
        start = time.monotonic()
        code = connect_nonblocking(sock, trial.target, WAIT_S)
        elapsed = time.monotonic() - start
        name = ConnectState.CONNECTED if code == 0 else (
            ConnectState.PENDING if code == errno.ETIMEDOUT and elapsed >= WAIT_S * 0.95
            else errno_name(code))
        out.append(StackOutcome(trial.kind, port, name, elapsed))
    finally:
        sock.close()


def run(trials: Sequence[StackTrial]) -> list[StackOutcome]:
    out: list[StackOutcome] = []
    threads = [threading.Thread(target=_one, args=(t, out), daemon=True) for t in trials]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S + 2.0)
    return list(out)


def _answered(kind: StackKind, o: StackOutcome, seen: Sequence[Seen]) -> bool:
    for s in seen:
        if s.outgoing:
            continue
        if kind == StackKind.RST and s.is_rst and s.dport == o.local_port:
            return True
        if kind == StackKind.ICMP and s.is_unreachable \
                and s.inner_sport == o.local_port:
            return True
        if kind == StackKind.TTL_EXCEEDED and s.is_time_exceeded \
                and s.inner_sport == o.local_port:
            return True
    return False


def classify(outcomes: Sequence[StackOutcome], seen: Sequence[Seen]
             ) -> tuple[dict[StackKind, StackReaction] | None, str]:
    """{"rst": "aborts"|"retries", "icmp": ..., "ttl_exceeded": ...}; a kind whose answer
    never came back is left out (the reason says so)."""
    result: dict[StackKind, StackReaction] = {}
    notes = []
    for o in sorted(outcomes, key=lambda o: KINDS.index(o.kind)):
        if not _answered(o.kind, o, seen):
            notes.append(f"{o.kind}: no answer came back ({o.outcome})")
            continue
        if o.outcome == ConnectState.PENDING:
            result[o.kind] = StackReaction.RETRIES
            notes.append(f"{o.kind}: connect() still waiting after {WAIT_S:g} s")
        else:
            result[o.kind] = StackReaction.ABORTS
            notes.append(f"{o.kind}: connect() failed with {o.outcome} after "
                         f"{o.elapsed_s * 1000:.0f} ms")
    return (result or None), "; ".join(notes)
