"""The relay's bookkeeping as pure code (issue 12; docs/protocol.md, "Relay").

When no direct path exists, a broker started with ``--relay`` hands both peers of a pair
one token in PEER (``relay=``); each opens a new connection with ``SSYN1 RELAY
token=...`` and, once both came, the broker forwards bytes between the two. This module
decides (tokens, waits, the limits, why a session ended) and holds no socket and no
clock of its own: broker.py feeds ``now`` in and carries the decisions out
(relay_pump.py moves the bytes). Every table here is bounded in memory.
"""

from __future__ import annotations

import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

RELAY_TOKEN_TTL_S = 600.0  # an issued token is usable this long for one relay session
RELAY_WAIT_S = 30.0  # the first side of a relay waits this long for the second
RELAY_ENDED_KEEP_S = 120.0  # why a session ended is remembered this long (RELAY_STATUS)
RELAY_TOKENS_MAX = 65536  # tokens kept at most (issued, and ended reasons): oldest go first
# The rate's token bucket holds this many seconds' worth: a burst is at most a quarter of
# a second of the rate, so that a measured rate is the rate after a fraction of a second.
RATE_BURST_S = 0.25
TOKEN_RE = re.compile(r"[0-9a-f]{32}", re.ASCII)
STRATEGY_RELAY = "relay"  # REGISTER's strategies= name, PEER's strategy= value

# RELAY_ENDED reason= values
BUDGET, IDLE, SHUTDOWN, CLOSED, ACTIVE, UNKNOWN = (
    "budget", "idle", "shutdown", "closed", "active", "unknown")

# The defaults of `synprobe broker --relay-*` (README, "Relay (broker side)").
DEFAULT_SESSIONS = 64
DEFAULT_PER_IP = 4
DEFAULT_RATE = 1_000_000  # bytes a second per session, both directions together; 0: none
DEFAULT_BUDGET = 100_000_000  # bytes per session, both directions together; 0: none
DEFAULT_IDLE_S = 300.0


@dataclass(frozen=True)
class RelayLimits:
    sessions: int = DEFAULT_SESSIONS  # relayed sessions at once (waiting ones included)
    per_ip: int = DEFAULT_PER_IP  # sessions one address takes part in at once
    rate: int = DEFAULT_RATE  # bytes/s per session over both directions, 0: unlimited
    budget: int = DEFAULT_BUDGET  # bytes per session over both directions, 0: unlimited
    idle_s: float = DEFAULT_IDLE_S  # no byte either way for this long: cut
    wait_s: float = RELAY_WAIT_S  # the first side waits this long for the second


@dataclass(frozen=True)
class Wait:
    """The first side came: it waits (at most ``limits.wait_s``) for the second."""

    token: str


@dataclass(frozen=True)
class Pair:
    """The second side came: relay between ``first`` (which waited) and ``second``."""

    session: RelaySession


@dataclass(frozen=True)
class Refuse:
    """``ERROR code=<code> message=<message>``, then close."""

    code: str
    message: str


@dataclass
class _Pending:
    conn: Hashable
    ip: str
    since: float


@dataclass
class RelaySession:
    """One live relayed session: its two connections, its counts and its rate bucket.
    Direction 0 is first -> second, 1 is second -> first."""

    token: str
    first: Hashable
    second: Hashable
    ips: tuple[str, str]
    started: float
    limits: RelayLimits
    sent: list[int] = field(default_factory=lambda: [0, 0])
    last_activity: float = 0.0
    _tokens: float = 0.0
    _stamp: float = 0.0

    def __post_init__(self) -> None:
        self.last_activity = self._stamp = self.started
        self._tokens = self.burst

    @property
    def burst(self) -> float:
        return max(1.0, self.limits.rate * RATE_BURST_S) if self.limits.rate else float("inf")

    @property
    def total(self) -> int:
        return self.sent[0] + self.sent[1]

    def allowance(self, now: float) -> float:
        """How many bytes the rate lets through now (inf: no rate)."""
        if not self.limits.rate:
            return float("inf")
        return min(self.burst, self._tokens + (now - self._stamp) * self.limits.rate)

    def wait_for(self, want: float, now: float) -> float:
        """Seconds until ``want`` bytes (at most the burst) are allowed."""
        if not self.limits.rate:
            return 0.0
        missing = min(want, self.burst) - self.allowance(now)
        return max(0.0, missing / self.limits.rate)

    def over_budget(self, n: int) -> bool:
        """Would ``n`` more bytes take the session past its budget?"""
        return bool(self.limits.budget) and self.total + n > self.limits.budget

    def count(self, direction: int, n: int, now: float) -> None:
        """``n`` bytes were read for ``direction`` (forwarded, or about to be)."""
        if self.limits.rate:
            self._tokens = self.allowance(now) - n
            self._stamp = now
        self.sent[direction] += n
        self.last_activity = now

    def idle_left(self, now: float) -> float:
        """Seconds until the session is idle for too long (<= 0: it is)."""
        return self.last_activity + self.limits.idle_s - now


