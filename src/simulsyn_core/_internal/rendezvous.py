"""The broker's bookkeeping as pure code: the original's endpoint list and the session table.

No sockets here: the asyncio layer (broker.py) feeds events in and carries out the
returned actions, so every rule below is tested without a network.
"""

from __future__ import annotations

import itertools
import re
import socket
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from . import birthday as bday
from .endpoint import Endpoint
from .limits import MaxCounter, prefix_of
from .relay import STRATEGY_RELAY
from .wire import SEED_ENTRY, SEED_MAX_ENTRIES, SESSION_RE, decode_seed_list, encode_message

SEED_MAX_AGE_S = 60.0
NO_OFFER = bday.Offer()
SESSION_WAIT_MAX_S = 300.0  # how long a lone client may wait for its peer at the broker
# Bound on the memory a flood of registrations can take. A waiting client costs a few
# hundred bytes here (and its connection in the broker): 16384 of them are a few MB. When
# the table is full, a newcomer from a network holding fewer entries evicts the oldest
# entry of the network holding the most (ERROR code=evicted), so the addresses of a few
# networks can never lock everyone else out.
MAX_WAITING_SESSIONS = 16384
MAX_WAITING_PER_IP = 16  # so that one host cannot fill the table
# Per /24 (IPv4) or /64 (IPv6): 16 hosts' worth, plenty for a carrier-grade NAT's users
# that rendezvous at the same moment; a flood needs 64 networks to fill the table.
MAX_WAITING_PER_PREFIX = 256
PRIME_WAIT_MAX_S = 10.0  # a primed pair must finish its ordering exchange within this
STRATEGY_PRIME = "prime"
STRATEGY_ORDER = "order"
STRATEGY_SYNC = "sync"
STRATEGY_BIRTHDAY = "birthday"
# Strategies that keep both connections after PEER for the PRIMED -> GO exchange.
EXCHANGED = frozenset({STRATEGY_PRIME, STRATEGY_ORDER, STRATEGY_BIRTHDAY})
# What a client may say of its NAT in REGISTER (docs/protocol.md, "What the broker knows"):
UNSOLICITED = ("drop", "reject")  # an unsolicited inbound SYN: silently dropped, or answered
REPLY_SYN = ("pass", "blocked")  # a SYN in reply to the host's own SYN: passes, or not
# A code's number (REGISTER nameplate=) is kept in the table under "#N": never a session
# name, so a code and a --session cannot meet.
NAMEPLATE_RE = re.compile(r"[1-9][0-9]{0,5}", re.ASCII)
_NAMEPLATE_KEY_RE = re.compile(r"#[1-9][0-9]{0,5}", re.ASCII)


# Clients that reach the broker over IPv6 pair only with each other: their table keys end
# in V6_KEY ("@" is in no session name), so that an IPv4 client is never given an IPv6
# peer, nor the other way round.
V6_KEY = "@6"


def table_key(session: str, v6: bool) -> str:
    return session + V6_KEY if v6 else session


def valid_key(session: str) -> bool:
    """A session name, or a code's number as the table keeps it."""
    session = session.removesuffix(V6_KEY)
    return bool(SESSION_RE.fullmatch(session) or _NAMEPLATE_KEY_RE.fullmatch(session))


def key_fields(session: str) -> dict[str, str]:
    """How the messages name a table key: ``nameplate=N`` or ``session=NAME``."""
    session = session.removesuffix(V6_KEY)
    return {"nameplate": session[1:]} if session.startswith("#") else {"session": session}


