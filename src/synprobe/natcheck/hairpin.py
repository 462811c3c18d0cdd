"""hairpin (RFC 4787 REQ-9, RFC 5382 REQ-8): can the host reach its own public endpoint?

The host sends a SYN from a fresh port to the public endpoint of a mapping it holds (a
fresh local port connected to the broker); the NAT hairpins if that SYN comes back in to
the mapped local port.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from simulsyn_core._internal.endpoint import Endpoint

from ..packets.seen import Seen
from . import craft
from . import protocol as P

# Why --no-hairpin exists: some enterprise firewalls take a SYN from an inside host to
# its own public address for a LAND attack and drop the host's NAT sessions (tailscale
# removed its hairpin check for this reason).
OFF_REASON = "--no-hairpin (no SYN was sent to this host's own public endpoint)"


@dataclass(frozen=True)
class HairpinProbe:
    host_ip: str
    local_port: int  # sends the SYN
    target: Endpoint  # the public endpoint of a mapping
    mapped_local_port: int  # the local port behind target


def build(probe: HairpinProbe) -> bytes:
    return craft.syn(probe.host_ip, probe.target.ip, probe.local_port, probe.target.port,
                     P.Seq.HAIRPIN)


def classify(probe: HairpinProbe, seen: Sequence[Seen]) -> tuple[bool | None, str]:
    sent = any(s.outgoing and s.is_syn and s.sport == probe.local_port
               and s.seq == P.Seq.HAIRPIN for s in seen)
    if not sent:
        return None, "the hairpin SYN did not show in the capture"
    back = came_back(probe, seen)
    if back is not None:
        return True, (f"a SYN to {probe.target} came back in to the host, from "
                      f"{Endpoint(back.src, back.sport)}")
    rst = any(not s.outgoing and s.is_rst and s.src == probe.target.ip
              and s.dport == probe.local_port for s in seen)
    return False, (f"a SYN to {probe.target} " + ("was answered with RST by the NAT itself"
                                                  if rst else "did not come back"))


def came_back(probe: HairpinProbe, seen: Sequence[Seen]) -> Seen | None:
    """The hairpinned SYN as it reached the mapped local port (its source is what RFC 5382
    REQ-8a is about: the sender's external address and port), or None."""
    return next((s for s in seen if not s.outgoing and s.is_syn and s.seq == P.Seq.HAIRPIN
                 and s.dport == probe.mapped_local_port), None)
