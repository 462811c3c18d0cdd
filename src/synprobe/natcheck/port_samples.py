"""The I/O of port_range: K fresh connections to the broker, each asking OBSERVE, so the
public port the NAT gave each shows (plain sockets, no privileges; port_range.classify
reads the ports).

Bounded every way: at most ``count`` connections, started at most ``RATE_PER_S`` a
second, at most ``MAX_OPEN`` open at once (the broker serves one address at most
``broker.MAX_CONNECTIONS_PER_IP`` = 64 connections at once, and others behind the same
NAT may need some), each given ``CONNECTION_TIMEOUT_S``, all of them ``time_limit(count)``;
and it stops early after ``max_failures(count)`` failed connections. The broker closes
each connection after its answer; the client closes on that FIN, so it keeps no
TIME_WAIT; a connection that failed or timed out is closed with an RST.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.sockets import abort, describe_errno
from simulsyn_core._internal.wire import LineDecoder, ProtocolError

from . import protocol as P

DEFAULT_PORT_SAMPLES = 1000  # nat-check --port-samples
RATE_PER_S = 500.0  # new connections a second at most
MAX_OPEN = 48  # open at once at most: under the broker's 64 per address, with room
CONNECTION_TIMEOUT_S = 3.0  # connect, OBSERVE, OBSERVED: as the mapping probe's
MAX_SAMPLES = 10000  # --port-samples at most
PROGRESS_EVERY_S = 0.1
SELECT_MAX_S = 0.05
PACE_CATCHUP_S = 0.01

Progress = Callable[[float, float], None]


def time_limit(count: int, rate: float = RATE_PER_S) -> float:
    """How long ``count`` samples may take in all: twice the paced time, plus 5 s."""
    return 5.0 + 2.0 * count / rate


def max_failures(count: int) -> int:
    """Failed connections after which sampling stops: the broker or the path is unwell."""
    return max(20, count // 10)


@dataclass(frozen=True)
class Sampled:
    """What the sampling connections saw."""

    asked: int
    ports: tuple[int, ...]  # the public port of each answered connection, in order
    failed: int = 0
    duration_s: float = 0.0
    stopped: str = ""  # why it ended before ``asked`` connections were made ("" if not)
    first_error: str = ""  # what the first failed connection met

    def summary(self) -> str:
        out = (f"{len(self.ports)} of {self.asked} fresh connections answered OBSERVE in "
               f"{self.duration_s:.1f} s")
        if self.failed:
            out += f", {self.failed} failed (first: {self.first_error})"
        if self.stopped:
            out += f"; stopped: {self.stopped}"
        return out


@dataclass
class _Conn:
    started: float
    decoder: LineDecoder = field(default_factory=LineDecoder)
    asked: bool = False  # OBSERVE sent
    port: int | None = None  # OBSERVED's public port


@dataclass
class _Tally:
    ports: list[int] = field(default_factory=list)
    failed: int = 0
    first_error: str = ""

    def fail(self, why: str) -> None:
        self.failed += 1
        self.first_error = self.first_error or why


def run(server: Endpoint, count: int, progress: Progress | None = None,
        rate: float = RATE_PER_S, max_open: int = MAX_OPEN,
        limit_s: float | None = None) -> Sampled:
    """Make up to ``count`` connections to ``server`` from kernel-chosen local ports and
    return the public ports the broker saw. Every socket is closed on return."""
    count = max(0, min(count, MAX_SAMPLES))
    start = time.monotonic()
    deadline = start + (time_limit(count, rate) if limit_s is None else limit_s)
    tally = _Tally()
    conns: dict[socket.socket, _Conn] = {}
    launched = 0
    next_at = start  # the pace: one new connection each 1/rate s
    stopped = ""
    last_progress = 0.0
    sel = selectors.DefaultSelector()
    try:
        while launched < count or conns:
            now = time.monotonic()
            if now >= deadline:
                stopped = f"the time limit of {deadline - start:.0f} s"
                break
            if tally.failed >= max_failures(count):
                stopped = f"{tally.failed} connections failed"
                break
            # In flight at most what the failure budget has left: each connection can
            # fail once, so the sampler stops at exactly max_failures, never past it.
            budget = max_failures(count)
            while (launched < count and len(conns) < min(max_open, budget - tally.failed)
                   and now >= next_at):
                launched += 1
                # A late wake-up (epoll waits whole milliseconds) is made up for, by
                # PACE_CATCHUP_S at most: never more than rate * (t + PACE_CATCHUP_S) in t s.
                next_at = max(next_at, now - PACE_CATCHUP_S) + 1.0 / rate
                new = _open(server, tally)
                if new is not None:
                    conns[new] = _Conn(now)
                    sel.register(new, selectors.EVENT_WRITE, new)
            ready_to_launch = (launched < count
                               and len(conns) < min(max_open, budget - tally.failed))
            wait = max(0.0, next_at - time.monotonic()) if ready_to_launch else SELECT_MAX_S
            for key, _events in sel.select(min(SELECT_MAX_S, wait)):
                ready: socket.socket = key.data
                if not _step(ready, conns[ready], tally, sel):
                    _drop(ready, conns, sel, clean=conns[ready].port is not None)
            now = time.monotonic()
            for sock in [s for s, c in conns.items() if now - c.started > CONNECTION_TIMEOUT_S]:
                if conns[sock].port is None:
                    tally.fail(f"no answer within {CONNECTION_TIMEOUT_S:g} s")
                _drop(sock, conns, sel, clean=False)
            if progress is not None and now - last_progress >= PROGRESS_EVERY_S:
                progress(len(tally.ports), count)
                last_progress = now
    finally:
        for sock in list(conns):
            _drop(sock, conns, sel, clean=False)
        sel.close()
    if progress is not None:
        progress(count if not stopped else len(tally.ports), count)
    return Sampled(count, tuple(tally.ports), tally.failed, time.monotonic() - start,
                   stopped, tally.first_error)


def _open(server: Endpoint, tally: _Tally) -> socket.socket | None:
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:
        tally.fail(f"socket: {exc.strerror or exc}")
        return None
    sock.setblocking(False)
    # As the mapping probe: the handshake's last ACK rides on OBSERVE (one packet fewer).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
    code = sock.connect_ex(server.sockaddr)
    if code not in (0, errno.EINPROGRESS):
        sock.close()
        tally.fail(f"connect to {server}: {describe_errno(code)}")
        return None
    return sock


def _step(sock: socket.socket, conn: _Conn, tally: _Tally, sel: selectors.BaseSelector
          ) -> bool:
    """Advance one connection that is ready; False when it is finished (or failed)."""
    if not conn.asked:
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            tally.fail(f"connect: {describe_errno(code)}")
            return False
        message = bytes(P.Observe())
        try:
            sent = sock.send(message)
        except OSError as exc:
            tally.fail(f"send: {exc.strerror or exc}")
            return False
        if sent != len(message):
            tally.fail("send: OBSERVE did not fit the socket buffer")
            return False
        conn.asked = True
        sel.modify(sock, selectors.EVENT_READ, sock)
        return True
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return True
    except OSError as exc:
        if conn.port is None:
            tally.fail(f"recv: {exc.strerror or exc}")
        return False
    if not data:  # the broker's FIN: done, or closed at accept (its per-address cap)
        if conn.port is None:
            tally.fail("the broker closed the connection without answering (its limit of "
                       "connections per address?)")
        return False
    try:
        for msg in conn.decoder.feed(data):
            if msg.verb == P.Observed.VERB and conn.port is None:
                conn.port = P.Observed.decode(msg).public.port
                tally.ports.append(conn.port)
            elif msg.verb == "ERROR":
                tally.fail(f"the broker answered ERROR {msg.get('code')}")
                return False
    except ProtocolError as exc:
        tally.fail(f"bad answer: {exc}")
        return False
    return True


def _drop(sock: socket.socket, conns: dict[socket.socket, _Conn],
          sel: selectors.BaseSelector, clean: bool) -> None:
    conns.pop(sock, None)
    try:
        sel.unregister(sock)
    except (KeyError, ValueError):
        pass
    if clean:
        sock.close()
    else:
        abort(sock)