class SeedList:
    """The original example's answer: the last few endpoints that asked, own entry last.

    Kept as the answer's own bytes: the caller's entry is last because it has just
    visited, so every caller's answer is the same bytes (the count, then the 6-byte
    entries in order). A visit edits them where the list changed (the caller's entry
    moved or added at the end, the oldest cut at the front), and nothing is encoded
    again; a caller that asks twice in a row gets the very same bytes."""

    def __init__(self, max_entries: int = SEED_MAX_ENTRIES, max_age_s: float = SEED_MAX_AGE_S):
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._entries: dict[bytes, float] = {}  # entry -> its last visit, oldest first
        self._body = b""  # the entries, in that order
        self._answer = b"\x00"

    def answer(self, endpoint: Endpoint, now: float) -> bytes:
        """Note the visit of ``endpoint``; the list answer it gets (wire format)."""
        entries, size = self._entries, SEED_ENTRY.size
        entry = SEED_ENTRY.pack(socket.inet_aton(endpoint.ip), endpoint.port)
        body = self._body
        if entries.pop(entry, None) is None:
            body += entry
        elif body[-size:] != entry:
            pos = body.find(entry)
            while pos % size:  # a match across two entries: the aligned one is further
                pos = body.find(entry, pos + 1)
            body = body[:pos] + body[pos + size:] + entry
        entries[entry] = now
        # Oldest first, so the stale ones are at the front (a visit's time never goes back,
        # but one that did only keeps an entry longer: they are looked at in order).
        cut = 0
        for seen in entries.values():
            if len(entries) - cut <= self.max_entries and now - seen <= self.max_age_s:
                break
            cut += 1
        if cut:
            for oldest in list(itertools.islice(entries, cut)):
                del entries[oldest]
            body = body[cut * size:]
        if body is not self._body:
            self._body = body
            self._answer = bytes((len(entries),)) + body
        return self._answer

    def visit(self, endpoint: Endpoint, now: float) -> list[Endpoint]:
        """``answer``, decoded."""
        return decode_seed_list(self.answer(endpoint, now))


@dataclass(frozen=True)
class Reply:
    """Send ``data`` to connection ``conn``; close it afterwards if ``close``."""

    conn: Hashable
    data: bytes
    close: bool
    sync: bool = False  # one of the replies to deliver so that all arrive at one moment


@dataclass(frozen=True)
class Facts:
    """What one client's REGISTER (or the broker's own probe) says of its NAT."""

    strategies: frozenset[str] = frozenset()
    mapping: str | None = None  # "same" or "varies" (REGISTER's mapping=), None: unknown
    unsolicited: str | None = None  # one of UNSOLICITED, None: unknown
    reply_syn: str | None = None  # one of REPLY_SYN, None: unknown
    birthday: bday.Offer = NO_OFFER  # sockets=, guesses=, port_range=, port_hot=


@dataclass
class _Waiting:
    conn: Hashable
    public: Endpoint
    local: Endpoint | None
    since: float
    facts: Facts = Facts()


@dataclass(frozen=True)
class Plan:
    """How a pair punches: ``strategy`` (None: plain), whether the client that registered
    first gets ``role=first`` (the side whose SYN crosses into the other's open hole),
    and why, in a few words for both clients' --verbose and JSON."""

    strategy: str | None
    waiting_is_first: bool
    why: str
    birthday: bday.Plan | None = None  # strategy birthday: N, M, the range, who goes first


