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
import re
import resource
import select
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .birthday import Offer
from .endpoint import Endpoint
from .limits import LogThrottle, MaxCounter, TokenBuckets, prefix_of
from .relay import SHUTDOWN, TOKEN_RE, Pair, Refuse, RelayLimits, RelayTable
from .relay_pump import RelayPump, Side
from .rendezvous import (
    NAMEPLATE_RE,
    REPLY_SYN,
    UNSOLICITED,
    V6_KEY,
    Facts,
    Reply,
    SeedList,
    SessionTable,
    key_fields,
    table_key,
)
from .shared import Entry, RedisHub, Unavailable, bus_from, bus_reply, is_remote, remote
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
# Open client connections at most; at start this is lowered to what the open-file limit
# leaves (the soft limit is first raised to the hard one), minus FD_RESERVE. When it is
# reached, a newcomer evicts the oldest idle connection (no whole line yet, or in the list
# protocol's grace) of the network holding the most connections, if that network holds
# at least two more than the newcomer's (so that equal hogs do not evict one another in a
# loop); else the newcomer is closed at accept.
MAX_CONNECTIONS = 20480
MAX_CONNECTIONS_PER_IP = 64  # so that one host cannot take them all
# Per /24 (IPv4) or /64 (IPv6): 4 hosts at the per-address cap (nat-check's port samples
# keep 48 open), so that the addresses of one network cannot take them all either.
MAX_CONNECTIONS_PER_PREFIX = 256
# Descriptors kept for the rest: listeners, stdio and the log, epoll, nat-check's
# captures and raw sockets, --syn-probe's probe sockets.
FD_RESERVE = 128
# REGISTER and WHOAMI, per address and per /24 (/64). An honest punch sends 1-3
# REGISTERs and 2 WHOAMIs a run, and a run takes a few tenths of a second at least (a
# process start, the mapping check, the wait for the peer): a user stays far below 1 a
# second. The fastest honest client is a benchmark running pairs back to back from one
# address (bench_punch: 15 runs of 3 lines; at 0.3 s a run, 10 a second): 10 a second
# with bursts of 60 (20 such runs at once) does not refuse it. 100/s, bursts of 400,
# per network: ten such hosts behind one /24 (a campus, a CGNAT). Name guessing at 2,048
# REGISTERs a second from one address gets 10 a second; from all of a /24's addresses,
# 100.
RATE_PER_IP = (10.0, 60.0)  # tokens a second, burst
RATE_PER_PREFIX = (100.0, 400.0)
RATE_LIMITED_VERBS = frozenset({"REGISTER", "WHOAMI", "RELAY", "RELAY_STATUS"})
RATE_MAX_KEYS = 65536  # buckets kept at most (idle ones go first)
LOG_EVERY_S = 10.0  # one log line per offender (and per kind of loop error) this often
# The listen queue (the kernel caps it at net.core.somaxconn, 4096 by default): under a
# flood of connects a short queue overflows and a newcomer's SYN is dropped, costing it a
# 1 s retransmission before the broker even sees it.
BACKLOG = 4096
# The broker accepts itself, in batches (_accept_ready): each connection is admitted or
# refused (closed at once, its descriptor freed) right after accept(), before any
# transport is made for it; it is counted out (Broker._release) only once its descriptor
# is closed (_Transport._finish), so the connections counted in bound the descriptors
# open and the cap stays under the open-file limit. (asyncio's server refused only a few
# loop turns later, and closed a descriptor a turn after close(): under a flood at the
# cap the batches in flight overshot the open-file limit, EMFILE paused accept 1 s at a
# time.) A loop turn accepts at most ACCEPT_BATCH connections and evicts at most
# EVICT_PER_TURN (an evicted connection's descriptor is closed at once: _Transport.abort),
# the rest of the queue waits for the next turn, so the loop turns to the other clients
# in between. Before a refusal or an eviction, the reads already waiting are taken in
# once a batch (Broker._admit): a slot freed by a client that just closed goes to the
# newcomer behind it.
ACCEPT_BATCH = 64
EVICT_PER_TURN = 16
ACCEPT_RETRY_S = 1.0  # after EMFILE/ENFILE/ENOBUFS/ENOMEM, as asyncio's own server
FIRST_LINE_TIMEOUT_S = 5.0  # a connection that has not sent a whole line by then goes
EXPIRE_EVERY_S = 5.0
WRITE_DRAIN_TIMEOUT_S = 5.0
CLOSE_GRACE_S = 2.0  # on stop, connection handlers get this long to finish
KEEPALIVE = (30, 10, 3)  # idle, interval, count: a waiting client that vanished is noticed
READ_MAX = 65536
# The SYN probe of a registering client (--syn-probe): an answer (RST, ICMP) comes back
# within one RTT; none within this long means the NAT dropped the SYN.
SYN_PROBE_MIN_S = 0.1
SYN_PROBE_MAX_S = 1.0
# --redis: a pair whose peer's broker is alive but not subscribed (reconnecting after an
# outage) is tried again this often, this many times (its alive key lives 3 s).
RETRY_PAIR_S = 0.5
PAIR_TRIES = 8
SYN_PROBE_V6_S = 1.3  # IPv6: the SYN's retransmission (1 s) and its answer
SYNC_MAX_DELAY_S = 1.0  # sync delivery holds the nearer peer's PEER back at most this long

