"""reply_syn: does a SYN that comes back as the reply to one the host sent pass the NAT?

This is TCP simultaneous open through the NAT (RFC 9293 section 3.5; RFC 5382 REQ-2 asks
NATs to support it). The host sends a SYN (tagged ``Seq.REPLY``) from a fresh port to
the broker's probe port, where the broker's firewall drops it; the broker answers with a
SYN from that port to the public endpoint the SYN came from. conntrack sees that SYN in
the reply direction of the entry our SYN created.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..packets.seen import Seen
from . import craft
from . import protocol as P
from .report import Outcome


@dataclass(frozen=True)
class ReplySynProbe:
    host_ip: str
    local_port: int
    server_ip: str
    probe_port: int


def build(probe: ReplySynProbe) -> bytes:
    return craft.syn(probe.host_ip, probe.server_ip, probe.local_port, probe.probe_port,
                     P.Seq.REPLY)


def classify(probe: ReplySynProbe, seen: Sequence[Seen]) -> tuple[Outcome | None, str]:
    sent = any(s.outgoing and s.is_syn and s.sport == probe.local_port
               and s.seq == P.Seq.REPLY for s in seen)
    if not sent:
        return None, "the host's SYN did not show in the capture"
    back = any(not s.outgoing and s.is_syn and s.src == probe.server_ip
               and s.sport == probe.probe_port and s.dport == probe.local_port for s in seen)
    if back:
        return Outcome.PASS, "the server's SYN, sent as the reply to ours, reached the host"
    return Outcome.BLOCKED, "the server's reply SYN did not reach the host"
