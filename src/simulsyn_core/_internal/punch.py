"""The punch: connect() from the shared local port to the peer until the SYNs meet.

``PunchSchedule`` decides, as pure code, what to do after each attempt; ``punch()`` is
the only part that touches sockets. Later strategies (who sends first, a TTL-limited
first SYN, synchronised starts) plug in as other schedules.

Why plain connect() works (RFC 9293 section 3.5, simultaneous open): a socket in
SYN-SENT that receives a SYN answers SYN+ACK and moves to SYN-RECEIVED. Through NATs
that silently drop an unsolicited SYN, the first SYN opens our NAT's conntrack entry and
dies at the peer's NAT; the peer's SYN then arrives as a reply and passes. The kernel
retransmits our SYN by itself, so one attempt may wait; an RST or ICMP error aborts the
attempt at once (tcp_v4_err), so we retry, paced, with jitter so that two peers that
both get refused do not stay in lockstep (on loopback, where the host itself answers
RST, the two SYN-SENT windows must overlap by chance).

Why no listening socket on the port between attempts (tried, measured, dropped): a SYN
from the peer that reaches the listener is answered with a SYN+ACK whose ISN is not the
one of the SYN our aborted attempt sent before. Behind a Linux NAT whose conntrack entry
for the 4-tuple is then in SYN_SENT2, the entry never reaches ESTABLISHED and our data
leaves un-NATed (from the private address): a connection that looks established on both
sides but is dead in one direction. A new connect() instead sends a fresh SYN, which
conntrack re-initialises the entry with.
"""

from __future__ import annotations

import errno
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .endpoint import Endpoint
from .sockets import (
    ERRNO_MEANING,
    abort,
    bound_socket,
    connect_nonblocking,
    errno_name,
    wait_connected,
)

DEFAULT_RETRIES = 50  # as the original example
RETRY_INTERVAL_S = 0.01  # pause after an attempt that was refused at once (RST/ICMP)
RETRY_JITTER = 0.5  # each pause is the interval times a factor in [1 - j, 1 + j]
ATTEMPT_TIMEOUT_S = 10.0  # one connect() waits this long while the kernel resends the SYN
PUNCH_TIMEOUT_S = 30.0  # the whole run, waiting for the peer included
# --strategy (session.py runs them)
STRATEGIES = ("auto", "plain", "sync", "order", "prime", "birthday")


@dataclass(frozen=True)
class Attempt:
    number: int
    started_s: float  # relative to the moment the peer was known
    duration_s: float
    outcome: str  # "connected", "unconfirmed", or an errno name ("ECONNREFUSED", ...)

    @property
    def connected(self) -> bool:
        return self.outcome == "connected"

    def describe(self) -> str:
        if self.outcome == "unconfirmed":
            return (f"attempt {self.number}: connected, but data did not pass both ways within "
                    f"{CONFIRM_TIMEOUT_S:.0f} s (a NAT lost track of the connection): aborted")
        if self.connected:
            return f"attempt {self.number}: connected after {self.duration_s * 1000:.1f} ms"
        code = getattr(errno, self.outcome, None)
        meaning = ERRNO_MEANING.get(code, "") if code is not None else ""
        return (f"attempt {self.number}: {self.outcome} after {self.duration_s * 1000:.1f} ms"
                + (f" ({meaning})" if meaning else ""))


@dataclass(frozen=True)
class Go:
    timeout_s: float  # start an attempt that may wait this long


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class GiveUp:
    reason: str


@dataclass
class PunchSchedule:
    """The original's strategy made bounded: up to ``retries`` connect() calls, paced."""

    retries: int = DEFAULT_RETRIES
    retry_interval_s: float = RETRY_INTERVAL_S
    attempt_timeout_s: float = ATTEMPT_TIMEOUT_S
    attempts: list[Attempt] = field(default_factory=list)
    pause_taken: bool = False  # the pause after the last attempt has been taken
    rng: random.Random = field(default_factory=random.Random)

    def next(self, remaining_s: float) -> Go | Pause | GiveUp:
        if self.attempts and self.attempts[-1].connected:
            return GiveUp("already connected")
        if len(self.attempts) >= self.retries:
            return GiveUp(f"no connection after {len(self.attempts)} attempt(s)"
                          + self._last_outcome())
        if remaining_s <= 0:
            return GiveUp(f"timed out after {len(self.attempts)} attempt(s)"
                          + self._last_outcome())
        last = self.attempts[-1] if self.attempts else None
        if last is not None and last.outcome != "ETIMEDOUT" and not self.pause_taken:
            factor = self.rng.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)
            return Pause(min(self.retry_interval_s * factor, remaining_s))
        return Go(min(self.attempt_timeout_s, remaining_s))

    def record(self, attempt: Attempt) -> None:
        self.attempts.append(attempt)
        self.pause_taken = False

    def paused(self) -> None:
        self.pause_taken = True

    def _last_outcome(self) -> str:
        if not self.attempts:
            return ""
        return f"; last: {self.attempts[-1].outcome}"


