"""mapping, port_preservation, port_allocation (RFC 4787 section 4.1, RFC 5382 section
4.1): plain TCP connections, no privileges.

One local port connects to the server's first address and port (the control
connection), to the same address on a second port, and to the second address; the
broker answers each with the public endpoint it saw (OBSERVE). Two more fresh local
ports, one after the other, show how the NAT picks ports for new mappings.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.sockets import bound_socket, connect_nonblocking, describe_errno
from simulsyn_core._internal.wire import LineDecoder, ProtocolError

from . import protocol as P
from .report import Behaviour, PortAllocation

OBSERVE_TIMEOUT_S = 3.0
SEQUENTIAL_MAX_STEP = 16  # public ports this close, in order, count as sequential
IID_MASK = (1 << 64) - 1  # an IPv6 address's interface identifier (RFC 4291 section 2.5.1)
ALL_ONES = (1 << 128) - 1


@dataclass(frozen=True)
class Observation:
    local: Endpoint  # the socket's own address and port
    server: Endpoint  # where it connected
    public: Endpoint  # what the broker saw


@dataclass(frozen=True)
class MappingPlan:
    """Which server endpoints to observe, in order (pure)."""

    same_port: tuple[Endpoint, ...]  # from the control connection's local port
    fresh: tuple[Endpoint, ...]  # each from a new local port


def build(info: P.ServerInfo, fresh_ports: int = 2) -> MappingPlan:
    first = Endpoint(info.addrs[0], info.port)
    same = [Endpoint(info.addrs[0], info.alt_port)]
    if len(info.addrs) > 1:
        same.append(Endpoint(info.addrs[1], info.port))
    return MappingPlan(tuple(same), (first,) * fresh_ports)


@dataclass(frozen=True)
class MappingResult:
    public: tuple[Endpoint, ...]
    behind_nat: bool
    mapping: Behaviour | None
    port_preservation: bool
    port_allocation: PortAllocation | None
    reasons: tuple[tuple[str, str], ...]


def classify(control: Observation, same_port: Sequence[Observation],
             fresh: Sequence[Observation], own_ips: Sequence[str]) -> MappingResult:
    """Pure: from the control connection's observation, the same local port's other
    observations (other port first, then other address) and the fresh ports' ones."""
    reasons: list[tuple[str, str]] = []
    everything = [control, *same_port, *fresh]
    publics = tuple(dict.fromkeys(o.public for o in everything))
    behind_nat = control.public.ip not in own_ips
    other_port = [o for o in same_port if o.server.ip == control.server.ip]
    other_addr = [o for o in same_port if o.server.ip != control.server.ip]
    mapping: Behaviour | None
    translation = prefix_translation(control.local, control.public)
    if translation:
        reasons.append(("behind_nat", translation))
    if not behind_nat:
        mapping = Behaviour.NO_NAT
        reasons.append(("mapping", f"the server sees the host's own address {control.public.ip}"))
    elif other_port and other_port[0].public != control.public:
        mapping = Behaviour.APD
        reasons.append(("mapping", f"another server port saw {other_port[0].public}, not "
                                   f"{control.public}"))
    elif not other_addr:
        mapping = None
        reasons.append(("mapping", "the server has one address: endpoint-independent or "
                                   "address-dependent cannot be told apart"))
    elif other_addr[0].public != control.public:
        mapping = Behaviour.AD
        reasons.append(("mapping", f"the server's other address saw {other_addr[0].public}, "
                                   f"another port saw {control.public} as the first"))
    else:
        mapping = Behaviour.EI
        reasons.append(("mapping", f"every server address and port saw {control.public}"))
    preserving = [o.public.port == o.local.port for o in everything]
    port_preservation = all(preserving)
    allocation: PortAllocation | None
    samples = [control, *fresh]
    if all(o.public.port == o.local.port for o in samples):
        allocation = PortAllocation.PRESERVING
        reasons.append(("port_allocation", f"{len(samples)} local ports kept their number"))
    elif len(samples) < 3:
        allocation = None
        reasons.append(("port_allocation", "fewer than 3 local ports observed"))
    else:
        steps = [b.public.port - a.public.port for a, b in zip(samples, samples[1:], strict=False)]
        if all(0 < s <= SEQUENTIAL_MAX_STEP for s in steps):
            allocation = PortAllocation.SEQUENTIAL
        else:
            allocation = PortAllocation.RANDOM
        reasons.append(("port_allocation", "public ports in order of use: "
                        + ", ".join(str(o.public.port) for o in samples)))
    return MappingResult(publics, behind_nat, mapping, port_preservation, allocation,
                         tuple(reasons))


