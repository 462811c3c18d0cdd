"""The broker (rendezvous server): a thin asyncio layer over rendezvous.py.

On one TCP port it serves two protocols, told apart by who speaks first:

* a client that sends nothing within ``SEED_GRACE_S`` gets the original example's
  endpoint list (so the original client works unchanged) and the connection closes;
* a client that sends a ``SSYN1 REGISTER`` line is paired by session name.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import ipaddress
import queue
import resource
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .birthday import Offer
from .endpoint import Endpoint
from .limits import LogThrottle, MaxCounter, TokenBuckets, prefix_of
from .rendezvous import NAMEPLATE_RE, REPLY_SYN, UNSOLICITED, Reply, SeedList, SessionTable
from .sockets import abort, enable_keepalive, tcp_rtt
from .wire import (
    LINE_MAX,
    LineDecoder,
    Message,
    ProtocolError,
    encode_message,
    encode_seed_list,
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
RATE_LIMITED_VERBS = frozenset({"REGISTER", "WHOAMI"})
RATE_MAX_KEYS = 65536  # buckets kept at most (idle ones go first)
LOG_EVERY_S = 10.0  # one log line per offender (and per kind of loop error) this often
# The listen queue (the kernel caps it at net.core.somaxconn, 4096 by default): under a
# flood of connects a short queue overflows and a newcomer's SYN is dropped, costing it a
# 1 s retransmission before the broker even sees it.
BACKLOG = 4096
# The broker accepts itself (not asyncio's Server): each connection is admitted or
# refused (closed at once, its descriptor freed) right after accept(), before any
# transport or task is made for it. asyncio's server accepts a batch, and refuses only a
# few loop turns later in the handler: under a flood at the cap the batches in flight
# overshot the open-file limit (EMFILE, accept paused 1 s at a time). asyncio still
# closes a descriptor one loop turn after close(): an eviction frees its slot at once but
# its descriptor a turn later. So a loop turn accepts at most ACCEPT_BATCH connections and
# evicts at most EVICT_PER_TURN (the rest of the queue waits for the next turn): the
# descriptors over the cap stay well under FD_RESERVE, and the loop turns to the other
# clients in between.
ACCEPT_BATCH = 64
EVICT_PER_TURN = 16
ACCEPT_RETRY_S = 1.0  # after EMFILE/ENFILE/ENOBUFS/ENOMEM, as asyncio's own server
FIRST_LINE_TIMEOUT_S = 5.0  # a connection that has not sent a whole line by then goes
EXPIRE_EVERY_S = 5.0
WRITE_DRAIN_TIMEOUT_S = 5.0
CLOSE_GRACE_S = 2.0  # on stop, connection handlers get this long to finish
KEEPALIVE = (30, 10, 3)  # idle, interval, count: a waiting client that vanished is noticed
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


class _StderrWriter:
    """Log lines go through a bounded queue to a writer thread, so a slow or stuck
    stderr (a pipe nobody reads) never blocks the event loop; lines that do not fit
    are counted and the count is written once stderr drains."""

    def __init__(self) -> None:
        self._queue: queue.Queue[str] = queue.Queue(LOG_QUEUE_MAX)
        self._dropped = 0
        self._thread: threading.Thread | None = None

    def __call__(self, line: str) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="log", daemon=True)
            self._thread.start()
            atexit.register(self.flush)  # the last lines (e.g. "stopped") get written
        stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
        try:
            self._queue.put_nowait(f"{stamp} {line}")
        except queue.Full:
            self._dropped += 1

    def _run(self) -> None:
        while True:
            line = self._queue.get()
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                line = f"{line}\n(log: {dropped} line(s) dropped while stderr was full)"
            with contextlib.suppress(OSError, ValueError):
                print(line, file=sys.stderr, flush=True)
            self._queue.task_done()

    def flush(self, timeout_s: float = 2.0) -> None:
        """Wait (bounded) until the queued lines are written."""
        end = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)


stderr_log = _StderrWriter()


@dataclass
class _Conn:
    """What the broker's limits know of one open connection."""

    ip: str
    prefix: str
    rendezvous: bool = False  # it began a rendezvous line (an eviction is told so)


def _buckets(rate: tuple[float, float]) -> TokenBuckets:
    return TokenBuckets(rate[0], rate[1], RATE_MAX_KEYS)


