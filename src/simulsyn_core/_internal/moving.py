"""The chat of a relayed session, and its move to a direct connection when one comes up.

A relayed session runs over the broker's relay (a TCP connection to the broker that it
splices to the peer's), sealed as any other (secure.py): the relay sees records it
cannot open. Meanwhile the punch goes on in the background (session.py's upgrade
rounds); when a direct connection comes up and its own PAKE with the same password
succeeds, the chat moves onto it, as libp2p's DCUtR upgrades a relayed connection:

- every chat record of a relayed session is NUMBERED (``number:u64 | text``), from 0 in
  each direction, on both connections;
- a side that moves sends ``MOVE(n)`` on the relay, n being the number of its next
  message, then closes the relay's sending side: its messages from n on go over the
  direct connection;
- the receiver takes the relay's messages up to the peer's MOVE, then the direct
  connection's (those that came before the MOVE wait, bounded); each number must be the
  one due: an older one is a duplicate (dropped, and said), a later one means one was
  lost (the connection is reset: ``Tampered``).

So no message is lost, repeated or reordered by the move: TCP orders each connection,
MOVE orders the two. Each side moves its own sending direction; a side whose input had
already ended (END sent on the relay) does not move it. If the direct connection breaks
after the move the chat ends (PEER_LOST): it does not move back.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from .chat import OUTBUF_MAX, SELECT_SLICE_S, USER_TIMEOUT_MS, LineInput, _print_frame
from .exitcodes import ExitStatus
from .secure import END, MOVE, NUMBER, NUMBERED, Channel, Tampered, tell_peer
from .sockets import abort, enable_keepalive, queued_before_reset

HELD_MAX = 4096  # direct records that came before the peer's MOVE, held at most
END_LINGER_S = 2.0  # once both sides finished, for the connections' last FINs
# The peer moved, our end of its direct connection is not here yet: the two ends finish
# their PAKE within milliseconds of each other, so this only bounds a failure.
DIRECT_WAIT_S = 15.0


@dataclass
class Upgrade:
    """A direct connection, authenticated with the session's password, ready to take the
    chat: its channel, and the records that came with the peer's confirmation."""

    sock: socket.socket
    channel: Channel
    early: list[tuple[int, bytes]]
    what: str  # for the event line: "10.1.0.2:4000 <-> 203.0.113.2:4001"


@dataclass
class _Leg:
    name: str
    sock: socket.socket
    channel: Channel
    outbuf: bytearray = field(default_factory=bytearray)
    shut_after: bool = False  # shut our sending side once outbuf is sent
    write_shut: bool = False
    eof: bool = False  # the peer's FIN came (or the connection is gone)
    moved_in: bool = False  # the peer's MOVE came on it (the relay)

    def prepare(self) -> None:
        enable_keepalive(self.sock)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
        self.sock.setblocking(False)


class _Lost(Exception):
    """A connection broke: ``leg`` names it."""

    def __init__(self, leg: _Leg, why: str) -> None:
        super().__init__(why)
        self.leg = leg


class _Abandoned(Exception):
    """abandon() was called."""


