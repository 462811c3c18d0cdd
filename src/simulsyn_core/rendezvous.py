"""The broker's bookkeeping as pure code: the original's endpoint list and the session table.

No sockets here: the asyncio layer (broker.py) feeds events in and carries out the
returned actions, so every rule below is tested without a network.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from .endpoint import Endpoint
from .wire import SEED_MAX_ENTRIES, SESSION_RE, encode_message

SEED_MAX_AGE_S = 60.0
SESSION_WAIT_MAX_S = 300.0  # how long a lone client may wait for its peer at the broker
MAX_WAITING_SESSIONS = 4096  # bound on memory a flood of registrations can take
MAX_WAITING_PER_IP = 16  # so that one host cannot fill the table
PRIME_WAIT_MAX_S = 10.0  # a primed pair must finish its ordering exchange within this
STRATEGY_PRIME = "prime"


class SeedList:
    """The original example's answer: the last few endpoints that asked, own entry last."""

    def __init__(self, max_entries: int = SEED_MAX_ENTRIES, max_age_s: float = SEED_MAX_AGE_S):
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._entries: list[tuple[Endpoint, float]] = []

    def visit(self, endpoint: Endpoint, now: float) -> list[Endpoint]:
        self._entries = [
            (ep, t) for ep, t in self._entries
            if now - t <= self.max_age_s and ep != endpoint
        ]
        self._entries.append((endpoint, now))
        del self._entries[: -self.max_entries]
        return [ep for ep, _ in self._entries]


@dataclass(frozen=True)
class Reply:
    """Send ``data`` to connection ``conn``; close it afterwards if ``close``."""

    conn: Hashable
    data: bytes
    close: bool


@dataclass
class _Waiting:
    conn: Hashable
    public: Endpoint
    local: Endpoint | None
    since: float
    strategies: frozenset[str] = frozenset()
    mapping: str | None = None  # "same" or "varies" (REGISTER's mapping=), None: unknown


# What each side is told when one NAT's mapping varies with the destination.
UNTRAVERSABLE = {
    True: "your NAT maps each destination to another public port (port-randomising): "
          "the peer cannot aim at your punch",
    False: "the peer's NAT maps each destination to another public port "
           "(port-randomising): there is no port to aim at",
}


UNTRAVERSABLE_BOTH = ("both NATs map each destination to another public port "
                      "(port-randomising): only a relay can join you")


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


class SessionTable:
    """Pairs the two clients of a session; tells each its own and its peer's endpoints.

    A session holds one waiting client. The second registration under the same name
    pairs them: both get PEER in the same step, and the session is forgotten. A client
    learns nothing about any other client.
    """

    def __init__(self, max_waiting: int = MAX_WAITING_SESSIONS,
                 wait_max_s: float = SESSION_WAIT_MAX_S,
                 max_waiting_per_ip: int = MAX_WAITING_PER_IP) -> None:
        self.max_waiting = max_waiting
        self.max_waiting_per_ip = max_waiting_per_ip
        self.wait_max_s = wait_max_s
        self._waiting: dict[str, _Waiting] = {}
        self._session_of: dict[Hashable, str] = {}
        self._priming: dict[Hashable, _Priming] = {}  # both conns of a pair -> the pair

    def __len__(self) -> int:
        return len(self._waiting)

    def register(self, conn: Hashable, session: str, public: Endpoint,
                 local: Endpoint | None, now: float,
                 strategies: frozenset[str] = frozenset(),
                 mapping: str | None = None) -> list[Reply]:
        """``strategies``: what the client offers beyond the plain punch (REGISTER's
        ``strategies=`` field); a pair that both offer ``prime`` is told
        ``strategy=prime`` and keeps its connections for the ordering exchange."""
        if not SESSION_RE.fullmatch(session):
            return [_error(conn, "bad-session", "session names are 1-64 of A-Z a-z 0-9 . _ -")]
        if conn in self._session_of or conn in self._priming:
            return [_error(conn, "bad-request", "already registered on this connection")]
        other = self._waiting.get(session)
        if other is not None and other.public == public:
            # The same endpoint registering again (a client that restarted): replace it.
            del self._waiting[session]
            self._session_of.pop(other.conn, None)
            replaced = _error(other.conn, "replaced", "a newer registration from this endpoint")
            return [replaced, *self.register(conn, session, public, local, now, strategies,
                                             mapping)]
        if other is None:
            if len(self._waiting) >= self.max_waiting:
                return [_error(conn, "busy", "too many waiting sessions; try later")]
            if sum(w.public.ip == public.ip for w in self._waiting.values()) >= \
                    self.max_waiting_per_ip:
                return [_error(conn, "busy", "too many waiting sessions from this address")]
            self._waiting[session] = _Waiting(conn, public, local, now, strategies, mapping)
            self._session_of[conn] = session
            return [Reply(conn, encode_message("REGISTERED", session=session, public=public),
                          close=False)]
        del self._waiting[session]
        self._session_of.pop(other.conn, None)
        if "varies" in (other.mapping, mapping):
            # No punch can aim at a port that changes with each destination: both are
            # told now, not after their whole --timeout.
            both = other.mapping == mapping
            return [_error(c, "untraversable", UNTRAVERSABLE_BOTH if both
                           else UNTRAVERSABLE[m == "varies"])
                    for c, m in ((other.conn, other.mapping), (conn, mapping))]
        prime = STRATEGY_PRIME in other.strategies and STRATEGY_PRIME in strategies
        strategy = STRATEGY_PRIME if prime else None
        if prime:
            pair = _Priming(session, other.conn, conn, now)
            self._priming[other.conn] = self._priming[conn] = pair
        return [
            Reply(other.conn, encode_message(
                "PEER", session=session, public=other.public, peer=public,
                peer_local=local, role="first", strategy=strategy), close=not prime),
            Reply(conn, encode_message(
                "PEER", session=session, public=public, peer=other.public,
                peer_local=other.local, role="second", strategy=strategy),
                close=not prime),
        ]

    def priming(self, conn: Hashable) -> bool:
        """True while ``conn`` is in a prime ordering exchange."""
        return conn in self._priming

    def step(self, conn: Hashable, verb: str) -> list[Reply]:
        """PRIMED from a client of a primed pair: GO to both once both said it."""
        pair = self._priming.get(conn)
        if pair is None:
            return [_error(conn, "bad-request", f"{verb} outside a primed pair")]
        if verb == "PRIMED" and conn not in pair.primed:
            pair.primed.add(conn)
            if len(pair.primed) < 2:
                return []
            self._end_priming(pair)
            # In one step, as PEER: both learn it at the same moment.
            return [Reply(c, encode_message("GO", session=pair.session), close=True)
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
        session = self._session_of.pop(conn, None)
        if session is not None and self._waiting.get(session, None) is not None:
            if self._waiting[session].conn == conn:
                del self._waiting[session]
        return []

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
