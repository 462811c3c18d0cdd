"""Moves a relayed session's bytes: the thin I/O layer around relay.py.

The broker hands over two connections that said ``SSYN1 RELAY`` (their sockets,
non-blocking, already in its epoll set: ``_Readers``). From then on nothing parses
them: a side's bytes are read in large chunks (``READ_CHUNK``) into one buffer and sent
to the other side's socket at once; only what the kernel does not take is copied, and
reading the source pauses while more than ``HIGH_WATER`` waits for the destination, so a
session holds at most about HIGH_WATER + READ_CHUNK per direction. A FIN is passed on as
a FIN (SHUT_WR once everything before it went); a reset, a cut (budget, idle) or the
broker's stop resets both connections (SO_LINGER 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

from .relay import BUDGET, CLOSED, IDLE, RelaySession, budget_message, idle_message
from .wire import encode_message

READ_CHUNK = 256 * 1024  # one recv; loopback moves 64 KiB segments, the socket more
HIGH_WATER = 1 << 20  # unsent bytes towards one side before its source stops being read
LOW_WATER = 256 * 1024  # ... and reading resumes below this
WAIT_BUFFER_MAX = 256 * 1024  # bytes a waiting side may send before RELAYED (then paused)
RATE_STEP = 64 * 1024  # a rate-paused session reads again once this much is allowed
RELAYED = encode_message("RELAYED")
_LINGER_RST = struct.pack("ii", 1, 0)

# One read buffer for every session: the loop runs one callback at a time, and what is
# read is sent, or copied to the destination's queue, before the next read.
_BUF = bytearray(READ_CHUNK)
_VIEW = memoryview(_BUF)


class Readers(Protocol):
    def watch(self, fd: int, callback: Callable[[], None]) -> None: ...
    def unwatch(self, fd: int, closing: bool = False) -> None: ...


class Side:
    """One connection of a relay. ``close(rst)`` closes it through the broker's transport
    (so that it is counted out when its descriptor is closed)."""

    __slots__ = ("conn", "public", "sock", "fd", "close", "inbound", "out", "eof", "shut",
                 "reading", "writing", "blocked", "gone", "timer")

    def __init__(self, conn: int, public: Any, sock: socket.socket,
                 close: Callable[[bool], None], inbound: bytes) -> None:
        self.conn = conn
        self.public = public
        self.sock = sock
        self.fd = sock.fileno()
        self.close = close
        self.inbound = bytearray(inbound)  # read before the pair was made
        self.out = bytearray()  # not sent yet to this side
        self.eof = False  # this side sent its FIN
        self.shut = False  # we sent ours to this side (SHUT_WR)
        self.reading = False
        self.writing = False
        self.blocked = False  # its destination holds more than HIGH_WATER unsent
        self.gone: Callable[[], None] | None = None  # while waiting: it reset
        self.timer: asyncio.TimerHandle | None = None  # while waiting: RELAY_WAIT_S

    # --- the first side, waiting for the second -------------------------------------

    def wait(self, readers: Readers, gone: Callable[[], None]) -> None:
        """Keep reading while the peer has not come (bounded: WAIT_BUFFER_MAX), to see a
        reset and to keep the bytes sent early, in order."""
        self.gone = gone
        if len(self.inbound) < WAIT_BUFFER_MAX:
            self.reading = True
            readers.watch(self.fd, lambda: self._waiting_readable(readers))

    def _waiting_readable(self, readers: Readers) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.stop(readers)
            if self.gone is not None:
                self.gone()
            return
        if not data:
            self.eof = True
        self.inbound += data
        if not data or len(self.inbound) >= WAIT_BUFFER_MAX:
            self.stop(readers)

    def stop(self, readers: Readers) -> None:
        if self.reading:
            self.reading = False
            readers.unwatch(self.fd)


class RelayPump:
    """Forwards between ``first`` and ``second`` until both sent their FIN and all was
    delivered, or a limit cuts the session; then ``done(pump, reason, message)``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, readers: Readers,
                 session: RelaySession, first: Side, second: Side,
                 done: Callable[[RelayPump, str, str], None]) -> None:
        self.loop = loop
        self.readers = readers
        self.session = session
        self.sides = (first, second)
        self.done = done
        self.ended = False
        self.rate_paused = False
        self._rate_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._callbacks = (lambda: self._readable(0), lambda: self._readable(1))

    def start(self) -> None:
        """RELAYED to both, then what each sent early, then the bytes as they come."""
        first, second = self.sides
        for side in self.sides:
            side.stop(self.readers)
            side.gone = None
        self._send(0, RELAYED)
        self._send(1, RELAYED)
        now = time.monotonic()
        for i, side in enumerate(self.sides):
            early, side.inbound = side.inbound, bytearray()
            if early and not self.ended:
                if self.session.over_budget(len(early)):
                    self.end(BUDGET, budget_message(self.session.limits), rst=True)
                    return
                self.session.count(i, len(early), now)
                self._forward(i, memoryview(early))
        for i, side in enumerate(self.sides):
            if side.eof and not self.ended:
                self._passed_eof(i)
        if self.session.limits.idle_s and not self.ended:
            self._idle_timer = self.loop.call_later(self.session.limits.idle_s, self._idle)
        self._update()

    # --- reading ------------------------------------------------------------------------

    def _update(self) -> None:
        """Read each side unless it is done, its destination is full, or the rate says
        wait."""
        if self.ended:
            return
        for i, side in enumerate(self.sides):
            want = not (side.eof or side.blocked or self.rate_paused)
            if want and not side.reading:
                side.reading = True
                self.readers.watch(side.fd, self._callbacks[i])
            elif not want and side.reading:
                side.reading = False
                self.readers.unwatch(side.fd)

    def _readable(self, i: int) -> None:
        session = self.session
        want = READ_CHUNK
        if session.limits.rate:
            now = time.monotonic()
            allowed = session.allowance(now)
            if allowed < min(RATE_STEP, session.burst):
                self._pause_for_rate(now)
                return
            want = min(want, int(allowed))
        src = self.sides[i]
        try:
            n = src.sock.recv_into(_BUF, want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.end(CLOSED, f"a side reset its connection ({exc.strerror or exc})", rst=True)
            return
        if n == 0:
            src.eof = True
            self._update()
            self._passed_eof(i)
            return
        if session.over_budget(n):
            self.end(BUDGET, budget_message(session.limits), rst=True)
            return
        session.count(i, n, time.monotonic())
        self._forward(i, _VIEW[:n])

    def _pause_for_rate(self, now: float) -> None:
        self.rate_paused = True
        self._update()
        wait = self.session.wait_for(RATE_STEP, now)
        self._rate_timer = self.loop.call_later(max(wait, 0.001), self._rate_resume)

    def _rate_resume(self) -> None:
        self._rate_timer = None
        self.rate_paused = False
        self._update()

    # --- writing ------------------------------------------------------------------------

    def _forward(self, i: int, data: memoryview | bytes) -> None:
        """Bytes read from side ``i`` go to the other side."""
        self._send(1 - i, data)
        if len(self.sides[1 - i].out) > HIGH_WATER and not self.ended:
            self.sides[i].blocked = True
            self._update()

    def _send(self, j: int, data: memoryview | bytes) -> None:
        dst = self.sides[j]
        if self.ended:
            return
        if dst.out:
            dst.out += data
            return
        try:
            sent = dst.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.end(CLOSED, f"a side reset its connection ({exc.strerror or exc})", rst=True)
            return
        if sent < len(data):
            dst.out += data[sent:]
            dst.writing = True
            self.loop.add_writer(dst.fd, self._writable, j)

    def _writable(self, j: int) -> None:
        dst = self.sides[j]
        try:
            sent = dst.sock.send(dst.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.end(CLOSED, f"a side reset its connection ({exc.strerror or exc})", rst=True)
            return
        del dst.out[:sent]
        src = self.sides[1 - j]
        if src.blocked and len(dst.out) <= LOW_WATER:
            src.blocked = False
            self._update()
        if not dst.out:
            dst.writing = False
            self.loop.remove_writer(dst.fd)
            if src.eof:
                self._passed_eof(1 - j)

    def _passed_eof(self, i: int) -> None:
        """Side ``i`` sent its FIN: once all it sent before went, the other side gets one
        (SHUT_WR); once both directions are done, the session ends."""
        dst = self.sides[1 - i]
        if dst.out or dst.shut:
            return
        dst.shut = True
        try:
            dst.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.end(CLOSED, f"a side reset its connection ({exc.strerror or exc})", rst=True)
            return
        if all(s.eof and s.shut for s in self.sides):
            self.end(CLOSED, "both sides finished", rst=False)

    # --- the end ------------------------------------------------------------------------

    def _idle(self) -> None:
        self._idle_timer = None
        if self.ended:
            return
        left = self.session.idle_left(time.monotonic())
        if left <= 0:
            self.end(IDLE, idle_message(self.session.limits), rst=True)
        else:
            self._idle_timer = self.loop.call_later(left, self._idle)

    def end(self, reason: str, message: str, rst: bool) -> None:
        """Stop both sides and close them: with an RST when cut (``rst``), else after
        what was sent (nothing is left: both directions delivered their FIN)."""
        if self.ended:
            return
        self.ended = True
        for timer in (self._rate_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        for side in self.sides:
            if side.reading:
                side.reading = False
                self.readers.unwatch(side.fd)
            if side.writing:
                side.writing = False
                self.loop.remove_writer(side.fd)
            side.out.clear()
            if rst:
                with contextlib.suppress(OSError):
                    side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            side.close(rst)
        self.done(self, reason, message)
