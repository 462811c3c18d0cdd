"""From captured TCP segments to connection attempts, both sides' states and a verdict.

Pure code: ``find_attempts(contents)`` groups a capture's segments (and the ICMP errors
that quote them) into attempts, one per 4-tuple and opening, and replays each through a
small model of RFC 9293's opening states (section 3.10) to tell a three-way handshake
from a simultaneous open, a dropped first SYN from a rejected one.

Delivery is inferred, not seen: a SYN counts as delivered only if the other side later
answers it (SYN+ACK or RST acknowledging it); other segments count as delivered unless
their sender sends them again. A delivered segment is taken to arrive as early as its
receiver's next segment allows: when that next segment could not have been sent after the
arrival (a SYN where the model owes a RST, a SYN+ACK after ESTABLISHED), the two crossed
in flight, as the original README draws a simultaneous open.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..packets.decode import ACK, FIN, RST, SYN, IcmpError, Segment, flags_label
from ..packets.reader import CaptureContents

SIDES = ("A", "B")
CLOSED, LISTEN, SYN_SENT, SYN_RECEIVED, ESTABLISHED = (
    "CLOSED", "LISTEN", "SYN-SENT", "SYN-RECEIVED", "ESTABLISHED")
# One packet seen at two capture points (a NAT's two sides, two hosts' captures merged)
# is taken for the same packet if the second sighting follows within this.
SAME_PACKET_WINDOW_S = 5.0
MAX_ANOMALIES = 10  # per attempt: enough to see what the model could not explain
KINDS = ("three-way", "simultaneous-open", "syn-dropped", "syn-rejected", "incomplete",
         "primed")
# A SYN sent with a TTL this small is the prime strategy's: it is meant to open its own
# NAT's hole and die at a router on the way (usual initial TTLs are 64, 128 and 255).
PRIMING_TTL_MAX = 16


def other(side: str) -> str:
    return "B" if side == "A" else "A"


@dataclass(frozen=True, slots=True)
class Event:
    """One captured packet of an attempt, oriented: ``sender`` is side A or B. An ICMP
    error is drawn as coming from the side opposite the segment it quotes."""

    frame: int
    time: float
    sender: str
    flags: int = 0
    seq: int = 0
    ack: int = 0
    payload: int = 0
    ttl: int = 0
    view: int = 0  # which 4-tuple (capture point) it was seen as
    icmp: str = ""  # ICMP error name ("ICMP port-unr"); "" for a TCP segment
    reporter: str = ""  # the ICMP error's source address
    comment: str = ""

    @property
    def is_icmp(self) -> bool:
        return bool(self.icmp)

    @property
    def plain_syn(self) -> bool:
        return not self.icmp and self.flags & (SYN | ACK | RST) == SYN

    @property
    def syn_ack(self) -> bool:
        return not self.icmp and self.flags & (SYN | ACK | RST) == SYN | ACK

    @property
    def rst(self) -> bool:
        return not self.icmp and bool(self.flags & RST)

    @property
    def ttl_limited(self) -> bool:
        """A SYN sent with a small TTL on purpose (the prime strategy's)."""
        return self.plain_syn and 0 < self.ttl <= PRIMING_TTL_MAX

    @property
    def label(self) -> str:
        if self.ttl_limited:
            return f"SYN ttl={self.ttl}"
        return self.icmp or flags_label(self.flags, self.payload)


@dataclass(frozen=True, slots=True)
class Arrow:
    event: Event
    delivered: bool
    note: str = ""  # "dropped", "rejected", "retransmission", ...


@dataclass(frozen=True, slots=True)
class Step:
    """What the ladder draws between two state lines."""

    connects: tuple[str, ...]  # sides that called connect() just before these arrows
    arrows: tuple[Arrow, ...]
    states_before: tuple[str, str]  # after the connects
    states_after: tuple[str, str]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One opening of one 4-tuple, as seen from the capture."""

    endpoints: tuple[str, str]  # side A (sent the first SYN) and side B, "ip:port"
    views: tuple[tuple[str, str], ...]  # every (A, B) the capture shows it as (NAT)
    kind: str
    established: bool
    first_packet_time: float
    vantage: str
    vantage_point: str  # "host-a", "host-b", "path", "local", "several", "unknown"
    listener: str | None  # the side inferred to have been listening
    steps: tuple[Step, ...]
    tail: tuple[Event, ...]  # packets after both sides were ESTABLISHED
    packets: int
    anomalies: tuple[str, ...] = ()


# --- grouping: flows, NAT views, attempts ---------------------------------------------------

# A flow: its two endpoints, in sorted order (a tuple: a scan's capture has one per packet).
FlowKey = tuple[str, str]


def flow_key(src: str, dst: str) -> FlowKey:
    return (src, dst) if src <= dst else (dst, src)


@dataclass(frozen=True, slots=True)
class Views:
    """How flows are joined into connections: only the flows that are not their
    connection's first-named flow have entries."""

    parent: dict[FlowKey, FlowKey]  # flow -> the flow it was joined to
    renamed: dict[FlowKey, dict[str, str]]  # endpoint -> canonical, where not itself

    def root(self, key: FlowKey) -> FlowKey:
        while key in self.parent:
            key = self.parent[key]
        return key

    def canonical(self, key: FlowKey, endpoint: str) -> str:
        names = self.renamed.get(key)
        return endpoint if names is None else names[endpoint]


def _union_views(segments: Sequence[Segment]) -> Views:
    """Join flows (unordered endpoint pairs) that show the same connection at different
    capture points, and name their endpoints as the connection's first flow does: a SYN
    with the same ISN (a SYN+ACK: the same two ISNs) from the same source port or to the
    same destination port, since a NAT rewrites at most one side's address and port."""
    # A SYN is known by its ISN; a SYN+ACK by its ISN and the ISN it acknowledges. A
    # bucket is its first SYN, or a list once another flow's SYN shares the ISN; a repeat
    # of its first or last SYN's flow and source (a retransmission) is not stored again
    # (joining it twice changes nothing).
    by_isn: dict[int | tuple[int, int], Segment | list[Segment]] = {}
    for seg in segments:
        if seg.flags & SYN and not seg.flags & RST:
            isn = (seg.seq, seg.ack) if seg.flags & ACK else seg.seq
            bucket = by_isn.get(isn)
            if bucket is None:
                by_isn[isn] = seg
            elif isinstance(bucket, Segment):
                if (bucket.src, bucket.dst) != (seg.src, seg.dst):
                    by_isn[isn] = [bucket, seg]
            elif (bucket[-1].src, bucket[-1].dst) != (seg.src, seg.dst) and (
                    bucket[0].src, bucket[0].dst) != (seg.src, seg.dst):
                bucket.append(seg)
    parent: dict[FlowKey, FlowKey] = {}  # only flows that are not their tree's root
    # mapping[child root] = (child endpoint -> parent endpoint)
    mapping: dict[FlowKey, dict[str, str]] = {}

    def find(key: FlowKey) -> FlowKey:
        while key in parent:
            key = parent[key]
        return key

    def port(endpoint: str) -> str:
        return endpoint.rsplit(":", 1)[1]

    def to_root(key: FlowKey, endpoint: str) -> str:
        while key in parent:
            endpoint = mapping[key][endpoint]
            key = parent[key]
        return endpoint

    for bucket in by_isn.values():
        if isinstance(bucket, Segment):
            continue
        first = bucket[0]
        first_key = flow_key(first.src, first.dst)
        for seg in bucket[1:]:
            key = flow_key(seg.src, seg.dst)
            if key == first_key or (port(seg.src) != port(first.src)
                                    and port(seg.dst) != port(first.dst)):
                continue
            root_a, root_b = find(first_key), find(key)
            if root_a == root_b:
                continue
            # Re-root b's tree under a: map b's root endpoints through this SYN.
            src_in_a, dst_in_a = to_root(first_key, first.src), to_root(first_key, first.dst)
            src_in_b, dst_in_b = to_root(key, seg.src), to_root(key, seg.dst)
            parent[root_b] = root_a
            mapping[root_b] = {src_in_b: src_in_a, dst_in_b: dst_in_a}
    renamed = {key: {e: to_root(key, e) for e in key} for key in parent}
    return Views(parent, renamed)


def icmp_label(err: IcmpError) -> str:
    """Short enough for an arrow: "ICMP port-unr", "ICMP admin-prohib"."""
    short = err.name.replace("unreachable", "unr").replace("prohibited", "prohib")
    return "ICMP " + short.replace("fragmentation", "frag").replace("exceeded", "exc")


# (time, frame, packet, canonical sender endpoint, canonical receiver endpoint, view)
Item = tuple[float, int, Segment | IcmpError, str, str, int]


def _ends(packet: Segment | IcmpError) -> tuple[str, str]:
    """A segment's endpoints; an ICMP error's quoted segment's."""
    if isinstance(packet, Segment):
        return packet.src, packet.dst
    return packet.quoted_src, packet.quoted_dst


@dataclass(slots=True)
class _Conn:
    """One connection's packets, in capture order once grouped (nothing else per packet)."""

    views: Views
    first: Segment  # its flow is view 0
    more_views: dict[FlowKey, int] | None = None  # 4-tuple -> view number, from 1
    packets: list[Segment | IcmpError] = field(default_factory=list)

    def view(self, key: FlowKey) -> int:
        if key == flow_key(self.first.src, self.first.dst):
            return 0
        if self.more_views is None:
            self.more_views = {}
        return self.more_views.setdefault(key, len(self.more_views) + 1)

    def item(self, packet: Segment | IcmpError) -> Item:
        src, dst = _ends(packet)
        key = flow_key(src, dst)
        return (packet.time, packet.index, packet, self.views.canonical(key, src),
                self.views.canonical(key, dst), self.view(key))


# One opening: a connection and the range of its packets (start, end), or the connection
# alone when all its packets are one opening (most are: one tuple less each).
Opening = tuple[_Conn, int, int] | _Conn


def opening_packets(opening: Opening) -> tuple[_Conn, list[Segment | IcmpError]]:
    if isinstance(opening, _Conn):
        return opening, opening.packets
    conn, start, end = opening
    return conn, conn.packets[start:end]


def find_openings(contents: CaptureContents) -> tuple[list[Opening], int]:
    """Every connection attempt's packets (an opening), by first packet, not yet replayed
    (``attempt_of`` does that); and how many TCP segments belonged to no attempt
    (connections opened before the capture started). Nothing is kept per packet beyond
    the decoded packet: a capture of many short connections costs a few hundred bytes a
    packet."""
    views = _union_views(contents.segments)
    conns: dict[FlowKey, _Conn] = {}  # by root flow, in order of first packet
    for seg in contents.segments:
        key = flow_key(seg.src, seg.dst)
        root = views.root(key)
        conn = conns.get(root)
        if conn is None:
            conn = conns[root] = _Conn(views, seg)
        conn.view(key)
        conn.packets.append(seg)
    for err in contents.icmp_errors:
        key = flow_key(err.quoted_src, err.quoted_dst)
        conn = conns.get(views.root(key))
        if conn is None:
            continue
        conn.view(key)
        conn.packets.append(err)
    openings: list[Opening] = []
    orphans = 0
    for conn in conns.values():
        conn.packets.sort(key=lambda packet: (packet.time, packet.index))
        ranges = _split_openings(conn)
        for start, end in ranges:
            if _first_syn(conn.packets[start:end]) is None:
                orphans += sum(1 for packet in conn.packets[start:end]
                               if isinstance(packet, Segment))
            else:
                openings.append(conn if len(ranges) == 1 else (conn, start, end))
    del conns
    # An opening's first packet is its attempt's (the first item is never a copy seen
    # elsewhere: nothing was seen before it).
    openings.sort(key=lambda opening: opening.packets[0].time if isinstance(opening, _Conn)
                  else opening[0].packets[opening[1]].time)
    return openings, orphans


def find_attempts(contents: CaptureContents) -> tuple[list[Attempt], int]:
    """Every connection attempt in a capture, by first packet, and how many TCP segments
    belonged to no attempt (connections opened before the capture started)."""
    openings, orphans = find_openings(contents)
    return [attempt_of(opening) for opening in openings], orphans


def _split_openings(conn: _Conn) -> list[tuple[int, int]]:
    """Cut one connection's packets into openings (ranges of ``conn.packets``): a SYN
    whose ISN differs from the one its side already used starts a new attempt (the punch
    retries on the same 4-tuple)."""
    cuts: list[int] = [0]
    isn: dict[str, int] = {}
    for n, packet in enumerate(conn.packets):
        if isinstance(packet, Segment) and packet.flags & SYN and not packet.flags & RST:
            sender = conn.item(packet)[3]
            started = bool(isn)
            if (sender in isn and isn[sender] != packet.seq) or (not started and n > cuts[-1]):
                cuts.append(n)
                isn = {}
            isn[sender] = packet.seq
    cuts.append(len(conn.packets))
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _private(endpoint: str) -> bool:
    return _private_host(endpoint.rsplit(":", 1)[0].strip("[]"))


@functools.lru_cache(maxsize=4096)  # a scan's capture has one host on many ports
def _private_host(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_private and not addr.is_loopback and not _documentation(addr)


# Python counts the documentation ranges (RFC 5737) as private; on the lab's wire they
# play the public internet.
_DOCUMENTATION = tuple(ipaddress.ip_network(n) for n in
                       ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"))


def _documentation(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(addr in network for network in _DOCUMENTATION)


def _hops(ttl: int) -> int:
    """Routers crossed since the sender, from the nearest usual initial TTL above."""
    return next(initial for initial in (32, 64, 128, 255) if ttl <= initial) - ttl


def _vantage(events: Sequence[Event], endpoints: tuple[str, str],
             views: Sequence[tuple[str, str]]) -> tuple[str, str]:
    if len(views) > 1:
        names = [f"{side} as {' and '.join(dict.fromkeys(v[n] for v in views))}"
                 for n, side in enumerate(SIDES)]
        return ("several",
                f"{len(views)} capture points, e.g. both sides of a NAT (one connection under "
                f"{len(views)} address pairs, matched by ports and ISN: {'; '.join(names)}); "
                "each packet drawn once, where first seen")
    hops: dict[str, int] = {}
    for side in SIDES:
        # A TTL-limited SYN says nothing of where the capture is: its TTL was set low.
        own = [e for e in events if e.sender == side and not e.is_icmp and not e.ttl_limited]
        opening = [e for e in own if e.flags & SYN] or own
        if opening:
            hops[side] = _hops(opening[0].ttl)
    local = [s for s in SIDES if hops.get(s) == 0]
    ep = dict(zip(SIDES, endpoints, strict=True))

    def away(side: str) -> str:
        return (f"{side}'s packets {hops[side]} hop(s) from {side}" if side in hops
                else f"nothing from {side}")

    if len(local) == 2:
        return "local", "one host (both sides' packets unrouted, e.g. loopback)"
    if len(local) == 1:
        side = local[0]
        where = (f"host {side} ({ep[side]}) or its LAN, inside its NAT" if _private(ep[side])
                 else f"host {side} ({ep[side]}) or its LAN")
        return f"host-{side.lower()}", f"{where}; {away(other(side))}"
    if not hops:
        return "unknown", ("no packet to count hops on (a TTL-limited SYN's TTL was set low "
                           "on purpose)")
    return "path", (f"on the path between them (a NAT's public side or a router): "
                    f"{away('A')}, {away('B')}")


# --- the replay -----------------------------------------------------------------------------

@dataclass(slots=True)
class _Side:
    state: str = CLOSED
    owes: str | None = None  # the answer the last arrival calls for
    listener: bool = False
    established_once: bool = False


def _receive(side: _Side, ev: Event) -> None:
    """RFC 9293 section 3.10.7, reduced to what an opening shows."""
    state = side.state
    side.owes = None
    if ev.is_icmp:
        # Linux aborts a connect() on an ICMP error in SYN-SENT (tcp_v4_err).
        if state == SYN_SENT:
            side.state = CLOSED
        return
    if ev.rst:
        if state in (SYN_SENT, ESTABLISHED):
            side.state = CLOSED
        elif state == SYN_RECEIVED:
            side.state = LISTEN if side.listener else CLOSED
        return
    if ev.plain_syn:
        if state == CLOSED:
            side.owes = "RST"
        elif state in (LISTEN, SYN_SENT):
            side.state, side.owes = SYN_RECEIVED, "SYN+ACK"
        return
    if ev.syn_ack:
        if state == SYN_SENT:
            side.state, side.owes = ESTABLISHED, "ACK"
        elif state == SYN_RECEIVED:
            side.state = ESTABLISHED  # simultaneous open: both SYN+ACKs crossed
        elif state in (CLOSED, LISTEN):
            side.owes = "RST"
        return
    if ev.flags & ACK:
        if state == SYN_RECEIVED:
            side.state = ESTABLISHED
        elif state in (CLOSED, LISTEN, SYN_SENT):
            side.owes = "RST"


def _can_send(side: _Side, ev: Event) -> bool:
    if ev.is_icmp:
        return True
    if ev.rst:
        return True  # an answer to anything, or an abort
    if side.owes == "RST":
        return False
    if ev.plain_syn:
        return side.state in (CLOSED, SYN_SENT) and side.owes is None
    if ev.syn_ack:
        return side.state == SYN_RECEIVED
    return side.state == ESTABLISHED or side.owes == "ACK"


def _send(side: _Side, ev: Event) -> bool:
    """Apply sending ``ev``; True if it was a connect() (a SYN from CLOSED)."""
    side.owes = None
    if ev.is_icmp:
        return False
    if ev.plain_syn and side.state == CLOSED:
        side.state = SYN_SENT
        return True
    if ev.rst and side.state in (SYN_SENT, SYN_RECEIVED, ESTABLISHED):
        side.state = CLOSED
    return False


def _copy(side: _Side) -> _Side:
    return _Side(side.state, side.owes, side.listener, side.established_once)


def _first_after(indices: Sequence[int] | None, after: int) -> int | None:
    if not indices:
        return None
    at = bisect.bisect_right(indices, after)
    return indices[at] if at < len(indices) else None


def _delivery(events: Sequence[Event]) -> tuple[list[bool], list[str]]:
    """Which packets reached the other side, and a note for those that did not. Linear
    in the number of packets (a capture may hold a long transfer after the opening)."""
    delivered = [True] * len(events)
    notes = [""] * len(events)
    answers: dict[tuple[str, int], list[int]] = {}  # (answering side, ack) -> indices
    syn_copies: dict[tuple[str, int], list[int]] = {}  # (sender, ISN) -> indices
    icmp_errors: dict[tuple[str, int], list[int]] = {}  # (SYN's sender, quoted seq)
    last_copy: dict[tuple[str, int, int, int], int] = {}
    for i, ev in enumerate(events):
        if ev.is_icmp:
            icmp_errors.setdefault((other(ev.sender), ev.seq), []).append(i)
            continue
        if ev.flags & ACK and (ev.syn_ack or ev.rst):
            answers.setdefault((ev.sender, ev.ack), []).append(i)
        if ev.plain_syn:
            syn_copies.setdefault((ev.sender, ev.seq), []).append(i)
        if ev.flags & (SYN | FIN) or ev.payload:
            last_copy[(ev.sender, ev.flags, ev.seq, ev.payload)] = i
    for i, ev in enumerate(events):
        if ev.is_icmp:
            continue
        if ev.plain_syn:
            # Delivered if the other side answers it (SYN+ACK or RST acknowledging the
            # ISN) before the SYN is sent again.
            answer = _first_after(answers.get((other(ev.sender), (ev.seq + 1) % 2**32)), i)
            again = _first_after(syn_copies.get((ev.sender, ev.seq)), i)
            icmp = _first_after(icmp_errors.get((ev.sender, ev.seq)), i)
            if answer is None or (again is not None and again < answer):
                delivered[i] = False
                rejected = icmp is not None and (answer is None or icmp < answer)
                if rejected and ev.ttl_limited and icmp is not None \
                        and "exc" in events[icmp].icmp:
                    notes[i] = "died on the way by its TTL"  # the prime strategy's, as meant
                else:
                    notes[i] = ("rejected" if rejected
                                else ("dropped" if answer is None else "lost"))
        elif last_copy.get((ev.sender, ev.flags, ev.seq, ev.payload), i) > i:
            delivered[i], notes[i] = False, "lost"
    seen: set[tuple[str, int, int]] = set()
    for i, ev in enumerate(events):
        key = (ev.sender, ev.flags, ev.seq)
        if not ev.is_icmp and ev.flags & (SYN | FIN) and key in seen:
            notes[i] = ", ".join(n for n in ("retransmission", notes[i]) if n)
        seen.add(key)
    return delivered, notes


def replay(events: Sequence[Event]) -> tuple[list[Step], list[Event], dict[str, _Side],
                                             list[str], str | None]:
    """Both sides' states through the opening: the steps to draw, the packets after both
    sides were ESTABLISHED, the final sides, anomalies, and the inferred listener."""
    delivered, notes = _delivery(events)
    sides = {s: _Side() for s in SIDES}
    listener = None
    for s in SIDES:
        own = [e for e in events if e.sender == s and not e.is_icmp]
        if own and own[0].syn_ack:
            sides[s].state, sides[s].listener, listener = LISTEN, True, s
    anomalies: list[str] = []
    steps: list[Step] = []
    pending: dict[str, list[int]] = {s: [] for s in SIDES}  # in flight towards a side
    group: list[int] = []
    connects: list[str] = []
    start: tuple[str, str] = (CLOSED, CLOSED)
    tail: list[Event] = []

    def states() -> tuple[str, str]:
        return sides["A"].state, sides["B"].state

    # next_from[side][i]: the first TCP segment side sends after event i
    next_from: dict[str, list[Event | None]] = {}
    for side in SIDES:
        upcoming: Event | None = None
        column: list[Event | None] = [None] * len(events)
        for i in range(len(events) - 1, -1, -1):
            column[i] = upcoming
            if events[i].sender == side and not events[i].is_icmp:
                upcoming = events[i]
        next_from[side] = column

    def next_send(side: str, after: int) -> Event | None:
        return next_from[side][after]

    def flush(after: int) -> None:
        for side in SIDES:
            upcoming = next_send(side, after)
            while pending[side]:
                arriving = pending[side][0]
                trial = _copy(sides[side])
                _receive(trial, events[arriving])
                if upcoming is not None and not _can_send(trial, upcoming):
                    if not events[arriving].is_icmp:
                        break
                    # The side went on as if the error had not come: Linux only records
                    # a soft error on a socket its owner is busy with (tcp_v4_err).
                    trial = _copy(sides[side])
                    notes[arriving] = "soft error: the connect() went on"
                sides[side] = trial
                sides[side].established_once |= trial.state == ESTABLISHED
                pending[side].pop(0)

    for i, ev in enumerate(events):
        if all(s.established_once for s in sides.values()) and not group:
            tail.append(ev)
            continue
        sender = sides[ev.sender]
        if not _can_send(sender, ev) and len(anomalies) < MAX_ANOMALIES:
            anomalies.append(f"frame {ev.frame}: {ev.sender} sent {ev.label} in "
                             f"{sender.state}")
        if not group:
            connects, start = [], states()
        if _send(sender, ev):
            connects.append(ev.sender)
        group.append(i)
        if delivered[i]:
            pending[other(ev.sender)].append(i)
        flush(i)
        if not pending["A"] and not pending["B"]:
            arrows = tuple(Arrow(events[j], delivered[j], notes[j]) for j in group)
            steps.append(Step(tuple(connects), arrows, _after_connects(start, connects),
                              states()))
            group = []
    if group:  # the capture ended with packets in flight
        for side in SIDES:
            for j in pending[side]:
                _receive(sides[side], events[j])
                sides[side].established_once |= sides[side].state == ESTABLISHED
        steps.append(Step(tuple(connects), tuple(Arrow(events[j], delivered[j], notes[j])
                                                  for j in group),
                          _after_connects(start, connects), states()))
    return steps, tail, sides, anomalies, listener


def _after_connects(start: tuple[str, str], connects: list[str]) -> tuple[str, str]:
    """The states at a step's start once its connect() calls are made."""
    return (SYN_SENT if "A" in connects else start[0],
            SYN_SENT if "B" in connects else start[1])


def classify(steps: Sequence[Step], sides: dict[str, _Side]) -> tuple[str, bool]:
    """(kind, established) of one replayed attempt: the five kinds of a plain opening,
    or "primed" when a side's SYN was TTL-limited and died on the way with an ICMP
    time-exceeded (the prime strategy's hole-opening SYN, alone or followed by the
    opening it made possible)."""
    arrows = [a for step in steps for a in step.arrows]
    established = all(s.established_once for s in sides.values())
    if any(a.event.ttl_limited for a in arrows) and any(
            a.event.is_icmp and "exc" in a.event.icmp for a in arrows):
        return "primed", established
    syn_senders = {a.event.sender for a in arrows if a.event.plain_syn}
    if established:
        if len(syn_senders) == 2:
            both_arrived = all(any(a.event.plain_syn and a.delivered and a.event.sender == s
                                   for a in arrows) for s in SIDES)
            return ("simultaneous-open" if both_arrived else "syn-dropped"), True
        return "three-way", True
    rejected = any(a.event.is_icmp for a in arrows) or any(
        a.event.rst and any(b.event.plain_syn and b.delivered and b.event.sender != a.event.sender
                            and (b.event.seq + 1) % 2**32 == a.event.ack for b in arrows)
        for a in arrows)
    return ("syn-rejected" if rejected else "incomplete"), False


def _first_syn(packets: Sequence[Segment | IcmpError]) -> Segment | None:
    """The first SYN (or SYN+ACK) of an opening; None if the connection predates the
    capture."""
    return next((p for p in packets if isinstance(p, Segment)
                 and p.flags & (SYN | RST) == SYN), None)


def attempt_of(opening: Opening) -> Attempt:
    """One opening (from ``find_openings``) replayed: its attempt."""
    conn, packets = opening_packets(opening)
    seg = _first_syn(packets)
    if seg is None:
        raise ValueError("no SYN: not an opening")
    items = [conn.item(packet) for packet in packets]
    first_syn = conn.item(seg)
    # Side A sent the first plain SYN; for a lone SYN+ACK, A is the one it answers.
    a_canon = first_syn[4] if seg.flags & ACK else first_syn[3]
    events: list[Event] = []
    # packet -> (when this copy was first seen, the capture points it was seen at)
    sightings: dict[tuple[str, int, int, int, int], tuple[float, set[int]]] = {}
    used_views: set[int] = set()  # every 4-tuple the attempt was seen under
    view_ep: dict[int, dict[str, str]] = {}

    def seen_elsewhere(key: tuple[str, int, int, int, int], time: float, view: int) -> bool:
        """True for a copy already seen at another capture point (the same packet further
        along its path); False for a new copy (a retransmission or a repeated ACK)."""
        prev = sightings.get(key)
        if prev is not None and view not in prev[1] and time - prev[0] <= SAME_PACKET_WINDOW_S:
            prev[1].add(view)
            return True
        sightings[key] = (time, {view})
        return False

    for time, index, packet, canon, _canon_dst, view in items:
        sender = "A" if canon == a_canon else "B"
        if isinstance(packet, Segment):
            used_views.add(view)
            view_ep.setdefault(view, {})[sender] = packet.src
            view_ep[view][other(sender)] = packet.dst
            if seen_elsewhere((sender, packet.flags, packet.seq, packet.ack, packet.payload),
                              time, view):
                continue
            events.append(Event(index, time, sender, packet.flags, packet.seq, packet.ack,
                                packet.payload, packet.ttl, view, comment=packet.comment))
        else:
            if seen_elsewhere((other(sender), -1, packet.quoted_seq, packet.icmp_type,
                               packet.code), time, view):
                continue
            events.append(Event(index, time, other(sender), seq=packet.quoted_seq,
                                ttl=packet.ttl, view=view, icmp=icmp_label(packet),
                                reporter=packet.reporter, comment=packet.comment))
    ordered_views = sorted(used_views)
    views = tuple((view_ep[v]["A"], view_ep[v]["B"]) for v in ordered_views)
    steps, tail, sides, anomalies, listener = replay(events)
    kind, established = classify(steps, sides)
    counts: dict[int, int] = {}
    for ev in events:
        if not ev.is_icmp:
            counts[ev.view] = counts.get(ev.view, 0) + 1
    main_view = max(ordered_views, key=lambda v: (counts.get(v, 0), -v))
    endpoints = (view_ep[main_view]["A"], view_ep[main_view]["B"])
    vantage_point, vantage = _vantage(events, endpoints, views)
    return Attempt(endpoints, views, kind, established, events[0].time, vantage,
                   vantage_point, listener, tuple(steps), tuple(tail), len(events),
                   tuple(anomalies))