Log = Callable[[str], None]


def _replaced(conn: Any) -> Reply:
    """--redis: an older registration of the same endpoint is told, and closed."""
    return Reply(conn, encode_message("ERROR", code="replaced", message="a newer "
                                      "registration from this endpoint"), close=True)
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
# relaying (or waiting for its relay peer): out of line mode, its socket read by a
# relay_pump.Side, never evicted as idle nor bound by the line deadlines.
_GRACE, _LINES, _CLOSED, _RELAY = 0, 1, 2, 3


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

    def ready_now(self) -> None:
        """Handle what is readable already (before the loop's next turn would)."""
        if self._epoll is not None:
            self._ready()

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

    def abort(self) -> None:
        """Close now, whatever is still unsent (an eviction: its slot and its descriptor
        are free at once)."""
        self._closing = True
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
    """One client connection, admitted under the caps (Broker._admit): its transport
    calls it, the broker decides. What the limits know of it too: its address's network,
    and whether it began a rendezvous line (an eviction is told so)."""

    __slots__ = ("broker", "conn", "transport", "public", "prefix", "rendezvous", "phase",
                 "deadline", "timer", "decoder", "messages", "busy")

    def __init__(self, broker: Broker, conn: int, public: Endpoint, prefix: str) -> None:
        self.broker = broker
        self.conn = conn  # the connection id
        self.transport: _Transport = None  # type: ignore[assignment]
        self.public = public
        self.prefix = prefix
        self.rendezvous = False
        self.phase = _GRACE
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.decoder: LineDecoder = None  # type: ignore[assignment]  # once it speaks
        self.messages: Iterator[Message] | None = None  # the whole lines not handled yet
        self.busy = False  # a task handles one of its messages (reading is paused)

    def connection_made(self, transport: _Transport) -> None:
        self.broker._accepted(self, transport)

    def data_received(self, data: bytes) -> None:
        self.broker._received(self, data)

    def eof_received(self) -> None:
        self.broker._eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.broker._lost(self, exc)


def _buckets(rate: tuple[float, float]) -> TokenBuckets:
    return TokenBuckets(rate[0], rate[1], RATE_MAX_KEYS)


