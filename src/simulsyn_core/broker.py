"""The broker (rendezvous server): a thin asyncio layer over rendezvous.py.

On one TCP port it serves two protocols, told apart by who speaks first:

* a client that sends nothing within ``SEED_GRACE_S`` gets the original example's
  endpoint list (so the original client works unchanged) and the connection closes;
* a client that sends a ``SSYN1 REGISTER`` line is paired by session name.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import errno
import ipaddress
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .birthday import Offer
from .endpoint import Endpoint
from .rendezvous import REPLY_SYN, UNSOLICITED, Reply, SeedList, SessionTable
from .sockets import abort, enable_keepalive, tcp_rtt
from .wire import (
    LINE_MAX,
    LineDecoder,
    Message,
    ProtocolError,
    encode_message,
    looks_like_rendezvous,
)

# A rendezvous client speaks at once; an original client never does. Long enough to
# cover one retransmission of a lost first segment (Linux's minimum RTO is 200 ms).
SEED_GRACE_S = 1.0
MAX_CONNECTIONS = 8192  # open client connections at most; more are closed at accept
MAX_CONNECTIONS_PER_IP = 64  # so that one host cannot take them all
FIRST_LINE_TIMEOUT_S = 5.0  # a connection that has not sent a whole line by then goes
EXPIRE_EVERY_S = 5.0
WRITE_DRAIN_TIMEOUT_S = 5.0
CLOSE_GRACE_S = 2.0  # on stop, connection handlers get this long to finish
KEEPALIVE = (30, 10, 3)  # idle, interval, count: a waiting client that vanished is noticed
LISTEN_BACKLOG = 512
ACCEPT_RETRY_S = 1.0  # out of descriptors: accept again after this long
READ_MAX = 65536
# The SYN probe of a registering client (--syn-probe): an answer (RST, ICMP) comes back
# within one RTT; none within this long means the NAT dropped the SYN.
SYN_PROBE_MIN_S = 0.1
SYN_PROBE_MAX_S = 1.0
SYNC_MAX_DELAY_S = 1.0  # sync delivery holds the nearer peer's PEER back at most this long

Log = Callable[[str], None]
# A service answers the verbs it registered for, on a rendezvous connection (nat-check's
# probe side plugs in here). It gets the broker, the connection id, the client's
# public endpoint and the message; it replies through ``broker.send(conn, data, close)``.
Service = Callable[["Broker", int, Endpoint, Message], Awaitable[None]]


LOG_QUEUE_MAX = 10000  # log lines waiting for stderr; past it they are counted, not kept
LOG_BATCH_S = 0.02  # the writer thread writes at most this often


class _StderrWriter:
    """Log lines go through a bounded buffer to a writer thread, so a slow or stuck
    stderr (a pipe nobody reads) never blocks the event loop; lines that do not fit
    are counted and the count is written once stderr drains.

    The thread writes what has piled up in one write, at most every ``LOG_BATCH_S``:
    waking it is a GIL hand-over, and once per line that was a fifth of the broker's
    time when it paired 1,500 pairs a second (bench/bench_broker.py)."""

    def __init__(self) -> None:
        self._lines: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._writing = False
        self._dropped = 0
        self._thread: threading.Thread | None = None
        self._second = -1  # the second that self._hms shows
        self._hms = ""

    def __call__(self, line: str) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="log", daemon=True)
            self._thread.start()
            atexit.register(self.flush)  # the last lines (e.g. "stopped") get written
        now = time.time()
        if int(now) != self._second:
            self._second = int(now)
            self._hms = time.strftime("%H:%M:%S", time.localtime(self._second))
        if len(self._lines) >= LOG_QUEUE_MAX:
            self._dropped += 1
            return
        self._lines.append(f"{self._hms}.{int(now * 1000) % 1000:03d} {line}")
        if not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self._writing = True
            batch = []
            while self._lines:
                batch.append(self._lines.popleft())
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                batch.append(f"(log: {dropped} line(s) dropped while stderr was full)")
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write("\n".join(batch) + "\n")
                sys.stderr.flush()
            self._writing = False
            time.sleep(LOG_BATCH_S)

    def flush(self, timeout_s: float = 2.0) -> None:
        """Wait (bounded) until the lines given are written."""
        end = time.monotonic() + timeout_s
        while (self._lines or self._writing) and time.monotonic() < end:
            time.sleep(0.01)


stderr_log = _StderrWriter()


# A connection's phase: silent so far (the list comes when its timer fires, or at its EOF);
# a rendezvous client (its timer is the deadline of its next whole line); closed.
_GRACE, _LINES, _CLOSED = 0, 1, 2


class _Readers:
    """The client sockets' reading, on one epoll of ours that the event loop watches as a
    single reader: watching a socket is one epoll_ctl (asyncio's add_reader and
    remove_reader cost some 10 us of Python per connection: a tenth of the broker's time
    when it pairs), and a socket that closes leaves the set by itself (Linux drops a
    closed descriptor from an epoll set). Without epoll, the loop's add_reader."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._callbacks: dict[int, Callable[[], None]] = {}
        if self._epoll is not None:
            loop.add_reader(self._epoll.fileno(), self._ready)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        if self._epoll is None:
            self._loop.add_reader(fd, callback)
            return
        self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = callback

    def unwatch(self, fd: int, closing: bool = False) -> None:
        """Stop reading ``fd``; ``closing``: it is closed next (nothing to tell epoll)."""
        if self._epoll is None:
            self._loop.remove_reader(fd)
        elif self._callbacks.pop(fd, None) is not None and not closing:
            self._epoll.unregister(fd)

    def _ready(self) -> None:
        for fd, _ in self._epoll.poll(0):  # type: ignore[union-attr]
            callback = self._callbacks.get(fd)
            if callback is not None:  # (not closed by an earlier one of this batch)
                callback()

    def close(self) -> None:
        if self._epoll is not None and not self._epoll.closed:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()