@dataclass
class PunchResult:
    sock: socket.socket | None
    attempts: list[Attempt]
    local: Endpoint | None
    error: str | None
    established_at: float | None = None  # time.monotonic()
    leftover: bytes = b""  # bytes the peer sent after confirming (the chat's first)
    confirmed: bool = False
    peer: Endpoint | None = None  # set when it differs from the peer the broker named


# Checks that data passes both ways on a fresh connection; returns the bytes received
# after the check, or None if the path is not confirmed within the time given.
Confirm = Callable[[socket.socket, float], "bytes | None"]
CONFIRM_TIMEOUT_S = 3.0  # one lost HELLO is resent by TCP after its 1 s initial RTO


def punch(local_port: int, peer: Endpoint, schedule: PunchSchedule, deadline: float,
          known_at: float, event: Callable[[str], None], confirm: Confirm | None = None,
          pending: socket.socket | None = None) -> PunchResult:
    """Run ``schedule`` against ``peer`` until connected, given up, or ``deadline``.

    With ``confirm``, a connection counts only once data has passed both ways; one that
    does not confirm is aborted and the schedule goes on ("unconfirmed").
    ``pending``: a socket whose connect() is already under way (the prime strategy's
    primed socket); the first attempt waits for it instead of starting one.
    """
    local: Endpoint | None = None
    while True:
        step = schedule.next(deadline - time.monotonic())
        if isinstance(step, GiveUp):
            if pending is not None:
                abort(pending)
            return PunchResult(None, schedule.attempts, local, step.reason)
        if isinstance(step, Pause):
            time.sleep(step.seconds)
            schedule.paused()
            continue
        number = len(schedule.attempts) + 1
        started = time.monotonic()
        if pending is not None:
            sock, pending = pending, None
            code = wait_connected(sock, step.timeout_s)
        else:
            try:
                sock = bound_socket(local_port, family=peer.family)
            except OSError as exc:
                # The port can be taken by another program between attempts: go on.
                outcome = errno_name(exc.errno or 0)
                schedule.record(Attempt(number, started - known_at, 0.0, outcome))
                event(f"attempt {number}: bind to port {local_port} failed: {exc.strerror}")
                continue
            code = connect_nonblocking(sock, peer, step.timeout_s)
        if code == 0:
            code = _reset_at_once(sock)
        ended = time.monotonic()
        attempt = Attempt(number, started - known_at, ended - started,
                          "connected" if code == 0 else errno_name(code))
        schedule.record(attempt)
        event(attempt.describe())
        if code == 0 and confirm is not None:
            leftover = confirm(sock, min(CONFIRM_TIMEOUT_S, deadline - time.monotonic()))
            if leftover is None:
                schedule.attempts[-1] = Attempt(number, started - known_at,
                                                time.monotonic() - started, "unconfirmed")
                event(schedule.attempts[-1].describe())
                abort(sock)
                continue
            event(f"attempt {number}: path confirmed: data passed both ways in "
                  f"{(time.monotonic() - ended) * 1000:.1f} ms")
            ended = time.monotonic()
            sock.setblocking(True)
            local = Endpoint.from_sockaddr(sock.getsockname())
            return PunchResult(sock, schedule.attempts, local, None, ended, leftover, True)
        if code == 0:
            sock.setblocking(True)
            local = Endpoint.from_sockaddr(sock.getsockname())
            return PunchResult(sock, schedule.attempts, local, None, ended)
        abort(sock)


def _reset_at_once(sock: socket.socket) -> int:
    """0 if the connection is still up; else the errno (crossing attempts can reset a
    connection right after it came up, when the peer aborted its side)."""
    try:
        sock.getpeername()
    except OSError as exc:
        return exc.errno or errno.ENOTCONN
    return 0