class Upgrades:
    """The background rounds' results, handed to the chat's loop through a pipe."""

    def __init__(self) -> None:
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._ready: list[Upgrade] = []

    def offer(self, upgrade: Upgrade) -> bool:
        """From the background: hand a direct connection over (False: the chat ended,
        the caller closes it)."""
        with self._lock:
            if self.stop.is_set():
                return False
            self._ready.append(upgrade)
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"u")
        return True

    def take(self) -> Upgrade | None:
        with contextlib.suppress(OSError):
            os.read(self.wake_r, 64)
        with self._lock:
            return self._ready.pop(0) if self._ready else None

    def close(self) -> None:
        """No more upgrades: any that came too late is closed."""
        with self._lock:
            self.stop.set()
            late, self._ready = self._ready, []
        for upgrade in late:
            abort(upgrade.sock)
        for fd in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class MovingChat:
    """The chat loop of a relayed session (module docstring). ``relay_broke()`` says why
    the relay connection was reset (the broker's RELAY_STATUS); ``on_moved(t, upgrade)`` is
    called with time.monotonic() when our sending side moved onto ``upgrade``.

    ``app``: instead of stdin's lines and ``out``, a byte stream (the library's
    Connection: one end of a socketpair, the app holds the other): what the app sends is
    sealed as it comes, the peer's bytes are written back to it unchanged; its EOF is our
    END, the peer's END shuts its reading side; on a failure it is reset."""

    def __init__(self, relay: socket.socket, channel: Channel, early: list[tuple[int, bytes]],
                 stdin_fd: int, out: TextIO | None, event: Callable[[str], None],
                 upgrades: Upgrades | None, relay_broke: Callable[[], str],
                 on_moved: Callable[[float, Upgrade], None],
                 app: socket.socket | None = None) -> None:
        self.app = app
        self.app_out = bytearray()  # the peer's bytes, for the app
        self.app_shut = False
        if app is not None:
            app.setblocking(False)
            stdin_fd = app.fileno()
        self.relay = _Leg("relay", relay, channel)
        self.direct: _Leg | None = None
        self.out_leg = self.in_leg = self.relay
        self.early = early
        self.stdin_fd, self.out, self.event = stdin_fd, out, event
        self.upgrades = upgrades
        self.relay_broke = relay_broke
        self.on_moved = on_moved
        self.lines = LineInput()
        self.next_out = self.next_in = 0
        self.stdin_open = True
        self.out_done = False  # our END is queued
        self.peer_done = False  # the peer's END came on the leg it sends on
        self.held: list[tuple[int, bytes]] = []  # direct records before the peer's MOVE
        self.waiting_direct: float | None = None  # since when the peer moved, and our
        # direct connection is not up yet
        self.duplicates = 0
        self.finished_at: float | None = None
        self.status: ExitStatus | None = None  # set on a failure
        self.failure = ""
        self.abandoned = False
        self._wake_r, self._wake_w = os.pipe()  # abandon() wakes the loop
        os.set_blocking(self._wake_r, False)

    # --- sending ---------------------------------------------------------------------

    def _take_input(self, chunk: bytes) -> None:
        leg = self.out_leg
        if self.app is not None:
            if chunk:
                records, count = leg.channel.seal_numbered_bytes(self.next_out, chunk)
                leg.outbuf += records
                self.next_out += count
        else:
            for line in self.lines.feed(chunk):
                records, count = leg.channel.seal_numbered(self.next_out, line)
                leg.outbuf += records
                self.next_out += count
        if not chunk:
            leg.outbuf += leg.channel.seal(END)
            leg.shut_after = True
            self.stdin_open = False
            self.out_done = True
            self.event(f"end of input: sent {self.next_out} message(s)"
                       + (" over the relay" if leg is self.relay else ""))

    def _adopt(self, upgrade: Upgrade) -> None:
        direct = _Leg("direct", upgrade.sock, upgrade.channel)
        direct.prepare()
        self.direct = direct
        if not self.out_done:
            self.relay.outbuf += self.relay.channel.seal(MOVE, NUMBER.pack(self.next_out))
            self.relay.shut_after = True
            self.out_leg = direct
            self.on_moved(time.monotonic(), upgrade)
            self.event(f"moved to the direct connection {upgrade.what}: our messages from "
                       f"#{self.next_out} on go over it ({self.next_out} went over the relay)")
        else:
            direct.shut_after = True  # nothing of ours goes over it
            self.event(f"direct connection {upgrade.what} up; our input had ended, so "
                       "nothing of ours moves")
        for kind, payload in upgrade.early:
            self._record(direct, kind, payload)
        if self.waiting_direct is not None:
            self._switch_in()

    # --- receiving -------------------------------------------------------------------

    def _record(self, leg: _Leg, kind: int, payload: bytes) -> None:
        if leg is not self.in_leg:
            if len(self.held) >= HELD_MAX:
                raise Tampered("reordered", f"over {HELD_MAX} direct records before the "
                               "peer's move")
            self.held.append((kind, payload))
            return
        if kind == NUMBERED:
            (number,) = NUMBER.unpack_from(payload)
            if number < self.next_in:
                self.duplicates += 1
                self.event(f"message #{number} came again: dropped (a duplicate)")
            elif number > self.next_in:
                raise Tampered("reordered", f"message #{number} came when #{self.next_in} "
                               "was due (one was lost)")
            else:
                self.next_in += 1
                if self.app is not None:
                    self.app_out += payload[NUMBER.size:]
                else:
                    assert self.out is not None
                    _print_frame(payload[NUMBER.size:], self.out, self.event)
        elif kind == MOVE:
            if leg is not self.relay:
                raise Tampered("altered", "a move on the direct connection")
            (number,) = NUMBER.unpack_from(payload)
            if number != self.next_in:
                raise Tampered("reordered", f"the peer moved at message #{number}, "
                               f"#{self.next_in} was due")
            leg.moved_in = True
            self.event(f"the peer moved: its messages from #{number} on come over the "
                       "direct connection")
            if self.direct is None:
                self.waiting_direct = time.monotonic()
            else:
                self._switch_in()
        elif kind == END:
            self.peer_done = True
            self.event(f"peer finished sending: received {self.next_in} message(s)")
        else:
            raise Tampered("altered", f"a record of type {kind} in a relayed session")

    def _switch_in(self) -> None:
        assert self.direct is not None
        self.waiting_direct = None
        self.in_leg = self.direct
        held, self.held = self.held, []
        for kind, payload in held:
            self._record(self.direct, kind, payload)
        self._check_eof(self.direct)

    def _check_eof(self, leg: _Leg) -> None:
        if leg.eof and leg is self.in_leg and not self.peer_done and not \
                (leg is self.relay and leg.moved_in):
            raise Tampered("truncated", f"the peer's stream over the {leg.name} connection "
                           "stopped without its end record")

    def _needed(self, leg: _Leg) -> bool:
        """Whether anything is still to come or to go over ``leg``."""
        return bool(leg.outbuf) or (leg is self.out_leg and not leg.write_shut) or (
            leg is self.in_leg and not self.peer_done) or (
            leg is self.relay and self.in_leg is self.relay and not leg.moved_in)

    def _read(self, leg: _Leg) -> None:
        try:
            data = leg.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if self._needed(leg):
                raise _Lost(leg, str(exc)) from None
            leg.eof = True  # reset after its part was done (the relay, say): no matter
            return
        if not data:
            leg.eof = True
            if leg.channel.pending:
                raise Tampered("truncated", f"the {leg.name} connection closed inside a record")
            self._check_eof(leg)
            return
        for kind, payload in leg.channel.feed(data):
            self._record(leg, kind, payload)

    def _to_app(self) -> None:
        assert self.app is not None
        try:
            del self.app_out[: self.app.send(self.app_out)]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # the app closed its end: what it does not read is dropped
            self.app_out.clear()

    def _write(self, leg: _Leg) -> None:
        try:
            del leg.outbuf[: leg.sock.send(leg.outbuf)]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            for data in queued_before_reset(leg.sock):  # the peer's ALERT raises Tampered
                for kind, payload in leg.channel.feed(data):
                    self._record(leg, kind, payload)
            raise _Lost(leg, str(exc)) from None

    # --- the loop --------------------------------------------------------------------

    def _legs(self) -> list[_Leg]:
        return [self.relay] + ([self.direct] if self.direct is not None else [])

    def _done(self) -> bool:
        legs = self._legs()
        if self.stdin_open or not self.peer_done or any(leg.outbuf for leg in legs) or \
                self.app_out:
            return False
        if all(leg.eof for leg in legs):
            return True
        now = time.monotonic()
        if self.finished_at is None:
            self.finished_at = now
        return now - self.finished_at > END_LINGER_S

    def run(self) -> ExitStatus:
        self.relay.prepare()
        try:
            for kind, payload in self.early:
                self._record(self.relay, kind, payload)
            while not self._done():
                self._turn()
        except _Lost as exc:
            if exc.leg is self.relay and self.waiting_direct is None:
                why = self.relay_broke()
                self.failure = f"connection to the peer lost: {why}"
            else:
                self.failure = f"connection to the peer lost (the direct connection): {exc}"
            self.event(self.failure)
            for leg in self._legs():
                abort(leg.sock)
            return self._failed(ExitStatus.PEER_LOST)
        except Tampered as exc:
            for leg in self._legs():
                tell_peer(leg.sock, leg.channel, exc, bytes(leg.outbuf))
                abort(leg.sock)
            self.failure = f"connection closed: {exc.describe()}"
            self.event(self.failure)
            return self._failed(ExitStatus.TAMPERED)
        except _Abandoned:
            for leg in self._legs():
                abort(leg.sock)
            self.failure = "the connection was reset here (the program left with an error)"
            return self._failed(ExitStatus.PEER_LOST)
        finally:
            if self.upgrades is not None:
                self.upgrades.close()
            for leg in self._legs():
                leg.sock.close()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self.app is not None:
            with contextlib.suppress(OSError):
                self.app.shutdown(socket.SHUT_WR)
            self.app.close()
        return ExitStatus.OK

    def abandon(self) -> None:
        """From another thread (the app left with an error): the loop resets every
        connection at its next turn, as a direct Connection is reset."""
        self.abandoned = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _failed(self, status: ExitStatus) -> ExitStatus:
        """The app (if any) sees a reset; ``status`` is kept for it (``self.status``)."""
        self.status = status
        if self.app is not None:
            abort(self.app)
        return status

    def _turn(self) -> None:
        if self.abandoned:
            raise _Abandoned
        if self.waiting_direct is not None and \
                time.monotonic() - self.waiting_direct > DIRECT_WAIT_S:
            raise _Lost(self.direct or self.relay, "the peer moved to a direct connection "
                        f"that did not come up here within {DIRECT_WAIT_S:.0f} s")
        poller = select.poll()
        fds: dict[int, _Leg] = {}
        app_room = len(self.app_out) < OUTBUF_MAX  # the app reads slower: stop reading
        for leg in self._legs():
            mask = 0
            if not leg.eof and app_room and (leg is self.in_leg or leg is self.relay
                                             or len(self.held) < HELD_MAX):
                mask |= select.POLLIN
            if leg.outbuf:
                mask |= select.POLLOUT
            if mask:
                fds[leg.sock.fileno()] = leg
                poller.register(leg.sock, mask)
        app_mask = 0
        if self.stdin_open and len(self.out_leg.outbuf) < OUTBUF_MAX:
            app_mask |= select.POLLIN
        if self.app is not None and self.app_out:
            app_mask |= select.POLLOUT
        if app_mask:
            poller.register(self.stdin_fd, app_mask)
        if self.upgrades is not None and not self.upgrades.stop.is_set():
            poller.register(self.upgrades.wake_r, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        wait_ms = int(SELECT_SLICE_S * 1000) if self.finished_at is None else 100
        for fd, events in poller.poll(wait_ms):
            if fd == self.stdin_fd:
                if events & select.POLLOUT and self.app_out:
                    self._to_app()
                if not (self.stdin_open and events & (select.POLLIN | select.POLLHUP
                                                      | select.POLLERR)):
                    continue
                try:
                    chunk = os.read(self.stdin_fd, 65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""  # stdin (the app) went away: its end
                self._take_input(chunk)
            elif self.upgrades is not None and fd == self.upgrades.wake_r:
                upgrade = self.upgrades.take()
                if upgrade is not None:
                    if self.direct is None:
                        self._adopt(upgrade)
                    else:
                        abort(upgrade.sock)
            elif fd in fds:
                leg = fds[fd]
                if events & select.POLLOUT and leg.outbuf:
                    self._write(leg)
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and not leg.eof:
                    self._read(leg)
        if self.app is not None and self.peer_done and not self.app_out and \
                not self.app_shut:
            self.app_shut = True  # all of the peer's bytes are the app's: its EOF
            with contextlib.suppress(OSError):
                self.app.shutdown(socket.SHUT_WR)
        for leg in self._legs():
            if leg.shut_after and not leg.outbuf and not leg.write_shut:
                leg.write_shut = True
                with contextlib.suppress(OSError):
                    leg.sock.shutdown(socket.SHUT_WR)