class _Transport:
    """The part of an asyncio transport the broker uses, straight on the non-blocking
    socket: reading watched by _Readers, each write tried at once (a reply fits the
    socket's buffer; what does not waits for writability), callbacks called directly.
    (asyncio's own server costs a task and a handful of queued callbacks per connection.)"""

    __slots__ = ("_loop", "_readers", "_sock", "_fd", "_protocol", "_peername", "_buffer",
                 "_closing", "_reading", "_writing")

    def __init__(self, loop: asyncio.AbstractEventLoop, readers: _Readers, sock: socket.socket,
                 protocol: _Conn, peername: tuple[str, int]) -> None:
        self._loop = loop
        self._readers = readers
        self._sock: socket.socket | None = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._peername = peername
        self._buffer = bytearray()
        self._closing = self._reading = self._writing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self._sock is None:
            return default
        if name == "peername":
            return self._peername
        if name == "socket":
            return self._sock
        if name == "sockname":
            try:
                return self._sock.getsockname()
            except OSError:
                return default
        return default

    def start_reading(self) -> None:
        self.resume_reading()

    def pause_reading(self, closing: bool = False) -> None:
        if self._reading:
            self._reading = False
            self._readers.unwatch(self._fd, closing)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._readers.watch(self._fd, self._read_ready)

    def _read_ready(self) -> None:
        try:
            data = self._sock.recv(READ_MAX)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        try:
            if data:
                self._protocol.data_received(data)
            else:
                self._protocol.eof_received()
                self.close()
        except Exception as exc:  # a bug: this connection goes (as asyncio's transports do)
            self._fatal(exc)

    def write(self, data: bytes) -> None:
        if self._closing or self._sock is None:
            return
        if not self._buffer:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if sent == len(data):
                return
            data = data[sent:]
            self._writing = True
            self._loop.add_writer(self._fd, self._write_ready)
        self._buffer += data

    def _write_ready(self) -> None:
        try:
            sent = self._sock.send(self._buffer)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        del self._buffer[:sent]
        if not self._buffer:
            self._writing = False
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._finish(None)

    def close(self) -> None:
        """Close once what was written has gone (bounded: WRITE_DRAIN_TIMEOUT_S)."""
        if self._closing:
            return
        self._closing = True
        if self._buffer:
            self.pause_reading()
            self._loop.call_later(WRITE_DRAIN_TIMEOUT_S, self._finish, None)
        else:
            self._finish(None)

    def _fatal(self, exc: Exception) -> None:
        self._closing = True
        self._finish(exc)

    def _finish(self, exc: Exception | None) -> None:
        if self._sock is None:
            return
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        self._buffer.clear()
        self.pause_reading(closing=True)
        sock, self._sock = self._sock, None
        sock.close()
        self._protocol.connection_lost(exc)