class RelayTable:
    """Tokens issued in PEER, the first sides waiting for their peers, the live sessions,
    and why recent ones ended. The limits are checked here: ``arrive`` answers ``Wait``,
    ``Pair`` or ``Refuse`` (codes ``unknown-token``, ``relay-full``, ``relay-busy``)."""

    def __init__(self, limits: RelayLimits | None = None,
                 max_tokens: int = RELAY_TOKENS_MAX, token_ttl_s: float = RELAY_TOKEN_TTL_S,
                 ended_keep_s: float = RELAY_ENDED_KEEP_S,
                 new_token: Callable[[], str] = lambda: secrets.token_hex(16)) -> None:
        self.limits = limits or RelayLimits()
        self.max_tokens = max_tokens
        self.token_ttl_s = token_ttl_s
        self.ended_keep_s = ended_keep_s
        self._new_token = new_token
        self._issued: OrderedDict[str, float] = OrderedDict()  # token -> issued at
        self._pending: dict[str, _Pending] = {}
        self._live: dict[str, RelaySession] = {}
        self._ended: OrderedDict[str, tuple[str, str, float]] = OrderedDict()
        self._per_ip: dict[str, int] = {}  # sessions (waiting or live) each address is in

    def __len__(self) -> int:
        """Relayed sessions at once: the live ones and those whose first side waits."""
        return len(self._live) + len(self._pending)

    def issue(self, now: float) -> str:
        """A new token (for both PEER lines of one pair)."""
        self._prune(now)
        token = self._new_token()
        self._issued[token] = now
        while len(self._issued) > self.max_tokens:
            self._issued.popitem(last=False)
        return token

    def arrive(self, token: str, conn: Hashable, ip: str, now: float) -> Wait | Pair | Refuse:
        """``SSYN1 RELAY token=<token>`` on connection ``conn`` from address ``ip``."""
        self._prune(now)
        pending = self._pending.get(token)
        if pending is None:
            if token not in self._issued:
                return Refuse("unknown-token", "no relay session has this token: never "
                              "issued, expired, or used already")
            if len(self) >= self.limits.sessions:
                return Refuse("relay-full", f"the broker relays {self.limits.sessions} "
                              "sessions at once already; try later")
            if self._per_ip.get(ip, 0) >= self.limits.per_ip:
                return Refuse("relay-busy", f"this address takes part in {self.limits.per_ip}"
                              " relayed sessions already")
            self._pending[token] = _Pending(conn, ip, now)
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
            return Wait(token)
        if ip != pending.ip and self._per_ip.get(ip, 0) >= self.limits.per_ip:
            return Refuse("relay-busy", f"this address takes part in {self.limits.per_ip} "
                          "relayed sessions already")
        del self._pending[token]
        self._issued.pop(token, None)  # used: one session per token
        if ip != pending.ip:
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        session = RelaySession(token, pending.conn, conn, (pending.ip, ip), now, self.limits)
        self._live[token] = session
        return Pair(session)

    def leave(self, token: str, conn: Hashable) -> bool:
        """The waiting first side of ``token`` went (its wait timed out, or it closed):
        the token is usable again (until its TTL). True if it was waiting."""
        pending = self._pending.get(token)
        if pending is None or pending.conn != conn:
            return False
        del self._pending[token]
        self._drop_ip(pending.ip)
        return True

    def end(self, token: str, reason: str, message: str, now: float) -> RelaySession | None:
        """A live session ended (``reason``: budget, idle, shutdown, closed): remembered for
        RELAY_STATUS for ``ended_keep_s``."""
        session = self._live.pop(token, None)
        if session is None:
            return None
        for ip in set(session.ips):
            self._drop_ip(ip)
        self._ended[token] = (reason, message, now)
        while len(self._ended) > self.max_tokens:
            self._ended.popitem(last=False)
        return session

    def status(self, token: str, now: float) -> tuple[str, str]:
        """RELAY_ENDED's (reason, message) for ``token``."""
        self._prune(now)
        session = self._live.get(token)
        if session is not None:
            return ACTIVE, (f"relaying for {now - session.started:.0f} s, "
                            f"{session.total} bytes so far")
        if token in self._pending:
            return ACTIVE, "one side waits for the other"
        ended = self._ended.get(token)
        if ended is not None:
            return ended[0], ended[1]
        if token in self._issued:
            return UNKNOWN, "issued, no relay session used it yet"
        return UNKNOWN, "no relay session has this token (or it ended over " \
                        f"{self.ended_keep_s:g} s ago)"

    def live(self) -> list[RelaySession]:
        return list(self._live.values())

    def _drop_ip(self, ip: str) -> None:
        left = self._per_ip.get(ip, 1) - 1
        if left > 0:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)

    def _prune(self, now: float) -> None:
        """Forget expired tokens and old reasons (oldest first: amortised O(1))."""
        issued = self._issued
        while issued:
            token, at = next(iter(issued.items()))
            if now - at < self.token_ttl_s:
                break
            del issued[token]
        ended = self._ended
        while ended:
            token, (_, _, at) = next(iter(ended.items()))
            if now - at < self.ended_keep_s:
                break
            del ended[token]


def budget_message(limits: RelayLimits) -> str:
    return f"the session passed the relay's budget of {limits.budget} bytes"


def idle_message(limits: RelayLimits) -> str:
    return f"no byte either way for {limits.idle_s:g} s (the relay's idle limit)"
