"""filtering (RFC 4787 section 5, RFC 5382 section 4.3): which unsolicited SYNs to a
mapped public port reach the host.

The client holds a mapping from a fresh local port to server address A, port P. The
broker then sends one SYN to that public endpoint from A with another port, and one from
its other address B. The client's capture tells which arrived at the local port:

* from B -> "endpoint-independent";
* from A only -> "address-dependent";
* neither -> "address-and-port-dependent".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..packets.seen import Seen
from . import craft
from .report import Behaviour


@dataclass(frozen=True)
class FilteringProbe:
    same_ip: str  # the server address the mapping was made towards
    other_ip: str | None  # the server's second address, if it has one
    probe_port: int  # a port that the mapping has not talked to
    client_ip: str  # public
    client_port: int  # public, mapped
    seq: int


def build(probe: FilteringProbe) -> list[bytes]:
    pkts = [craft.syn(probe.same_ip, probe.client_ip, probe.probe_port, probe.client_port,
                      probe.seq)]
    if probe.other_ip:
        pkts.append(craft.syn(probe.other_ip, probe.client_ip, probe.probe_port,
                              probe.client_port, probe.seq + 1))
    return pkts


def arrived(seen: Sequence[Seen], src: str, sport: int, local_port: int) -> bool:
    return any(s.is_syn and not s.outgoing and s.src == src and s.sport == sport
               and s.dport == local_port for s in seen)


def classify(seen: Sequence[Seen], local_port: int, same_ip: str, other_ip: str | None,
             probe_port: int) -> tuple[Behaviour | None, str]:
    """(value, reason) from the client's capture; value None when it cannot be told."""
    from_other = other_ip is not None and arrived(seen, other_ip, probe_port, local_port)
    from_same = arrived(seen, same_ip, probe_port, local_port)
    if from_other:
        return Behaviour.EI, f"a SYN from the server's other address {other_ip} reached the host"
    if other_ip is None:
        if from_same:
            return None, ("a SYN from another server port reached the host, but the server "
                          "has one address: endpoint-independent or address-dependent")
        return Behaviour.APD, "a SYN from another server port did not reach the host"
    if from_same:
        return Behaviour.AD, (f"a SYN from {same_ip} (another port) reached the host, one from "
                    f"{other_ip} did not")
    return Behaviour.APD, "SYNs from another server port and from another address were both dropped"