class _Conn:
    """One client connection: its transport calls it, the broker decides
    (Broker._accepted)."""

    __slots__ = ("broker", "conn", "transport", "public", "phase", "deadline", "timer",
                 "decoder", "messages", "busy")

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.conn = -1  # the connection id, once accepted under the caps
        self.transport: _Transport = None  # type: ignore[assignment]
        self.public: Endpoint = None  # type: ignore[assignment]
        self.phase = _GRACE
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.decoder: LineDecoder = None  # type: ignore[assignment]  # once it speaks
        self.messages: Iterator[Message] | None = None  # the whole lines not handled yet
        self.busy = False  # a task handles one of its messages (reading is paused)

    def connection_made(self, transport: _Transport) -> None:
        self.broker._open_transports += 1
        self.broker._accepted(self, transport)

    def data_received(self, data: bytes) -> None:
        self.broker._received(self, data)

    def eof_received(self) -> None:
        self.broker._eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.broker._lost(self, exc)


@dataclass
class Broker:
    binds: list[Endpoint]
    log: Log = stderr_log
    seed_grace_s: float = SEED_GRACE_S
    seeds: SeedList = field(default_factory=SeedList)
    sessions: SessionTable = field(default_factory=SessionTable)
    _clients: dict[int, _Conn] = field(default_factory=dict)  # open, accepted under the caps
    _next_conn: int = 0
    services: dict[str, Service] = field(default_factory=dict)
    _listeners: list[socket.socket] = field(default_factory=list)
    _per_ip: dict[str, int] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    syn_probe: bool = False  # probe each registering client's NAT with one unsolicited SYN
    sync_hold_s: dict[int, float] = field(default_factory=dict)  # for the log line, then gone
    _loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
    _silent: collections.deque[_Conn] = field(default_factory=collections.deque)
    _grace_timer: asyncio.TimerHandle | None = None
    _readers: _Readers = None  # type: ignore[assignment]  # set by start()
    _open_transports: int = 0

    def send(self, conn: int, data: bytes, close: bool = False) -> None:
        self._carry_out([Reply(conn, data, close)])

    def is_open(self, conn: int) -> bool:
        return conn in self._clients

    def local_endpoint(self, conn: int) -> Endpoint | None:
        """The broker address and port that connection ``conn`` reached."""
        c = self._clients.get(conn)
        sockname = c.transport.get_extra_info("sockname") if c is not None else None
        return Endpoint.from_sockaddr(sockname) if sockname else None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._readers = _Readers(self._loop)
        for ep in self.binds:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(ep.sockaddr)
                sock.listen(LISTEN_BACKLOG)
                # Every accepted connection inherits these (Linux): no syscalls per client.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with contextlib.suppress(OSError):
                    enable_keepalive(sock, *KEEPALIVE)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            self._listeners.append(sock)
            self._loop.add_reader(sock.fileno(), self._accept_ready, sock)
            self.log(f"listening on {Endpoint.from_sockaddr(sock.getsockname())}")

    @property
    def listening(self) -> list[Endpoint]:
        return [Endpoint.from_sockaddr(s.getsockname()) for s in self._listeners
                if s.fileno() >= 0]

    def _accept_ready(self, listener: socket.socket) -> None:
        for _ in range(LISTEN_BACKLOG):
            try:
                sock, peername = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: accept nothing for a while (what asyncio's
                    # servers do), rather than spin on a listener that stays readable.
                    self.log(f"cannot accept: {exc.strerror or exc}; again in "
                             f"{ACCEPT_RETRY_S:.0f} s")
                    self._loop.remove_reader(listener.fileno())
                    self._loop.call_later(ACCEPT_RETRY_S, self._accept_again, listener)
                    return
                continue  # that one connection failed (ECONNABORTED...): the next
            sock.setblocking(False)
            c = _Conn(self)
            transport = _Transport(self._loop, self._readers, sock, c, peername)
            c.connection_made(transport)
            transport.start_reading()

    def _accept_again(self, listener: socket.socket) -> None:
        if listener in self._listeners and listener.fileno() >= 0:
            self._loop.add_reader(listener.fileno(), self._accept_ready, listener)

    async def serve_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), EXPIRE_EVERY_S)
            self._carry_out(self.sessions.expire(time.monotonic()))

    async def close(self) -> None:
        for sock in self._listeners:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        self._silent.clear()
        for c in list(self._clients.values()):
            self._close(c)
        # Let the handlers' tasks finish, then cancel what is left, so that asyncio.run()
        # has nothing to cancel and print; and let the transports close.
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=CLOSE_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        end = time.monotonic() + CLOSE_GRACE_S
        while self._open_transports > 0 and time.monotonic() < end:
            await asyncio.sleep(0.01)
        if self._readers is not None:
            self._readers.close()

    def rtt(self, conn: int) -> tuple[float, float] | None:
        """The kernel's smoothed RTT of connection ``conn`` and its mean deviation
        (TCP_INFO), None if unknown."""
        c = self._clients.get(conn)
        sock = c.transport.get_extra_info("socket") if c is not None else None
        return tcp_rtt(sock) if sock is not None else None

    def _carry_out(self, replies: list[Reply]) -> None:
        # Written in one step without awaiting, so both peers of a pair are told at
        # the same moment (their RTTs aside); replies marked ``sync`` are timed so that
        # they arrive at the same moment (sync_delays).
        synced = [r for r in replies if r.sync]
        if synced:
            delays = sync_delays([self.rtt(r.conn) for r in synced])  # type: ignore[arg-type]
            loop = asyncio.get_running_loop()
            for reply, delay in zip(synced, delays, strict=True):
                self.sync_hold_s[reply.conn] = delay  # type: ignore[index]
                if delay > 0:
                    loop.call_later(delay, self._carry_out, [Reply(reply.conn, reply.data,
                                                                   reply.close)])
                    replies = [r for r in replies if r is not reply]
        for reply in replies:
            c = self._clients.get(reply.conn)  # type: ignore[call-overload]
            if c is None:
                continue
            c.transport.write(reply.data)
            if reply.close:
                self._close(c)

    def _accepted(self, c: _Conn, transport: _Transport) -> None:
        c.transport = transport
        peername = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if len(self._clients) >= MAX_CONNECTIONS or sock is None or sock.family != socket.AF_INET:
            transport.close()  # the original protocol carries IPv4 only; others get nothing
            return
        public = Endpoint.from_sockaddr(peername)
        if self._per_ip.get(public.ip, 0) >= MAX_CONNECTIONS_PER_IP:
            transport.close()
            return
        self._per_ip[public.ip] = self._per_ip.get(public.ip, 0) + 1
        # (keepalive and TCP_NODELAY: inherited from the listener)
        conn = self._next_conn
        self._next_conn += 1
        c.conn, c.public = conn, public
        self._clients[conn] = c
        # Its grace ends after every earlier client's: one timer for all (_grace_over).
        c.deadline = self._loop.time() + self.seed_grace_s
        self._silent.append(c)
        if self._grace_timer is None:
            self._grace_timer = self._loop.call_at(c.deadline, self._grace_over)

    # --- a connection's life after accept: no task, no wait_for, one timer -----------------
    # Whole lines are handled as they come, in the callbacks of the connection's protocol.
    # A message whose handling waits (a service, a syn probe) goes on in a task; reading
    # pauses until it is done, so that a connection's messages are handled one at a time.

    def _set_deadline(self, c: _Conn, deadline: float) -> None:
        c.deadline = deadline
        # The timer is armed for the earliest deadline only: a later one re-arms it when
        # it fires (most connections close before their first deadline: one timer each).
        if c.timer is None or deadline < c.timer.when():
            if c.timer is not None:
                c.timer.cancel()
            c.timer = self._loop.call_at(deadline, self._deadline_passed, c, deadline)

    def _deadline_passed(self, c: _Conn, when: float) -> None:
        c.timer = None
        if c.phase == _CLOSED or c.busy:  # a busy connection's deadline is looked at after
            return
        if c.deadline > when:  # moved on since the timer was armed
            self._set_deadline(c, c.deadline)
        else:
            self._close(c)  # no whole line in time: closed without a word

    def _grace_over(self) -> None:
        """The clients whose SEED_GRACE_S has passed in silence get the list. They are
        queued in the order they came, which is the order their grace ends, so one timer
        (for the first) serves them all: with thousands of silent clients, a timer each
        cost a heap of thousands of timers, sifted in Python at every answer."""
        self._grace_timer = None
        now = self._loop.time()
        silent = self._silent
        while silent:
            c = silent[0]
            if c.phase != _GRACE:  # spoke (or closed) meanwhile
                silent.popleft()
            elif c.deadline <= now:
                silent.popleft()
                self._answer_list(c)
            else:
                self._grace_timer = self._loop.call_at(c.deadline, self._grace_over)
                return

    def _answer_list(self, c: _Conn) -> None:
        answer = self.seeds.answer(c.public, time.monotonic())
        c.transport.write(answer)
        self.log(f"list {c.public}: {answer[0]} endpoint(s)")
        self._close(c)

    def _received(self, c: _Conn, data: bytes) -> None:
        if c.phase == _GRACE:
            if not looks_like_rendezvous(data):
                self.log(f"closed {c.public}: sent {min(len(data), LINE_MAX)} bytes that are "
                         "neither protocol")
                self._close(c)
                return
            c.phase = _LINES
            c.decoder = LineDecoder()
            # Until a whole line has come, a connection gets only a few seconds: one that
            # trickles bytes cannot hold a slot for the whole session wait.
            self._set_deadline(c, self._loop.time() + FIRST_LINE_TIMEOUT_S)
        elif c.phase == _CLOSED:
            return
        c.messages = c.decoder.feed(data)
        self._run(c)

    def _eof(self, c: _Conn) -> None:
        if c.phase == _GRACE:  # silence, then EOF: the list at once
            self._answer_list(c)
        elif c.phase == _LINES:  # (reading pauses while busy: no EOF then)
            self.log(f"{c.public} left before its peer came")
            self._close(c)

    def _lost(self, c: _Conn, exc: Exception | None) -> None:
        self._open_transports -= 1
        if c.phase == _CLOSED or c.conn < 0:
            return
        if exc is not None:
            self.log(f"connection {c.public}: {exc.__class__.__name__}: {exc}")
        self._close(c)

    def _close(self, c: _Conn) -> None:
        if c.phase == _CLOSED:
            return
        c.phase = _CLOSED
        if c.timer is not None:
            c.timer.cancel()
            c.timer = None
        c.messages = None
        self._clients.pop(c.conn, None)
        self._carry_out(self.sessions.disconnect(c.conn))
        left = self._per_ip.get(c.public.ip, 1) - 1
        if left > 0:
            self._per_ip[c.public.ip] = left
        else:
            self._per_ip.pop(c.public.ip, None)
        c.transport.close()

    def _run(self, c: _Conn) -> None:
        """Handle the whole lines ``c`` sent, in order, until one has to wait (a task goes
        on from there) or the connection closes."""
        try:
            while c.phase == _LINES and c.messages is not None:
                msg = next(c.messages, None)
                if msg is None:
                    break
                waits = self._message(c, msg)
                if waits is not None:
                    c.busy = True
                    c.transport.pause_reading()
                    task = self._loop.create_task(self._resume(c, waits))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    return
        except Exception as exc:
            self._failed(c, exc)
            return
        if c.phase == _LINES:
            if self._loop.time() >= c.deadline:
                self._close(c)
            elif c.timer is None:  # it fired while a task was busy
                self._set_deadline(c, c.deadline)

    async def _resume(self, c: _Conn, waits: Awaitable[None]) -> None:
        try:
            await waits
        except Exception as exc:
            self._failed(c, exc)
        finally:
            c.busy = False
        if c.phase == _LINES:
            c.transport.resume_reading()
            self._run(c)

    def _failed(self, c: _Conn, exc: Exception) -> None:
        if isinstance(exc, ProtocolError):
            self.log(f"bad request from {c.public}: {exc}")
            self._carry_out([Reply(c.conn, encode_message(
                "ERROR", code="bad-request", message=str(exc)[:120]), close=True)])
        elif isinstance(exc, (ConnectionError, OSError)):
            self.log(f"connection {c.public}: {exc.__class__.__name__}: {exc}")
        else:  # keep serving everyone else whatever one client did
            self.log(f"connection {c.public}: internal error {exc!r}")
        self._close(c)

    def _message(self, c: _Conn, msg: Message) -> Awaitable[None] | None:
        """Handle one message; an awaitable if the rest of its handling has to wait."""
        conn, public = c.conn, c.public
        self._set_deadline(c, self._loop.time() + self.sessions.wait_max_s + EXPIRE_EVERY_S)
        service = self.services.get(msg.verb)
        if service is not None:
            return service(self, conn, public, msg)
        if msg.verb == "PRIMED" and self.sessions.priming(conn):
            self._carry_out(self.sessions.step(conn, msg.verb))
            return None
        if msg.verb == "WHOAMI":
            self._carry_out([self._youare(conn, public, msg.get("close") == "1")])
            # Until it registers, a connection keeps the short first-line bound.
            self._set_deadline(c, self._loop.time() + FIRST_LINE_TIMEOUT_S)
            return None
        if msg.verb != "REGISTER":
            raise ProtocolError(f"unexpected {msg.verb} from a client")
        session = msg.require("session")
        local = msg.endpoint("local") if msg.get("local") else None
        offered = frozenset(filter(None, (msg.get("strategies") or "").split(",")))
        unsolicited = _known(msg.get("unsolicited"), UNSOLICITED)
        if unsolicited is None and self.syn_probe and self.sessions.worth_probing(
                conn, session, offered, msg.get("mapping")):
            return self._register_probed(c, msg, session, local, offered)
        self._register(c, msg, session, local, offered, unsolicited)
        return None

    async def _register_probed(self, c: _Conn, msg: Message, session: str,
                               local: Endpoint | None, offered: frozenset[str]) -> None:
        unsolicited = await self._probe_unsolicited(c.conn, c.public)
        if c.phase == _LINES:
            self._register(c, msg, session, local, offered, unsolicited)

    def _register(self, c: _Conn, msg: Message, session: str, local: Endpoint | None,
                  offered: frozenset[str], unsolicited: str | None) -> None:
        replies = self.sessions.register(
            c.conn, session, c.public, local, time.monotonic(), offered,
            msg.get("mapping"), unsolicited, _known(msg.get("reply_syn"), REPLY_SYN),
            Offer.parse(msg.get))
        self._carry_out(replies)
        self._log_replies(c.public, session, replies)

    async def _probe_unsolicited(self, conn: int, public: Endpoint) -> str | None:
        """One unsolicited SYN to the client's public endpoint, from our address it
        reached: "reject" if anything answers (RST, ICMP), "drop" if nothing does within
        a few of its RTTs, None if we cannot tell. An ordinary connect(): no privilege."""
        rtt = (self.rtt(conn) or (0.0, 0.0))[0]
        wait_s = min(SYN_PROBE_MAX_S, max(SYN_PROBE_MIN_S, 2 * rtt + 0.05))
        reached = self.local_endpoint(conn)
        result = await probe_unsolicited(public, reached.ip if reached else "0.0.0.0", wait_s)
        self.log(f"syn probe {public}: {result or 'unknown'} (waited at most "
                 f"{wait_s * 1000:.0f} ms)")
        return result

    def _youare(self, conn: int, public: Endpoint, close: bool) -> Reply:
        """The client's public endpoint, and another address of ours (a different IP, so
        that a NAT maps it as another destination) for the client to ask again: a NAT
        that maps the two differently randomises ports (docs/protocol.md)."""
        reached = self.local_endpoint(conn)
        alt = next((ep for ep in self.listening
                    if reached is not None and _same_scope(ep.ip, reached.ip)), None)
        return Reply(conn, encode_message("YOUARE", public=public, alt=alt), close=close)

    def _log_replies(self, public: Endpoint, session: str, replies: list[Reply]) -> None:
        for reply in replies:
            verb = reply.data.split(b" ", 2)[1].decode()
            if verb == "PEER":
                hold = self.sync_hold_s.pop(reply.conn, None)  # type: ignore[call-overload]
                held = f" (held {hold * 1000:.1f} ms: sync)" if hold is not None else ""
                self.log(f"session {session}: paired, told {reply.data.decode().strip()}{held}")
            elif verb == "REGISTERED":
                self.log(f"session {session}: {public} waits for its peer")
            else:
                self.log(f"session {session}: {public}: {reply.data.decode().strip()}")