def prefix_translation(local: Endpoint, public: Endpoint) -> str | None:
    """Pure: over IPv6, what an address rewrite looks like when the server saw another
    address than the socket's own: NPTv6 (RFC 6296) changes the /64 prefix and keeps the
    interface identifier; anything else is named as an address translation. None when
    either side is IPv4 or nothing changed."""
    if not (local.is_v6 and public.is_v6) or local.ip == public.ip:
        return None
    own, seen = ipaddress.IPv6Address(local.ip), ipaddress.IPv6Address(public.ip)
    port = ("port kept" if public.port == local.port
            else f"port {local.port} -> {public.port}")
    if int(own) & IID_MASK == int(seen) & IID_MASK:
        before = ipaddress.IPv6Network((int(own) & ~IID_MASK & ALL_ONES, 64))
        after = ipaddress.IPv6Network((int(seen) & ~IID_MASK & ALL_ONES, 64))
        return f"prefix translation {before} -> {after} (interface identifier kept), {port}"
    return f"IPv6 address translation {own} -> {seen}, {port}"


# --- I/O ----------------------------------------------------------------------------------

Answer = TypeVar("Answer", bound=P.NcMessage)


def read_message(sock: socket.socket, decoder: LineDecoder, kind: type[Answer],
                 timeout_s: float = OBSERVE_TIMEOUT_S) -> Answer:
    """Read until one message of ``kind`` arrives (bounded). ERROR -> ProtocolError."""
    verb = kind.VERB
    end = time.monotonic() + timeout_s
    sock.setblocking(True)
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {verb} from the broker within {timeout_s:g} s")
        sock.settimeout(remaining)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        if not data:
            raise ConnectionError(f"the broker closed the connection before {verb}")
        for msg in decoder.feed(data):
            if msg.verb == verb:
                answer = P.parse_message(msg)
                if isinstance(answer, kind):
                    return answer
            if msg.verb == "ERROR":
                raise ProtocolError(f"the broker answered ERROR {msg.get('code')}: "
                                    f"{P.unescape_text(msg.get('message') or '')}")


def connect(local_port: int, server: Endpoint, timeout_s: float = OBSERVE_TIMEOUT_S
            ) -> socket.socket:
    sock = bound_socket(local_port, family=server.family)
    # On a connecting socket TCP_DEFER_ACCEPT delays the handshake's last ACK so that it
    # rides on our first data (tcp_rcv_synsent_state_process): one packet fewer each.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
    code = connect_nonblocking(sock, server, timeout_s)
    if code:
        sock.close()
        raise ConnectionError(f"connect to {server}: {describe_errno(code)}")
    return sock


def observe(sock: socket.socket, server: Endpoint) -> Observation:
    sock.sendall(bytes(P.Observe()))
    answer = read_message(sock, LineDecoder(), P.Observed)
    return Observation(Endpoint.from_sockaddr(sock.getsockname()), server, answer.public)


def run(plan: MappingPlan, control_local_port: int, sockets: list[socket.socket]
        ) -> tuple[list[Observation], list[Observation]]:
    """Make the plan's connections; every socket opened is appended to ``sockets`` (the
    caller closes them, after the raw probes that use the fresh ports' mappings)."""
    same: list[Observation] = []
    for server in plan.same_port:
        sock = connect(control_local_port, server)
        sockets.append(sock)
        same.append(observe(sock, server))
    fresh: list[Observation] = []
    for server in plan.fresh:
        sock = connect(0, server)
        sockets.append(sock)
        fresh.append(observe(sock, server))
    return same, fresh