@dataclass
class Broker:
    binds: list[Endpoint]
    log: Log = stderr_log
    seed_grace_s: float = SEED_GRACE_S
    seeds: SeedList = field(default_factory=SeedList)
    sessions: SessionTable = field(default_factory=SessionTable)
    _clients: dict[int, _Conn] = field(default_factory=dict)  # open: replies go to these
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
    _closes_taken: bool = False  # this accept batch looked at the waiting reads already
    # The limits (README "Broker limits"); max_connections is lowered at start() to what
    # the open-file limit leaves.
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP
    max_connections_per_prefix: int = MAX_CONNECTIONS_PER_PREFIX
    rate_per_ip: TokenBuckets = field(default_factory=lambda: _buckets(RATE_PER_IP))
    rate_per_prefix: TokenBuckets = field(default_factory=lambda: _buckets(RATE_PER_PREFIX))
    # Every connection counted in: admitted, its descriptor not closed yet (one closing
    # after its last reply is no longer in _clients, but still here).
    _conns: dict[int, _Conn] = field(default_factory=dict)
    _conns_per_prefix: MaxCounter = field(default_factory=MaxCounter)
    # Per prefix, its idle connections (evictable), oldest first.
    _idle: dict[str, OrderedDict[int, None]] = field(default_factory=dict)
    _throttle: LogThrottle = field(default_factory=lambda: LogThrottle(LOG_EVERY_S))
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("refused", "evicted", "rate_limited", "loop_errors"), 0))
    # --relay (docs/protocol.md, "Relay"): None, the broker relays nothing (relay-off).
    relay: RelayTable | None = None
    _relay_waiting: dict[str, Side] = field(default_factory=dict)  # token -> the first side
    _pumps: dict[str, RelayPump] = field(default_factory=dict)  # token -> its live session
    # --redis (docs/protocol.md, "Scaling out on Redis"): sessions shared with other brokers.
    shared: RedisHub | None = None
    advertise: Endpoint | None = None  # where peers reach this broker's relay (PEER relay_at=)

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
        self._loop.set_exception_handler(self._loop_error)
        soft, hard, before = raise_nofile_limit()
        budget = MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else max(16, soft - FD_RESERVE)
        if budget < self.max_connections:
            self.max_connections = budget
        raised = f"raised from {before} to {soft}" if soft != before else f"{soft}"
        self.log(f"open files: soft limit {raised} (hard {hard}): serving at most "
                 f"{self.max_connections} connections ({FD_RESERVE} descriptors kept back)")
        self._readers = _Readers(self._loop)
        if self.relay is not None:
            relay = self.relay
            self.sessions.relay_token = lambda: relay.issue(time.monotonic())
        if self.shared is not None:
            await self.shared.start(self._on_bus, self._restored)
        for ep in self.binds:
            # [::] is both families (IPv4 clients arrive as ::ffff:a.b.c.d and are kept
            # as IPv4); any other IPv6 address, IPv6 only.
            sock = socket.create_server((ep.ip, ep.port), family=ep.family, backlog=BACKLOG,
                                        dualstack_ipv6=ep.ip == "::")
            try:
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
        """Accept what is waiting (ACCEPT_BATCH at most, EVICT_PER_TURN evictions at
        most); admit each connection (the limits: ``_admit``) and make its transport, or
        close it at once."""
        evicted = self.stats["evicted"]
        self._closes_taken = False
        for _ in range(ACCEPT_BATCH):
            if self.stats["evicted"] - evicted >= EVICT_PER_TURN:
                return
            try:
                sock, peername = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # that one connection failed: the next
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: accept nothing for a while (what asyncio's
                    # servers do), rather than spin on a listener that stays readable.
                    self._loop.remove_reader(listener.fileno())
                    self._loop.call_later(ACCEPT_RETRY_S, self._accept_again, listener)
                self._loop_error(self._loop, {
                    "message": "socket.accept() out of system resource"
                    if exc.errno == errno.EMFILE else "accept() failed", "exception": exc})
                return
            public = Endpoint.from_sockaddr(peername)  # (IPv4-mapped: as IPv4)
            prefix = prefix_of(public.ip)
            if not self._admit(public.ip, prefix):
                sock.close()
                continue
            sock.setblocking(False)
            conn = self._next_conn
            self._next_conn += 1
            c = _Conn(self, conn, public, prefix)
            self._count_in(c)
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
            if self.shared is not None:
                self._carry_out([Reply(c, encode_message(
                    "ERROR", code="timeout", message="no peer joined the session in time"),
                    close=True) for c in self.shared.expire(time.monotonic())])

    async def close(self) -> None:
        for sock in self._listeners:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        self._silent.clear()
        for pump in list(self._pumps.values()):
            pump.end(SHUTDOWN, "the broker stopped", rst=True)
        for token, side in list(self._relay_waiting.items()):
            self._relay_wait_over(token, side, None)  # reset, as the relayed sessions
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
        if self.shared is not None:
            await self.shared.close()

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
            if is_remote(reply.conn):  # held by another broker (--redis): told through Redis
                assert self.shared is not None
                held_by: str = reply.conn[1]  # type: ignore[index]
                self.shared.publish(held_by, bus_reply(reply.conn[2],  # type: ignore[index]
                                                       reply.data, reply.close,
                                                       self.shared.id))
                continue
            c = self._clients.get(reply.conn)  # type: ignore[call-overload]
            if c is None:
                continue
            c.transport.write(reply.data)
            if reply.close:
                self._close(c)

    def _accepted(self, c: _Conn, transport: _Transport) -> None:
        """An admitted connection's transport is made (counted in by _accept_ready)."""
        c.transport = transport
        self._open_transports += 1
        # (keepalive and TCP_NODELAY: inherited from the listener)
        self._clients[c.conn] = c
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
        if c.public.is_v6:  # the original's list carries IPv4 endpoints only
            self.log(f"list {c.public}: an IPv6 client: the list protocol is IPv4 only")
            self._close(c)
            return
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
            c.rendezvous = True
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
        """Its descriptor is closed: only now is it counted out (_release)."""
        self._open_transports -= 1
        if c.phase != _CLOSED:
            if exc is not None:
                self.log(f"connection {c.public}: {exc.__class__.__name__}: {exc}")
            self._close(c)
        self._release(c.conn)

    def _leave_line_mode(self, c: _Conn, phase: int) -> None:
        """No more lines from or replies to ``c``: its timer, its message queue and its
        place among the line clients go."""
        c.phase = phase
        if c.timer is not None:
            c.timer.cancel()
            c.timer = None
        c.messages = None
        self._clients.pop(c.conn, None)

    def _close(self, c: _Conn) -> None:
        """No more replies to ``c``; its transport closes once what was written has gone
        (then ``_lost``)."""
        if c.phase == _CLOSED:
            return
        self._leave_line_mode(c, _CLOSED)
        self._carry_out(self.sessions.disconnect(c.conn))
        if self.shared is not None:
            self.shared.forget(c.conn)
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
        if msg.verb in RATE_LIMITED_VERBS and not self._within_rate(conn, public, msg.verb):
            return None  # (told, and closed)
        service = self.services.get(msg.verb)
        if service is not None:
            return self._service(c, service, msg)
        if msg.verb == "PRIMED" and self.sessions.priming(conn):
            self._carry_out(self.sessions.step(conn, msg.verb))
            return None
        if msg.verb == "PRIMED" and self.shared is not None and conn in self.shared.owner_of:
            self.shared.step(conn, msg.verb)  # the pair's owner is another broker
            return None
        if msg.verb == "RELAY":
            if self._holds(conn):
                raise ProtocolError("RELAY on a connection that registered: open a new one")
            self._relay_arrive(c, msg.require("token"))
            return None
        if msg.verb == "RELAY_STATUS":
            self._relay_status(c, msg.require("token"))
            return None
        if msg.verb == "WHOAMI":
            self._carry_out([self._youare(conn, public, msg.get("close") == "1")])
            # Until it registers, a connection keeps the short first-line bound.
            self._set_deadline(c, self._loop.time() + FIRST_LINE_TIMEOUT_S)
            return None
        if msg.verb != "REGISTER":
            raise ProtocolError(f"unexpected {msg.verb} from a client")
        nameplate = msg.get("nameplate")
        if nameplate is not None and nameplate != "new" and \
                not NAMEPLATE_RE.fullmatch(nameplate):
            raise ProtocolError("nameplate= is new or a number of 1-6 digits")
        session = msg.require("session") if nameplate is None else f"#{nameplate}"
        if nameplate is None and (session.startswith("#") or V6_KEY[0] in session):
            # "#N" is how the table keeps a code's number, "@6" marks an IPv6 client's
            # key: a session name never is or has one.
            session = "#"  # invalid: answered bad-session as any other bad name
        session = table_key(session, c.public.is_v6)
        local = msg.endpoint("local") if msg.get("local") else None
        offered = frozenset(filter(None, (msg.get("strategies") or "").split(",")))
        unsolicited = _known(msg.get("unsolicited"), UNSOLICITED)
        if unsolicited is None and self.syn_probe and self.sessions.worth_probing(
                conn, session, offered, msg.get("mapping")):
            return self._register_probed(c, msg, session, local, offered)
        return self._register(c, msg, session, local, offered, unsolicited)

    async def _service(self, c: _Conn, service: Service, msg: Message) -> None:
        await service(self, c.conn, c.public, msg)
        self._not_idle(c.conn)  # a nat-check control connection, say

    async def _register_probed(self, c: _Conn, msg: Message, session: str,
                               local: Endpoint | None, offered: frozenset[str]) -> None:
        unsolicited = await self._probe_unsolicited(c.conn, c.public)
        if c.phase == _LINES:
            waits = self._register(c, msg, session, local, offered, unsolicited)
            if waits is not None:
                await waits

    def _register(self, c: _Conn, msg: Message, session: str, local: Endpoint | None,
                  offered: frozenset[str], unsolicited: str | None) -> Awaitable[None] | None:
        # A new code's number is chosen right before registering (after the probe's
        # wait): two new codes can never be given one number.
        if self.shared is not None:
            return self._register_shared(c, msg, session, local, offered, unsolicited)
        if session.removesuffix(V6_KEY) == "#new":
            session = self.sessions.new_nameplate(c.public.is_v6)
        replies = self.sessions.register(
            c.conn, session, c.public, local, time.monotonic(), offered,
            msg.get("mapping"), unsolicited, _known(msg.get("reply_syn"), REPLY_SYN),
            Offer.parse(msg.get))
        self._carry_out(replies)
        self._log_replies(c.public, session, replies)
        if self.sessions.holds(c.conn):
            self._not_idle(c.conn)
        return None

    def _holds(self, conn: int) -> bool:
        """Is ``conn`` registered (waiting, or in an ordering exchange)?"""
        hub = self.shared
        return self.sessions.holds(conn) or (
            hub is not None and (conn in hub.waiting or conn in hub.owner_of))

    # --- --redis: sessions shared with other brokers (docs/protocol.md) ------------------

    async def _register_shared(self, c: _Conn, msg: Message, session: str,
                               local: Endpoint | None, offered: frozenset[str],
                               unsolicited: str | None, attempt: int = 0) -> None:
        """REGISTER with the waiting entries in Redis: store ours, or take the one
        waiting (atomically: shared.TAKE_OR_WAIT) and decide the pair here, with
        SessionTable's own code; the peer's replies go to its broker's channel.
        ``attempt``: how many pairs fell through for want of a listener there."""
        hub = self.shared
        assert hub is not None
        conn, public = c.conn, c.public
        reply_syn = _known(msg.get("reply_syn"), REPLY_SYN)
        facts = Facts(offered, msg.get("mapping"), unsolicited, reply_syn, Offer.parse(msg.get))
        refusal = self._refuse_shared(conn, session, public)
        if refusal is not None:
            self._carry_out([refusal])
            self._log_replies(public, session, [refusal])
            return
        try:
            verdict, theirs = await hub.take_or_wait(Entry(hub.id, conn, session, public,
                                                           local, facts))
        except Unavailable:
            replies = [Reply(conn, encode_message(
                "ERROR", code="unavailable", message="the broker's session store (Redis) is "
                "unreachable: try again in a few seconds"), close=True)]
            self._carry_out(replies)
            return
        if c.phase != _LINES:  # it left while Redis answered
            hub.forget(conn)
            if verdict == "paired" and theirs is not None:
                hub.restore(theirs)
            return
        if verdict == "full":
            replies = [Reply(conn, encode_message("ERROR", code="busy", message=(
                "no code number is free; try later")), close=True)]
        elif verdict != "paired" or theirs is None:
            if theirs is not None:  # the same endpoint registered again: ours replaces it
                self._carry_out([_replaced(self._conn_of(theirs))])
            session = hub.waiting[conn].session
            replies = [Reply(conn, encode_message("REGISTERED", **key_fields(session),
                                                  public=public), close=False)]
        else:
            other = self._conn_of(theirs)
            if not is_remote(other) and other not in self._clients:
                # Ours, and gone (its key's delete was still queued): register again.
                await self._register_shared(c, msg, session, local, offered, unsolicited)
                return
            paired = await self._pair_shared(Entry(hub.id, conn, session, public, local,
                                                   facts), theirs, put_back=attempt < PAIR_TRIES)
            if paired != "paired":
                if paired == "later":  # its broker is alive, not listening: in a moment
                    await asyncio.sleep(RETRY_PAIR_S)
                if c.phase == _LINES:  # (gone: ours waits instead)
                    await self._register_shared(c, msg, session, local, offered, unsolicited,
                                                attempt + 1)
            return
        self._carry_out(replies)
        self._log_replies(public, session, replies)
        if self._holds(conn):
            self._not_idle(conn)

    async def _pair_shared(self, mine: Entry, theirs: Entry, put_back: bool = True) -> str:
        """Decide the pair of our client ``mine.conn`` with ``theirs`` (taken from Redis),
        with SessionTable's own code: our replies written, the peer's sent on its broker's
        channel: "paired". If nobody listens there, nothing is told: "gone" when that
        broker died (its alive key is gone, or ``put_back`` is False: theirs is dropped),
        else "later": it lives and is subscribing again (after a Redis outage), so theirs
        is put back to wait, to be paired again in a moment."""
        hub = self.shared
        assert hub is not None
        conn, session, f = mine.conn, mine.session, mine.facts
        other = self._conn_of(theirs)
        now = time.monotonic()
        self.sessions.relay_at = self.advertise or self.local_endpoint(conn)
        self.sessions.adopt(session, other, theirs.public, theirs.local, theirs.facts, now)
        replies = self.sessions.register(conn, session, mine.public, mine.local, now,
                                         f.strategies, f.mapping, f.unsolicited, f.reply_syn,
                                         f.birthday)
        theirs_told = [bus_reply(r.conn[2], r.data, r.close, hub.id)  # type: ignore[index]
                       for r in replies if is_remote(r.conn)]
        if theirs_told and not await hub.deliver(theirs.broker, theirs_told):
            self.sessions.disconnect(other)
            if put_back and await hub.alive(theirs.broker):
                hub.restore(theirs)
                self.log(f"session {session}: the peer's broker {theirs.broker} is not "
                         "listening yet (back from a Redis outage?): paired again in a moment")
                return "later"
            self.log(f"session {session}: the peer's broker {theirs.broker} is gone: "
                     f"{mine.public} waits instead")
            return "gone"
        if not is_remote(other):
            hub.paired(other)  # our own waiting client: its entry was taken
        replies = [r for r in replies if not is_remote(r.conn)]
        self._carry_out(replies)
        self._log_replies(mine.public, session, replies)
        if self._holds(conn):
            self._not_idle(conn)
        return "paired"

    async def _restored(self, conn: int, verdict: str, theirs: Entry) -> None:
        """After a Redis outage our waiting client's entry, stored again, met ``theirs``:
        a client of the same session that registered meanwhile ("paired": the pair is
        ours to decide), or a newer registration of the same endpoint ("superseded")."""
        hub = self.shared
        assert hub is not None
        held = hub.paired(conn)
        c = self._clients.get(conn)
        if held is None or c is None or c.phase != _LINES:
            if verdict == "paired":
                hub.restore(theirs)  # ours left meanwhile: theirs waits again
            return
        if verdict == "superseded":
            self._carry_out([_replaced(conn)])
            return
        mine = Entry.decode(held.value)
        other = self._conn_of(theirs)
        gone = not is_remote(other) and other not in self._clients  # ours, and left
        if gone or await self._pair_shared(mine, theirs) != "paired":
            hub.hold_again(conn, held)  # ours is stored again on the next tick
            return
        self.log(f"session {mine.session}: paired after Redis came back")

    def _refuse_shared(self, conn: int, session: str, public: Endpoint) -> Reply | None:
        """What the pure table would refuse before looking at the session (a bad name, a
        second REGISTER), and this broker's own cap on waiting clients per address."""
        assert self.shared is not None
        if session.removesuffix(V6_KEY) != "#new":
            refused = self.sessions.check(conn, session)
            if refused is not None:
                return refused
        if self._holds(conn):
            return Reply(conn, encode_message("ERROR", code="bad-request", message=(
                "already registered on this connection")), close=True)
        if self.shared.per_ip.get(public.ip, 0) >= self.sessions.max_waiting_per_ip:
            return Reply(conn, encode_message("ERROR", code="busy", message=(
                "too many waiting sessions from this address")), close=True)
        return None

    def _conn_of(self, entry: Entry) -> Any:
        """How the table names the connection of a waiting entry: ours, or another's."""
        assert self.shared is not None
        return entry.conn if entry.broker == self.shared.id else remote(entry.broker,
                                                                          entry.conn)

    def _on_bus(self, message: dict[str, Any]) -> None:
        """A message on our channel (shared.bus_*): a reply for one of our clients, or a
        step of a pair we decided."""
        hub = self.shared
        assert hub is not None
        try:
            op, conn = message["op"], int(message["conn"])
            if op == "reply":
                data, close, owner = message["data"].encode(), bool(message["close"]), \
                    str(message["owner"])
                if conn not in self._clients:  # it left: the pair's owner tells its peer
                    if not close:
                        hub.publish(owner, bus_from("gone", hub.id, conn))
                    return
                hub.paired(conn)
                if close:
                    hub.owner_of.pop(conn, None)
                else:
                    hub.owner_of[conn] = owner
                self._carry_out([Reply(conn, data, close)])
                c = self._clients.get(conn)
                if data.startswith(b"SSYN1 PEER"):
                    told = _TOKEN_IN_LOG.sub(r" relay=\1...", data.decode().strip())
                    self.log(f"paired by broker {owner}, told {told}")
                if c is not None:
                    self._not_idle(conn)
            elif op in ("step", "gone"):
                peer = remote(str(message["from"]), conn)
                if op == "step" and self.sessions.priming(peer):
                    self._carry_out(self.sessions.step(peer, str(message["verb"])))
                elif op == "gone":
                    self._carry_out(self.sessions.disconnect(peer))
            else:
                raise ValueError(f"unknown op {op!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self._log_offender(("bus", str(exc)[:40]), f"redis: ignored a bad bus message: "
                                                       f"{exc}")

    # --- the relay (docs/protocol.md, "Relay"; the decisions: relay.py) ----------------

    def _relay_arrive(self, c: _Conn, token: str) -> None:
        """SSYN1 RELAY token=...: wait for the peer, or pair with the one waiting, or
        refuse (then close)."""
        if self.relay is None:
            self._relay_refuse(c, Refuse("relay-off", "this broker relays nothing (start it "
                                                      "with --relay)"))
            return
        verdict = self.relay.arrive(token if TOKEN_RE.fullmatch(token) else "-", c.conn,
                                    c.public.ip, time.monotonic())
        if isinstance(verdict, Refuse):
            self._relay_refuse(c, verdict)
            return
        side = self._relay_side(c)
        if not isinstance(verdict, Pair):
            self._relay_waiting[token] = side
            side.wait(self._readers, lambda: self._relay_wait_over(token, side, None))
            side.timer = self._loop.call_later(self.relay.limits.wait_s, self._relay_wait_over,
                                               token, side, "the peer did not come within "
                                               f"{self.relay.limits.wait_s:g} s")
            return
        first = self._relay_waiting.pop(token)
        if first.timer is not None:
            first.timer.cancel()
        pump = RelayPump(self._loop, self._readers, verdict.session, first, side,
                         self._relay_done)
        self._pumps[token] = pump
        self.log(f"relay {token[:8]}: {first.public} <-> {side.public}: relaying")
        pump.start()

    def _relay_side(self, c: _Conn) -> Side:
        """Take ``c`` out of line mode: from here on its socket is read by the relay; the
        bytes after its RELAY line are the first it relays."""
        self._leave_line_mode(c, _RELAY)
        self._not_idle(c.conn)
        c.transport.pause_reading()
        early = bytes(c.decoder.buffer)
        c.decoder.buffer.clear()
        transport = c.transport

        def close(rst: bool) -> None:
            if rst:
                transport.abort()
            else:
                transport.close()

        return Side(c.conn, c.public, transport.get_extra_info("socket"), close, early)

    def _relay_wait_over(self, token: str, side: Side, why: str | None) -> None:
        """The waiting side goes: timed out (``why``, told ERROR code=timeout), or reset
        (None: it reset, or the broker stops)."""
        if self._relay_waiting.get(token) is not side:
            return
        del self._relay_waiting[token]
        if side.timer is not None:
            side.timer.cancel()
        side.stop(self._readers)
        if self.relay is not None:
            self.relay.leave(token, side.conn)
        c = self._conns.get(side.conn)
        if c is None:
            return
        if why is None:
            c.transport.abort()
            return
        self._log_offender(("relay-timeout", side.public.ip),
                           f"relay {token[:8]}: {side.public}: timeout: {why}")
        c.transport.write(encode_message("ERROR", code="timeout", message=why))
        c.transport.close()

    def _relay_done(self, pump: RelayPump, reason: str, message: str) -> None:
        session = pump.session
        self._pumps.pop(session.token, None)
        if self.relay is not None:
            self.relay.end(session.token, reason, message, time.monotonic())
        first, second = pump.sides
        self.log(f"relay {session.token[:8]}: ended ({reason}: {message}): "
                 f"{session.sent[0]} bytes {first.public} -> {second.public}, "
                 f"{session.sent[1]} back, {time.monotonic() - session.started:.1f} s")

    def _relay_refuse(self, c: _Conn, refusal: Refuse) -> None:
        self._log_offender(("relay", refusal.code, c.public.ip),
                           f"relay refused to {c.public}: {refusal.code}: {refusal.message}")
        self._carry_out([Reply(c.conn, encode_message(
            "ERROR", code=refusal.code, message=refusal.message), close=True)])

    def _relay_status(self, c: _Conn, token: str) -> None:
        if self.relay is None:
            self._relay_refuse(c, Refuse("relay-off", "this broker relays nothing (start it "
                                                      "with --relay)"))
            return
        reason, message = self.relay.status(token, time.monotonic())
        self._carry_out([Reply(c.conn, encode_message("RELAY_ENDED", reason=reason,
                                                      message=message), close=True)])

    # --- limits (README "Broker limits") -------------------------------------------------

    def _admit(self, ip: str, prefix: str) -> bool:
        """May a new connection from ``ip`` (of network ``prefix``) be counted in? Else
        say why (one log line per offender and interval). At the total cap, the oldest
        idle connection of the network holding the most goes, if that network holds at
        least two more than the newcomer's. Before a refusal or an eviction, the clients'
        reads waiting already are taken in (once an accept batch): a client that closed
        frees its slot, and a newcomer right behind it is neither refused nor the cause
        of an eviction."""
        refusal = self._over_caps(ip, prefix, evict=self._closes_taken)
        if refusal is not None and not self._closes_taken:
            self._closes_taken = True
            self._readers.ready_now()
            refusal = self._over_caps(ip, prefix, evict=True)
        if refusal is None:
            return True
        key, why = refusal
        self.stats["refused"] += 1
        self._log_offender(key, f"refused connections from {ip}: {why}")
        return False

    def _over_caps(self, ip: str, prefix: str, evict: bool) -> tuple[object, str] | None:
        """Which cap a newcomer from ``ip`` is over (the log's key, why), None if none (at
        the total cap, once ``_evict_idle`` made room)."""
        if self._per_ip.get(ip, 0) >= self.max_connections_per_ip:
            return ip, f"{self.max_connections_per_ip} connections open from this address"
        if self._conns_per_prefix[prefix] >= self.max_connections_per_prefix:
            return prefix, (f"{self.max_connections_per_prefix} connections open from its "
                            f"network {prefix}")
        if len(self._conns) >= self.max_connections and not (evict and
                                                             self._evict_idle(prefix)):
            return "full", f"the broker holds {self.max_connections} connections"
        return None

    def _count_in(self, c: _Conn) -> None:
        ip = c.public.ip
        self._conns[c.conn] = c
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        self._conns_per_prefix.add(c.prefix)
        self._idle.setdefault(c.prefix, OrderedDict())[c.conn] = None

    def _evict_idle(self, prefix: str) -> bool:
        # Only if the newcomer's network, with it, still holds fewer than the busiest:
        # else the hogs of equal networks would evict one another in a loop as fast as
        # they reconnect (each evicted one coming back to evict the next).
        if self._conns_per_prefix[prefix] + 1 >= self._conns_per_prefix.max:
            return False
        for top in self._conns_per_prefix.top():
            idle = self._idle.get(top)  # type: ignore[call-overload]
            if not idle:
                continue
            victim = self._conns[next(iter(idle))]
            if victim.phase != _CLOSED and victim.rendezvous:
                victim.transport.write(encode_message("ERROR", code="evicted", message=(
                    "the broker is full: the oldest idle connection of the busiest "
                    "network goes")))
            self._close(victim)
            # Its descriptor closed now, whatever was unsent (a list answer nobody reads):
            # counted out by _lost, its slot free for the newcomer.
            victim.transport.abort()
            self._release(victim.conn)  # (done already: _lost)
            self.stats["evicted"] += 1
            self._log_offender(("evicted", top), f"evicted idle connections of {top} "
                                                 f"(the broker holds {self.max_connections})")
            return True
        return False

    def _not_idle(self, conn: int) -> None:
        c = self._conns.get(conn)
        idle = self._idle.get(c.prefix) if c is not None else None
        if idle is not None:
            idle.pop(conn, None)

    def _release(self, conn: int) -> None:
        """Count a connection out (once), when its descriptor is closed."""
        c = self._conns.pop(conn, None)
        if c is None:
            return
        ip = c.public.ip
        left = self._per_ip.get(ip, 1) - 1
        if left > 0:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)
        self._conns_per_prefix.add(c.prefix, -1)
        idle = self._idle.get(c.prefix)
        if idle is not None:
            idle.pop(conn, None)
            if not idle:
                del self._idle[c.prefix]

    def _within_rate(self, conn: int, public: Endpoint, verb: str) -> bool:
        """Take a token of the address's and of its network's bucket; over either, the
        client gets ERROR code=rate-limited and is closed."""
        now = time.monotonic()
        prefix = prefix_of(public.ip)
        if not self.rate_per_ip.allow(public.ip, now):
            key, why = public.ip, f"over {self.rate_per_ip.rate:g}/s from this address"
        elif not self.rate_per_prefix.allow(prefix, now):
            key, why = prefix, f"over {self.rate_per_prefix.rate:g}/s from network {prefix}"
        else:
            return True
        self.stats["rate_limited"] += 1
        self._log_offender(key, f"rate-limited {public.ip}: {verb} {why}")
        self._carry_out([Reply(conn, encode_message("ERROR", code="rate-limited", message=(
            f"{verb} {why}: try again in a few seconds")), close=True)])
        return False

    def _log_offender(self, key: object, line: str) -> None:
        say, quiet = self._throttle.note(key, time.monotonic())
        if say:
            more = f" ({quiet} more in the last {LOG_EVERY_S:g} s)" if quiet else ""
            self.log(line + more)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's errors (and accept()'s: "socket.accept() out of system resource"
        when the open files run out) as one log line per kind and interval: never a
        traceback, and never one per connection."""
        self.stats["loop_errors"] += 1
        message = str(context.get("message") or "asyncio error")
        exc = context.get("exception")
        kind = f"{exc.__class__.__name__}: {exc}" if exc is not None else ""
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            kind += " (accepting again in 1 s; raise the open-file limit: ulimit -n)"
        self._log_offender(("loop", message[:60]), f"{message}: {kind}".rstrip(": "))

    async def _probe_unsolicited(self, conn: int, public: Endpoint) -> str | None:
        """One unsolicited SYN to the client's public endpoint, from our address it
        reached: "reject" if anything answers (RST, ICMP), "drop" if nothing does within
        a few of its RTTs, None if we cannot tell. An ordinary connect(): no privilege."""
        rtt = (self.rtt(conn) or (0.0, 0.0))[0]
        wait_s = min(SYN_PROBE_MAX_S, max(SYN_PROBE_MIN_S, 2 * rtt + 0.05))
        if public.is_v6:
            # A gateway's ICMPv6 rate limit holds back its first error towards a new
            # destination (Linux: measured in the lab, admin-prohibited came only for the
            # kernel's SYN retransmission, 1 s later): wait for that one too.
            wait_s = max(wait_s, SYN_PROBE_V6_S)
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
                told = reply.data.decode().strip()
                if " relay=" in told:  # the log shows a token's first 8 characters only
                    told = _TOKEN_IN_LOG.sub(r" relay=\1...", told)
                self.log(f"session {session}: paired, told {told}{held}")
            elif verb == "REGISTERED":
                self.log(f"session {session}: {public} waits for its peer")
            else:
                self.log(f"session {session}: {public}: {reply.data.decode().strip()}")


_TOKEN_IN_LOG = re.compile(r" relay=([0-9a-f]{8})[0-9a-f]{24}")


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
        sock = socket.socket(target.family, socket.SOCK_STREAM)
    except OSError:  # out of descriptors: the client registers with this unknown
        return None
    try:
        sock.setblocking(False)
        sock.bind((source_ip, 0))
        await asyncio.wait_for(loop.sock_connect(sock, (target.ip, target.port)), wait_s)
    except asyncio.TimeoutError:  # not the builtin TimeoutError before 3.11
        return "drop"
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                         errno.EACCES):
            # An RST, or an ICMP unreachable (port, host, admin-prohibited; ICMPv6's
            # admin-prohibited is EACCES)
            return "reject"
        return None  # our own side failed (EPERM from a local firewall, EADDRNOTAVAIL...)
    else:
        return "reject"  # something there answered with a SYN+ACK: an early SYN is answered
    finally:
        abort(sock)  # an RST, not a FIN, if it did connect; nothing at all from SYN-SENT


def _same_scope(alt: str, reached: str) -> bool:
    """Another address a client that reached ``reached`` can reach too: a different IP of
    the same kind (no loopback or private address offered to a client that came over a
    public one, no wildcard)."""
    if alt in (reached, "0.0.0.0", "::"):
        return False
    a, r = ipaddress.ip_address(alt), ipaddress.ip_address(reached)
    return (a.version == r.version and a.is_loopback == r.is_loopback
            and a.is_private == r.is_private
            and not a.is_link_local)


def raise_nofile_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as far as the kernel allows):
    (soft now, hard, soft before)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft, hard, before


def run_broker(binds: list[Endpoint], log: Log = stderr_log,
               services: dict[str, Service] | None = None, syn_probe: bool = False,
               relay: RelayLimits | None = None, redis_url: str | None = None,
               **options: Any) -> int:
    """Run until SIGINT (returns 130) or SIGTERM (returns 0). Raises OSError on bind.
    ``syn_probe``: learn what each registering client's NAT does to an unsolicited SYN
    (``Broker.syn_probe``). ``relay``: relay with these limits (--relay). ``options``:
    more fields of Broker (limits, for tests). ``redis_url``: share the sessions through
    that Redis (--redis); ValueError if it is not a Redis URL, ImportError without the
    redis package."""
    hub = RedisHub.check(redis_url, log) if redis_url is not None else None

    async def main() -> int:
        broker = Broker(binds, log=log, services=dict(services or {}), syn_probe=syn_probe,
                        relay=RelayTable(relay) if relay is not None else None,
                        shared=hub() if hub is not None else None, **options)
        stop = asyncio.Event()
        got: list[int] = []

        def on_signal(signum: int) -> None:
            got.append(signum)
            stop.set()

        # Before start(): its "listening on" line tells a supervisor (or a test) that the
        # broker is up, and a SIGINT or SIGTERM sent on that line must find our handlers
        # (the line is written by the log thread, which can come before the main thread
        # got here: the signal then skipped "stopped", or killed the broker).
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        await broker.start()
        try:
            await broker.serve_forever(stop)
        finally:
            await broker.close()
        log("stopped")
        return 130 if got and got[0] == signal.SIGINT else 0

    return asyncio.run(main())