def _known(value: str | None, allowed: tuple[str, ...]) -> str | None:
    """A REGISTER fact the broker knows, else None (unknown values are ignored: room to
    grow, as for unknown fields)."""
    return value if value in allowed else None


def sync_delays(rtts: list[tuple[float, float] | None]) -> list[float]:
    """How long to hold each of several messages so that all arrive at the same moment,
    from each connection's (RTT, mean deviation): each one-way time taken as RTT/2 (what
    libp2p's DCUtR does). A difference within the RTTs' own deviations is noise (jitter
    on the path), and holding on noise only spreads the arrivals: nothing is held then,
    nor with an RTT unknown."""
    if not rtts or any(r is None for r in rtts):
        return [0.0] * len(rtts)
    known = [r for r in rtts if r is not None]
    far = max(known, key=lambda r: r[0])
    out = []
    for rtt, var in known:
        if far[0] - rtt <= far[1] + var:
            out.append(0.0)
        else:
            out.append(min(SYNC_MAX_DELAY_S, (far[0] - rtt) / 2))
    return out


async def probe_unsolicited(target: Endpoint, source_ip: str, wait_s: float) -> str | None:
    """Send one SYN to ``target`` from ``source_ip`` (a fresh port): what comes back?"""
    loop = asyncio.get_running_loop()
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:  # out of descriptors: the client registers with this unknown
        return None
    try:
        sock.setblocking(False)
        sock.bind((source_ip, 0))
        await asyncio.wait_for(loop.sock_connect(sock, (target.ip, target.port)), wait_s)
    except asyncio.TimeoutError:  # not the builtin TimeoutError before 3.11
        return "drop"
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "reject"  # an RST, or an ICMP unreachable (port, host, admin-prohibited)
        return None  # our own side failed (EPERM from a local firewall, EADDRNOTAVAIL...)
    else:
        return "reject"  # something there answered with a SYN+ACK: an early SYN is answered
    finally:
        abort(sock)  # an RST, not a FIN, if it did connect; nothing at all from SYN-SENT