def plan_pair(waiting: Facts, joining: Facts) -> Plan:
    """Choose the strategy of a pair from what both offered and what is known of their
    NATs (pure: tested on every combination).

    Roles: ``first`` sends the SYN that crosses into the other side's open hole; the
    ``second``'s NAT must therefore pass a SYN that comes as the reply to its own host's
    SYN. A NAT that drops such SYNs makes its side ``first`` (prime, order).

    - sync: both NATs drop unsolicited SYNs silently (and pass reply SYNs): an early SYN
      harms nobody, so both connect() at once, told at the same moment;
    - order: ``second`` (whose NAT may answer an unsolicited SYN) sends first, while the
      ``first``'s NAT silently drops that early SYN; ``first`` sends after GO;
    - prime: both open their own holes with TTL-limited SYNs, then ``first`` sends;
      needs no knowledge of the NATs, only a TTL between them.
    """
    offered = waiting.strategies & joining.strategies
    sides = (waiting, joining)
    varies = [f.mapping == "varies" for f in sides]
    if varies[0] != varies[1] and STRATEGY_BIRTHDAY in offered:
        rnd, easy = sides if varies[0] else sides[::-1]
        b = bday.plan(rnd.birthday, easy.birthday, (rnd.unsolicited, rnd.reply_syn),
                      (easy.unsolicited, easy.reply_syn))
        # role second: the side whose SYNs leave first (its holes open before GO).
        random_second = b.order == bday.ORDER_SOCKETS_FIRST
        return Plan(STRATEGY_BIRTHDAY, varies[0] != random_second, bday.describe(b), b)

    blocked = [f.reply_syn == "blocked" for f in sides]
    if STRATEGY_SYNC in offered and all(f.unsolicited == "drop" for f in sides) \
            and not any(blocked):
        return Plan(STRATEGY_SYNC, True, "both NATs drop an unsolicited SYN silently: both "
                                         "connect at once, told at the same moment")
    if STRATEGY_ORDER in offered:
        # (waiting first, joining first): the first's NAT must drop the second's early SYN.
        options = [(w_first, first, second) for w_first, first, second in
                   ((True, waiting, joining), (False, joining, waiting))
                   if first.unsolicited == "drop" and second.reply_syn != "blocked"]
        # The side whose NAT answers sends first (it must never meet an early SYN).
        options.sort(key=lambda o: o[2].unsolicited != "reject")
        if options:
            w_first, _, second = options[0]
            who = ("the side whose NAT answers unsolicited SYNs"
                   if second.unsolicited == "reject" else "one side")
            return Plan(STRATEGY_ORDER, w_first,
                        f"{who} sends first (role second); the other's NAT drops that early "
                        "SYN silently, and it sends after GO (role first)")
        if STRATEGY_PRIME not in offered:
            # Asked for by both where it is not known to be safe: a side whose NAT drops
            # reply SYNs sends the crossing SYN (first); else a side known to drop early
            # SYNs is first; else the waiting side.
            if blocked[0] != blocked[1]:
                w_first = blocked[0]
            else:
                w_first = not (joining.unsolicited == "drop" or waiting.unsolicited == "reject")
            first = waiting if w_first else joining
            known_bad = first.unsolicited == "reject" or any(blocked)
            return Plan(STRATEGY_ORDER, w_first,
                        "order is the one strategy both peers offered: " + (
                            "the first's NAT answers an early SYN, or a NAT drops reply "
                            "SYNs: prime would be safer" if known_bad else
                            "what the NATs do to an early SYN is not known"))
    if STRATEGY_PRIME in offered:
        w_first = not blocked[1] or blocked[0]
        return Plan(STRATEGY_PRIME, w_first,
                    "both sides open their own NAT's hole with a TTL-limited SYN, then one "
                    "SYN crosses" + (" (the side whose NAT drops reply SYNs sends it)"
                                     if any(blocked) else ""))
    if STRATEGY_SYNC in offered:
        return Plan(STRATEGY_SYNC, True, "sync is the one strategy both peers offered: both "
                                         "connect at once, told at the same moment")
    return Plan(None, True, "plain: connect() with retries from both sides")


# What each side is told when one NAT's mapping varies with the destination.
UNTRAVERSABLE = {
    True: "your NAT maps each destination to another public endpoint (port-randomising, or "
          "an address pool): the peer cannot aim at your punch",
    False: "the peer's NAT maps each destination to another public endpoint "
           "(port-randomising, or an address pool): there is no port to aim at",
}


UNTRAVERSABLE_BOTH = ("both NATs map each destination to another public endpoint "
                      "(port-randomising, or an address pool): only a relay can join you")
UNTRAVERSABLE_REPLY_SYN = ("both NATs drop a SYN even when it is the reply to their own "
                           "host's SYN: no simultaneous open can pass both")


@dataclass
class _Priming:
    """A pair in the prime strategy's exchange (docs/protocol.md): each side opens its
    own NAT's hole with a SYN that dies on the way and says PRIMED; once both did, both
    get GO and the first sends the full SYN. No full SYN ever meets a NAT whose own host
    has not opened its hole yet."""

    session: str
    first: Hashable
    second: Hashable
    since: float
    primed: set[Hashable] = field(default_factory=set)
    # Whose PRIMED GO waits for: both (prime), the second only (order: the first does
    # nothing before GO, so waiting for it would only add its round trip to the broker).
    waits_for: frozenset[Hashable] = frozenset()