@dataclass
class Broker:
    binds: list[Endpoint]
    log: Log = stderr_log
    seed_grace_s: float = SEED_GRACE_S
    seeds: SeedList = field(default_factory=SeedList)
    sessions: SessionTable = field(default_factory=SessionTable)
    _writers: dict[int, asyncio.StreamWriter] = field(default_factory=dict)
    _next_conn: int = 0
    services: dict[str, Service] = field(default_factory=dict)
    _servers: list[socket.socket] = field(default_factory=list)  # the listening sockets
    _per_ip: dict[str, int] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    syn_probe: bool = False  # probe each registering client's NAT with one unsolicited SYN
    sync_hold_s: dict[int, float] = field(default_factory=dict)  # for the log line, then gone
    # The limits (README "Broker limits"); max_connections is lowered at start() to what
    # the open-file limit leaves.
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP
    max_connections_per_prefix: int = MAX_CONNECTIONS_PER_PREFIX
    rate_per_ip: TokenBuckets = field(default_factory=lambda: _buckets(RATE_PER_IP))
    rate_per_prefix: TokenBuckets = field(default_factory=lambda: _buckets(RATE_PER_PREFIX))
    _conns: dict[int, _Conn] = field(default_factory=dict)  # every connection accepted
    _conns_per_prefix: MaxCounter = field(default_factory=MaxCounter)
    # Per prefix, its idle connections (evictable), oldest first.
    _idle: dict[str, OrderedDict[int, None]] = field(default_factory=dict)
    _throttle: LogThrottle = field(default_factory=lambda: LogThrottle(LOG_EVERY_S))
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("refused", "evicted", "rate_limited", "loop_errors"), 0))

    def send(self, conn: int, data: bytes, close: bool = False) -> None:
        self._carry_out([Reply(conn, data, close)])

    def is_open(self, conn: int) -> bool:
        return conn in self._writers

    def local_endpoint(self, conn: int) -> Endpoint | None:
        """The broker address and port that connection ``conn`` reached."""
        writer = self._writers.get(conn)
        sockname = writer.get_extra_info("sockname") if writer is not None else None
        return Endpoint.from_sockaddr(sockname) if sockname else None

    async def start(self) -> None:
        asyncio.get_running_loop().set_exception_handler(self._loop_error)
        soft, hard, before = raise_nofile_limit()
        budget = MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else max(16, soft - FD_RESERVE)
        if budget < self.max_connections:
            self.max_connections = budget
        raised = f"raised from {before} to {soft}" if soft != before else f"{soft}"
        self.log(f"open files: soft limit {raised} (hard {hard}): serving at most "
                 f"{self.max_connections} connections ({FD_RESERVE} descriptors kept back)")
        loop = asyncio.get_running_loop()
        for ep in self.binds:
            family = socket.AF_INET6 if ":" in ep.ip else socket.AF_INET
            sock = socket.create_server((ep.ip, ep.port), family=family, backlog=BACKLOG)
            sock.setblocking(False)
            self._servers.append(sock)
            loop.add_reader(sock.fileno(), self._accept, sock)
            self.log(f"listening on {Endpoint.from_sockaddr(sock.getsockname())}")

    @property
    def listening(self) -> list[Endpoint]:
        return [Endpoint.from_sockaddr(s.getsockname()) for s in self._servers
                if s.fileno() >= 0]

    def _accept(self, listener: socket.socket) -> None:
        """Accept what is waiting (ACCEPT_BATCH at most); admit each connection or close
        it at once (the limits: ``_admit``)."""
        loop = asyncio.get_running_loop()
        evicted = self.stats["evicted"]
        for _ in range(ACCEPT_BATCH):
            if self.stats["evicted"] - evicted >= EVICT_PER_TURN:
                return
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    loop.remove_reader(listener.fileno())
                    loop.call_later(ACCEPT_RETRY_S, self._resume_accept, listener)
                self._loop_error(loop, {"message": "socket.accept() out of system resource"
                                        if exc.errno == errno.EMFILE else "accept() failed",
                                        "exception": exc})
                return
            # The original protocol carries IPv4 only; others get nothing.
            conn = self._next_conn
            if sock.family != socket.AF_INET or not self._admit(conn, addr[0]):
                sock.close()
                continue
            self._next_conn += 1
            task = loop.create_task(self._serve(conn, sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resume_accept(self, listener: socket.socket) -> None:
        if listener.fileno() >= 0:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener)

    async def _serve(self, conn: int, sock: socket.socket) -> None:
        """Streams for an admitted connection, then ``_handle``."""
        loop = asyncio.get_running_loop()
        try:
            sock.setblocking(False)
            reader = asyncio.StreamReader(loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
        except asyncio.CancelledError:  # the broker stops
            self._release(conn)
            sock.close()
            raise
        except (OSError, RuntimeError) as exc:
            self._release(conn)
            sock.close()
            self._log_offender(("serve", exc.__class__.__name__), f"connection lost at accept: "
                                                                  f"{exc!r}")
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        if conn not in self._conns:  # evicted before it started (the broker was full)
            writer.close()
            return
        await self._handle(conn, reader, writer)

    async def serve_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), EXPIRE_EVERY_S)
            self._carry_out(self.sessions.expire(time.monotonic()))

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self._servers:
            if listener.fileno() >= 0:
                loop.remove_reader(listener.fileno())
                listener.close()
        for writer in list(self._writers.values()):
            writer.close()
        # Let the handlers finish (they hold the writers), then cancel what is left, so
        # that asyncio.run() has nothing to cancel and print.
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=CLOSE_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def rtt(self, conn: int) -> tuple[float, float] | None:
        """The kernel's smoothed RTT of connection ``conn`` and its mean deviation
        (TCP_INFO), None if unknown."""
        writer = self._writers.get(conn)
        sock = writer.get_extra_info("socket") if writer is not None else None
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
            writer = self._writers.get(reply.conn)  # type: ignore[call-overload]
            if writer is None:
                continue
            writer.write(reply.data)
            if reply.close:
                self._writers.pop(reply.conn, None)  # type: ignore[call-overload]
                writer.close()

    async def _handle(self, conn: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        sock = writer.get_extra_info("socket")
        if sock is None or not peername:
            self._release(conn)
            writer.close()
            return
        public = Endpoint.from_sockaddr(peername)
        with contextlib.suppress(OSError):
            enable_keepalive(sock, *KEEPALIVE)
        self._writers[conn] = writer
        try:
            try:
                first = await asyncio.wait_for(reader.read(LINE_MAX), self.seed_grace_s)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before 3.11
                first = b""
            if conn not in self._writers:
                return  # evicted meanwhile (the broker was full)
            if not first:
                entries = self.seeds.visit(public, time.monotonic())
                writer.write(encode_seed_list(entries))
                self.log(f"list {public}: {len(entries)} endpoint(s)")
            elif looks_like_rendezvous(first):
                self._conns[conn].rendezvous = True
                await self._rendezvous(conn, public, reader, first)
            else:
                self.log(f"closed {public}: sent {len(first)} bytes that are neither protocol")
        except (ConnectionError, OSError) as exc:
            self.log(f"connection {public}: {exc.__class__.__name__}: {exc}")
        except Exception as exc:  # keep serving everyone else whatever one client did
            self.log(f"connection {public}: internal error {exc!r}")
        finally:
            self._carry_out(self.sessions.disconnect(conn))
            self._writers.pop(conn, None)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), WRITE_DRAIN_TIMEOUT_S)
            except Exception:  # a peer that reads nothing (its data unsent), or a reset
                writer.transport.abort()
            finally:
                # Counted out once its descriptor is closed (or about to be, this turn),
                # so that the cap stays under the open-file limit.
                self._release(conn)

    async def _rendezvous(self, conn: int, public: Endpoint, reader: asyncio.StreamReader,
                          first: bytes) -> None:
        decoder = LineDecoder()
        data = first
        # Until a whole line has come, a connection gets only a few seconds: one that
        # trickles bytes cannot hold a slot for the whole session wait.
        deadline = time.monotonic() + FIRST_LINE_TIMEOUT_S
        while conn in self._writers:
            try:
                for msg in decoder.feed(data):
                    deadline = time.monotonic() + self.sessions.wait_max_s + EXPIRE_EVERY_S
                    if msg.verb in RATE_LIMITED_VERBS and not self._within_rate(conn, public,
                                                                                 msg.verb):
                        return
                    service = self.services.get(msg.verb)
                    if service is not None:
                        await service(self, conn, public, msg)
                        self._not_idle(conn)  # a nat-check control connection, say
                        continue
                    if msg.verb == "PRIMED" and self.sessions.priming(conn):
                        self._carry_out(self.sessions.step(conn, msg.verb))
                        continue
                    if msg.verb == "WHOAMI":
                        self._carry_out([self._youare(conn, public, msg.get("close") == "1")])
                        # Until it registers, a connection keeps the short first-line bound.
                        deadline = time.monotonic() + FIRST_LINE_TIMEOUT_S
                        continue
                    if msg.verb != "REGISTER":
                        raise ProtocolError(f"unexpected {msg.verb} from a client")
                    nameplate = msg.get("nameplate")
                    if nameplate is not None and nameplate != "new" and \
                            not NAMEPLATE_RE.fullmatch(nameplate):
                        raise ProtocolError("nameplate= is new or a number of 1-6 digits")
                    # A new code's number is chosen right before registering (after the
                    # probe's wait): two new codes can never be given one number.
                    session = msg.require("session") if nameplate is None else f"#{nameplate}"
                    local = msg.endpoint("local") if msg.get("local") else None
                    offered = frozenset(filter(None, (msg.get("strategies") or "").split(",")))
                    unsolicited = _known(msg.get("unsolicited"), UNSOLICITED)
                    if unsolicited is None and self.syn_probe and self.sessions.worth_probing(
                            conn, session, offered, msg.get("mapping")):
                        unsolicited = await self._probe_unsolicited(conn, public)
                        if conn not in self._writers:
                            return
                    if session == "#new":
                        session = self.sessions.new_nameplate()
                    replies = self.sessions.register(
                        conn, session, public, local, time.monotonic(), offered,
                        msg.get("mapping"), unsolicited, _known(msg.get("reply_syn"), REPLY_SYN),
                        Offer.parse(msg.get))
                    self._carry_out(replies)
                    self._log_replies(public, session, replies)
                    if self.sessions.holds(conn):
                        self._not_idle(conn)
            except ProtocolError as exc:
                self.log(f"bad request from {public}: {exc}")
                self._carry_out([Reply(conn, encode_message(
                    "ERROR", code="bad-request", message=str(exc)[:120]), close=True)])
                return
            if conn not in self._writers:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                data = await asyncio.wait_for(reader.read(LINE_MAX), remaining)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before 3.11
                return
            if not data:
                if conn in self._writers:  # not closed by us after PEER or ERROR
                    self.log(f"{public} left before its peer came")
                return

    # --- limits (README "Broker limits") -------------------------------------------------

    def _admit(self, conn: int, ip: str) -> bool:
        """Count a new connection in, or say why not (one log line per offender and
        interval). At the total cap, the oldest idle connection of the network holding
        the most goes, if that network holds at least two more than the newcomer's."""
        prefix = prefix_of(ip)
        why = None
        if self._per_ip.get(ip, 0) >= self.max_connections_per_ip:
            why, key = f"{self.max_connections_per_ip} connections open from this address", ip
        elif self._conns_per_prefix[prefix] >= self.max_connections_per_prefix:
            why, key = (f"{self.max_connections_per_prefix} connections open from its "
                        f"network {prefix}"), prefix
        elif len(self._conns) >= self.max_connections and not self._evict_idle(prefix):
            why, key = f"the broker holds {self.max_connections} connections", "full"
        if why is not None:
            self.stats["refused"] += 1
            self._log_offender(key, f"refused connections from {ip}: {why}")
            return False
        self._conns[conn] = _Conn(ip, prefix)
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        self._conns_per_prefix.add(prefix)
        self._idle.setdefault(prefix, OrderedDict())[conn] = None
        return True

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
            victim = next(iter(idle))
            info = self._conns[victim]
            writer = self._writers.pop(victim, None)
            if writer is not None:
                if info.rendezvous:
                    writer.write(encode_message("ERROR", code="evicted", message=(
                        "the broker is full: the oldest idle connection of the busiest "
                        "network goes")))
                writer.close()
            self._release(victim)
            self.stats["evicted"] += 1
            self._log_offender(("evicted", top), f"evicted idle connections of {top} "
                                                 f"(the broker holds {self.max_connections})")
            return True
        return False

    def _not_idle(self, conn: int) -> None:
        info = self._conns.get(conn)
        idle = self._idle.get(info.prefix) if info is not None else None
        if idle is not None:
            idle.pop(conn, None)

    def _release(self, conn: int) -> None:
        """Count a connection out (once: eviction and the handler's end both call it)."""
        info = self._conns.pop(conn, None)
        if info is None:
            return
        left = self._per_ip.get(info.ip, 1) - 1
        if left > 0:
            self._per_ip[info.ip] = left
        else:
            self._per_ip.pop(info.ip, None)
        self._conns_per_prefix.add(info.prefix, -1)
        idle = self._idle.get(info.prefix)
        if idle is not None:
            idle.pop(conn, None)
            if not idle:
                del self._idle[info.prefix]

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
        """asyncio's errors ("socket.accept() out of system resource" when the open
        files run out, and anything else) as one log line per kind and interval: never a
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
               **options: Any) -> int:
    """Run until SIGINT (returns 130) or SIGTERM (returns 0). Raises OSError on bind.
    ``syn_probe``: learn what each registering client's NAT does to an unsolicited SYN
    (``Broker.syn_probe``). ``options``: more fields of Broker (limits, for tests)."""

    async def main() -> int:
        broker = Broker(binds, log=log, services=dict(services or {}), syn_probe=syn_probe,
                        **options)
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
