"""unsolicited_syn: what a NAT answers to a SYN for which it has no mapping.

The broker sends one SYN from its probe port to a public port of the client's address
that the client holds no mapping for, and watches for 0.35 s what comes back from that
address: nothing, a TCP RST, or an ICMP error quoting the SYN (RFC 5382 REQ-4 asks a
NAT not to answer at all for 6 s; a NAT that RSTs breaks simultaneous open).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..packets.decode import (
    ICMP6_DEST_UNREACH,
    ICMP_DEST_UNREACH,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
)
from ..packets.seen import Seen
from . import craft
from .report import Outcome

# (protocol, type, code): ICMPv6's port unreachable is type 1 code 4, administratively
# prohibited type 1 code 1 (RFC 4443 section 3.1); another ICMPv6 error is "icmp6-T-C".
ICMP_NAMES = {(IPPROTO_ICMP, ICMP_DEST_UNREACH, 3): Outcome.ICMP_PORT_UNREACHABLE,
              (IPPROTO_ICMP, ICMP_DEST_UNREACH, 13): Outcome.ICMP_ADMIN_PROHIBITED,
              (IPPROTO_ICMPV6, ICMP6_DEST_UNREACH, 4): Outcome.ICMP_PORT_UNREACHABLE,
              (IPPROTO_ICMPV6, ICMP6_DEST_UNREACH, 1): Outcome.ICMP_ADMIN_PROHIBITED}


@dataclass(frozen=True)
class UnsolicitedProbe:
    server_ip: str
    server_port: int
    client_ip: str
    client_port: int  # a public port with no mapping
    seq: int


def build(probe: UnsolicitedProbe) -> bytes:
    return craft.syn(probe.server_ip, probe.client_ip, probe.server_port, probe.client_port,
                     probe.seq)


def answers(probe: UnsolicitedProbe, seen: Seen) -> bool:
    """Is ``seen`` an answer to the probe SYN (a RST back, or an ICMP error quoting it)?"""
    if seen.outgoing:
        return False
    if seen.proto == 6:
        # A bare SYN from that port is the host's own (REQ-4's followed SYN), no answer.
        return (seen.src == probe.client_ip and seen.sport == probe.client_port
                and seen.dport == probe.server_port and not seen.is_syn)
    return (seen.is_icmp_error and seen.inner_dst == probe.client_ip
            and seen.inner_dport == probe.client_port and seen.inner_sport == probe.server_port)


def classify(probe: UnsolicitedProbe, seen: Sequence[Seen]) -> str:
    """"drop" | "rst" | "icmp-port-unreachable" | "icmp-admin-prohibited" |
    "icmp-T-C" / "icmp6-T-C" (another ICMP or ICMPv6 error, type T code C) | "syn-ack"
    (a host answered)."""
    return timed(probe, seen)[0]


def timed(probe: UnsolicitedProbe, seen: Sequence[Seen]) -> tuple[str, int | None]:
    """classify's answer, and how many ms after the probe SYN left it came (RFC 5382
    REQ-4 is about that time: no answer for 6 s); None when dropped, or when the capture
    does not show the SYN leaving."""
    sent = [s.t for s in seen if s.outgoing and s.is_syn and s.seq == probe.seq
            and s.dst == probe.client_ip and s.dport == probe.client_port]
    for s in seen:
        if not answers(probe, s):
            continue
        after = round((s.t - sent[0]) * 1000) if sent else None
        if s.proto == 6:
            return (Outcome.RST if s.is_rst else Outcome.SYN_ACK), after
        icmp = "icmp6" if s.proto == IPPROTO_ICMPV6 else "icmp"
        return ICMP_NAMES.get((s.proto, s.icmp_type, s.icmp_code),
                              f"{icmp}-{s.icmp_type}-{s.icmp_code}"), after
    return Outcome.DROP, None