def _same_scope(alt: str, reached: str) -> bool:
    """Another address a client that reached ``reached`` can reach too: a different IP of
    the same kind (no loopback or private address offered to a client that came over a
    public one, no wildcard)."""
    if alt in (reached, "0.0.0.0"):
        return False
    a, r = ipaddress.ip_address(alt), ipaddress.ip_address(reached)
    return (a.is_loopback == r.is_loopback and a.is_private == r.is_private
            and not a.is_link_local)


def run_broker(binds: list[Endpoint], log: Log = stderr_log,
               services: dict[str, Service] | None = None, syn_probe: bool = False) -> int:
    """Run until SIGINT (returns 130) or SIGTERM (returns 0). Raises OSError on bind.
    ``syn_probe``: learn what each registering client's NAT does to an unsolicited SYN
    (``Broker.syn_probe``)."""

    async def main() -> int:
        broker = Broker(binds, log=log, services=dict(services or {}), syn_probe=syn_probe)
        await broker.start()
        stop = asyncio.Event()
        got: list[int] = []

        def on_signal(signum: int) -> None:
            got.append(signum)
            stop.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            await broker.serve_forever(stop)
        finally:
            await broker.close()
        log("stopped")
        return 130 if got and got[0] == signal.SIGINT else 0

    return asyncio.run(main())