class SessionTable:
    """Pairs the two clients of a session; tells each its own and its peer's endpoints.

    A session holds one waiting client. The second registration under the same name
    pairs them: both get PEER in the same step, and the session is forgotten. A client
    learns nothing about any other client.
    """

    def __init__(self, max_waiting: int = MAX_WAITING_SESSIONS,
                 wait_max_s: float = SESSION_WAIT_MAX_S,
                 max_waiting_per_ip: int = MAX_WAITING_PER_IP,
                 max_waiting_per_prefix: int = MAX_WAITING_PER_PREFIX) -> None:
        self.max_waiting = max_waiting
        self.max_waiting_per_ip = max_waiting_per_ip
        self.max_waiting_per_prefix = max_waiting_per_prefix
        self.wait_max_s = wait_max_s
        self._waiting: dict[str, _Waiting] = {}
        # Counters, so that no registration scans the table: waiting entries per address,
        # per prefix (which one holds the most), and each prefix's sessions, oldest first.
        self._per_ip: dict[str, int] = {}
        self._per_prefix = MaxCounter()
        self._prefix_sessions: dict[str, OrderedDict[str, None]] = {}
        self.evictions = 0
        self._session_of: dict[Hashable, str] = {}
        self._priming: dict[Hashable, _Priming] = {}  # both conns of a pair -> the pair
        # A broker that relays (--relay) sets this: a new token for a pair in which both
        # offered "relay" (PEER's relay=, docs/protocol.md "Relay").
        self.relay_token: Callable[[], str] | None = None
        # With --redis the peers may be at other brokers: PEER says where the relay that
        # issued the token is (relay_at=), so that both join it there.
        self.relay_at: Endpoint | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def register(self, conn: Hashable, session: str, public: Endpoint,
                 local: Endpoint | None, now: float,
                 strategies: frozenset[str] = frozenset(),
                 mapping: str | None = None, unsolicited: str | None = None,
                 reply_syn: str | None = None, birthday: bday.Offer = NO_OFFER
                 ) -> list[Reply]:
        """``strategies``: what the client offers beyond the plain punch (REGISTER's
        ``strategies=`` field); ``mapping``, ``unsolicited``, ``reply_syn``: what is known
        of its NAT (None: unknown). The pair's plan is ``plan_pair``'s; a pair in an
        ordering exchange (prime, order) keeps its connections for PRIMED -> GO."""
        refused = self.check(conn, session)
        if refused is not None:
            return [refused]
        facts = Facts(strategies, mapping, unsolicited, reply_syn, birthday)
        other = self._waiting.get(session)
        if other is not None and other.public == public:
            # The same endpoint registering again (a client that restarted): replace it.
            self._pop_waiting(session)
            replaced = _error(other.conn, "replaced", "a newer registration from this endpoint")
            return [replaced, *self.register(conn, session, public, local, now, strategies,
                                             mapping, unsolicited, reply_syn, birthday)]
        if other is None:
            prefix = prefix_of(public.ip)
            if self._per_ip.get(public.ip, 0) >= self.max_waiting_per_ip:
                return [_error(conn, "busy", "too many waiting sessions from this address")]
            if self._per_prefix[prefix] >= self.max_waiting_per_prefix:
                return [_error(conn, "busy", "too many waiting sessions from this network")]
            evicted: list[Reply] = []
            if len(self._waiting) >= self.max_waiting:
                victim = self._victim(prefix)
                if victim is None:
                    return [_error(conn, "busy", "too many waiting sessions; try later")]
                gone = self._pop_waiting(victim)
                self.evictions += 1
                if gone is not None:
                    evicted.append(_error(gone.conn, "evicted", "the broker is full: the "
                                          "oldest session of the busiest network goes"))
            self._add_waiting(session, _Waiting(conn, public, local, now, facts), prefix)
            return [*evicted, Reply(conn, encode_message("REGISTERED", **key_fields(session),
                                                         public=public), close=False)]
        self._pop_waiting(session)
        theirs = other.facts
        relay = self.relay_token is not None and \
            STRATEGY_RELAY in theirs.strategies and STRATEGY_RELAY in strategies
        # A peer's own (LAN) address is of use only to a peer behind the same NAT (the
        # same public IP); to anyone else it would only leak the victim's network.
        if other.public.ip != public.ip:
            local = other.local = None  # (other is out of the table already)
        if theirs.reply_syn == reply_syn == "blocked":
            if relay:
                return self._relayed(session, other, conn, public, local,
                                     (UNTRAVERSABLE_REPLY_SYN, UNTRAVERSABLE_REPLY_SYN))
            return [_error(c, "untraversable", UNTRAVERSABLE_REPLY_SYN)
                    for c in (other.conn, conn)]
        plan = plan_pair(theirs, facts)
        if "varies" in (theirs.mapping, mapping) and plan.strategy != STRATEGY_BIRTHDAY:
            # No plain punch can aim at a port that changes with each destination (only
            # birthday punching, when one side's NAT keeps its port and both offered
            # it): both are told now, not after their whole --timeout.
            both = theirs.mapping == mapping
            texts = tuple(UNTRAVERSABLE_BOTH if both else UNTRAVERSABLE[m == "varies"]
                          for m in (theirs.mapping, mapping))
            if relay:
                return self._relayed(session, other, conn, public, local,
                                     (texts[0], texts[1]))
            return [_error(c, "untraversable", text)
                    for c, text in zip((other.conn, conn), texts, strict=True)]
        exchange = plan.strategy in EXCHANGED
        token = self.relay_token() if relay and self.relay_token is not None else None
        first, second = (other.conn, conn) if plan.waiting_is_first else (conn, other.conn)
        if exchange:
            waits = frozenset({first, second} if plan.strategy == STRATEGY_PRIME else {second})
            pair = _Priming(session, first, second, now, waits_for=waits)
            self._priming[other.conn] = self._priming[conn] = pair
        # Only a client that offered strategies reads why=; an older one gets none.
        why = {c: plan.why if offered else None
               for c, offered in ((other.conn, theirs.strategies), (conn, strategies))}
        extra: dict[Hashable, dict[str, str | None]] = {other.conn: {}, conn: {}}
        if plan.birthday is not None:
            for c, m in ((other.conn, theirs.mapping), (conn, mapping)):
                side = bday.SIDE_SOCKETS if m == "varies" else bday.SIDE_GUESSES
                extra[c] = plan.birthday.fields(side)
        return [
            Reply(other.conn, encode_message(
                "PEER", **key_fields(session), public=other.public, peer=public,
                peer_local=local, role="first" if other.conn == first else "second",
                strategy=plan.strategy, why=why[other.conn], **extra[other.conn], relay=token,
                relay_at=self.relay_at if token else None),
                close=not exchange, sync=plan.strategy == STRATEGY_SYNC),
            Reply(conn, encode_message(
                "PEER", **key_fields(session), public=public, peer=other.public,
                peer_local=other.local, role="first" if conn == first else "second",
                strategy=plan.strategy, why=why[conn], **extra[conn], relay=token,
                relay_at=self.relay_at if token else None),
                close=not exchange, sync=plan.strategy == STRATEGY_SYNC),
        ]

    def check(self, conn: Hashable, session: str) -> Reply | None:
        """The refusal of a registration whatever the table holds: a bad name, or a
        connection that registered already."""
        if not valid_key(session):
            return _error(conn, "bad-session", "session names are 1-64 of A-Z a-z 0-9 . _ -")
        if conn in self._session_of or conn in self._priming:
            return _error(conn, "bad-request", "already registered on this connection")
        return None

    def adopt(self, session: str, conn: Hashable, public: Endpoint, local: Endpoint | None,
              facts: Facts, now: float) -> None:
        """Take in a waiting client that another store kept (--redis: a shared entry
        taken out of Redis), so that the next ``register`` pairs with it."""
        self._add_waiting(session, _Waiting(conn, public, local, now, facts),
                          prefix_of(public.ip))

    def _relayed(self, session: str, other: _Waiting, conn: Hashable, public: Endpoint,
                 local: Endpoint | None, whys: tuple[str, str]) -> list[Reply]:
        """A pair no punch can join, both offering a relay to a broker that relays: PEER
        with strategy=relay, why= (what ERROR untraversable would have said) and the
        token, to both; both connections closed, as for a plain PEER."""
        assert self.relay_token is not None
        token = self.relay_token()
        return [
            Reply(other.conn, encode_message(
                "PEER", **key_fields(session), public=other.public, peer=public,
                peer_local=local, role="first", strategy=STRATEGY_RELAY, why=whys[0],
                relay=token, relay_at=self.relay_at), close=True),
            Reply(conn, encode_message(
                "PEER", **key_fields(session), public=public, peer=other.public,
                peer_local=other.local, role="second", strategy=STRATEGY_RELAY, why=whys[1],
                relay=token, relay_at=self.relay_at), close=True),
        ]

    def worth_probing(self, conn: Hashable, session: str, strategies: frozenset[str],
                      mapping: str | None) -> bool:
        """Would a SYN probe of this registration's NAT change anything? Only for a client
        that offered a strategy chosen from it (order, sync, birthday), in a valid session, not
        registered yet, and in a pair that will not be refused anyway."""
        birthday = STRATEGY_BIRTHDAY in strategies
        if not strategies & {STRATEGY_ORDER, STRATEGY_SYNC, STRATEGY_BIRTHDAY} or \
                (mapping == "varies" and not birthday):
            return False
        if not (valid_key(session) or session == "#new") or conn in self._session_of \
                or conn in self._priming:
            return False
        other = self._waiting.get(session)
        if other is None or "varies" not in (other.facts.mapping, mapping):
            return True
        # One side's mapping varies: only a birthday pair (the other's does not) punches.
        return birthday and STRATEGY_BIRTHDAY in other.facts.strategies and \
            other.facts.mapping != mapping

    def new_nameplate(self, v6: bool = False) -> str:
        """The smallest code number no waiting client (of the same address family) holds
        (short codes, as magic-wormhole's), as a table key."""
        n = 1
        while table_key(f"#{n}", v6) in self._waiting:
            n += 1
        return table_key(f"#{n}", v6)

    def priming(self, conn: Hashable) -> bool:
        """True while ``conn`` is in an ordering exchange (prime, order)."""
        return conn in self._priming

    def step(self, conn: Hashable, verb: str) -> list[Reply]:
        """PRIMED from a client of a pair in an ordering exchange (prime, order): GO to
        both once both said it."""
        pair = self._priming.get(conn)
        if pair is None:
            return [_error(conn, "bad-request", f"{verb} outside a primed pair")]
        if verb == "PRIMED" and conn not in pair.primed and conn in pair.waits_for:
            pair.primed.add(conn)
            if pair.primed != pair.waits_for:
                return []
            self._end_priming(pair)
            # In one step, as PEER: both learn it at the same moment.
            return [Reply(c, encode_message("GO", **key_fields(pair.session)), close=True)
                    for c in (pair.first, pair.second)]
        self._end_priming(pair)
        other = pair.second if conn == pair.first else pair.first
        return [_error(conn, "bad-request", f"{verb} out of order"),
                _error(other, "peer-gone", "the peer left the ordering exchange")]

    def _end_priming(self, pair: _Priming) -> None:
        self._priming.pop(pair.first, None)
        self._priming.pop(pair.second, None)

    def disconnect(self, conn: Hashable) -> list[Reply]:
        """A connection closed; the peer of a primed pair is told (``peer-gone``)."""
        pair = self._priming.get(conn)
        if pair is not None:
            self._end_priming(pair)
            other = pair.second if conn == pair.first else pair.first
            return [_error(other, "peer-gone", "the peer left the ordering exchange")]
        session = self._session_of.get(conn)
        if session is not None:
            waiting = self._waiting.get(session)
            if waiting is not None and waiting.conn == conn:
                self._pop_waiting(session)
            self._session_of.pop(conn, None)
        return []

    def holds(self, conn: Hashable) -> bool:
        """True while ``conn`` waits for its peer or is in an ordering exchange."""
        return conn in self._session_of or conn in self._priming

    def _add_waiting(self, session: str, waiting: _Waiting, prefix: str) -> None:
        self._waiting[session] = waiting
        self._session_of[waiting.conn] = session
        ip = waiting.public.ip
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        self._per_prefix.add(prefix)
        self._prefix_sessions.setdefault(prefix, OrderedDict())[session] = None

    def _pop_waiting(self, session: str) -> _Waiting | None:
        """Forget a waiting session and its counts (O(1))."""
        waiting = self._waiting.pop(session, None)
        if waiting is None:
            return None
        self._session_of.pop(waiting.conn, None)
        ip = waiting.public.ip
        left = self._per_ip.get(ip, 1) - 1
        if left > 0:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)
        prefix = prefix_of(ip)
        self._per_prefix.add(prefix, -1)
        sessions = self._prefix_sessions.get(prefix)
        if sessions is not None:
            sessions.pop(session, None)
            if not sessions:
                del self._prefix_sessions[prefix]
        return waiting

    def _victim(self, prefix: str) -> str | None:
        """The session a newcomer from ``prefix`` may evict from a full table: the oldest
        of the prefix holding the most, if that one holds more than ``prefix`` does."""
        if self._per_prefix[prefix] >= self._per_prefix.max:
            return None
        for top in self._per_prefix.top():
            sessions = self._prefix_sessions.get(top)  # type: ignore[call-overload]
            if sessions:
                return next(iter(sessions))
        return None

    def expire(self, now: float) -> list[Reply]:
        stale = [w for w in self._waiting.values() if now - w.since > self.wait_max_s]
        for w in stale:
            self.disconnect(w.conn)
        out = [_error(w.conn, "timeout", "no peer joined the session in time") for w in stale]
        for pair in {id(p): p for p in self._priming.values()}.values():
            if now - pair.since > PRIME_WAIT_MAX_S:
                self._end_priming(pair)
                out += [_error(c, "timeout", "the ordering exchange did not finish in time")
                        for c in (pair.first, pair.second)]
        return out


def _error(conn: Hashable, code: str, message: str) -> Reply:
    return Reply(conn, encode_message("ERROR", code=code, message=message), close=True)
