"""Many non-blocking connect()s at a bounded rate, watched with one epoll: the I/O of
birthday punching (birthday.py has the plan and the arithmetic).

Ordinary sockets only, no privilege: the random side's come from kernel-chosen local
ports (each a new 4-tuple, so its NAT gives each a new public port); the easy side's
all share the run's local port (SO_REUSEADDR), each towards another guessed port. A
socket still in SYN-SENT sends nothing when closed; one that got further is closed
with an RST (``sockets.abort``), so no losing connection lingers on either host.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import selectors
import socket
import struct
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .endpoint import Endpoint
from .prime import TCP_SYN_RECV, set_min_ttl, set_ttl
from .sockets import TCP_ESTABLISHED, abort, bound_socket, errno_name, tcp_state

TCP_INFO_TOTAL_RETRANS = 100  # struct tcp_info: tcpi_total_retrans (u32)
FD_SPARE = 64  # descriptors kept free beside the pool's (broker, chat, capture, Python)


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to ``wanted`` + FD_SPARE, within the hard limit.
    Returns how many sockets the pool may open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_SPARE
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(0, min(wanted, soft - FD_SPARE))


def _retransmits(sock: socket.socket) -> int:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return 0
    if len(info) < TCP_INFO_TOTAL_RETRANS + 4:
        return 0
    return int(struct.unpack_from("I", info, TCP_INFO_TOTAL_RETRANS)[0])


@dataclass
class Pool:
    """The sockets of one side's burst. ``connected`` holds the ones that came up, in
    order, with the index of their target; ``failed`` counts the others' errors. With
    ``watch_read``, a connected socket that becomes readable (the peer's first bytes, or
    its RST) moves to ``readable``."""

    watch_read: bool = False
    sel: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    pending: dict[int, tuple[socket.socket, int]] = field(default_factory=dict)
    connected: list[tuple[socket.socket, int]] = field(default_factory=list)
    readable: list[tuple[socket.socket, int]] = field(default_factory=list)
    failed: Counter[str] = field(default_factory=Counter)
    opened: int = 0  # SYNs we asked for (one per socket)
    retransmitted: int = 0  # the kernel's SYN retransmissions, of closed sockets
    first_sent: float | None = None
    last_sent: float | None = None
    _opened_up: set[int] = field(default_factory=set)  # held sockets given a full TTL

    def open(self, target: Endpoint, index: int, local_port: int | None,
             ttl: int | None, hold_ttl: bool = False) -> None:
        """One non-blocking connect() to ``target`` from ``local_port`` (None: a port the
        kernel picks). ``ttl``: its SYN leaves with that TTL (and IP_MINTTL drops the
        time-exceeded it draws), then the socket gets a full TTL for what follows, unless
        ``hold_ttl``: then it keeps the limited TTL until ``open_up()``."""
        try:
            sock = bound_socket(local_port, family=target.family)
        except OSError as exc:
            self.failed[errno_name(exc.errno or 0)] += 1
            return
        try:
            if ttl is not None:
                set_ttl(sock, ttl)
                set_min_ttl(sock, True)
            sock.setblocking(False)
            code = sock.connect_ex(target.sockaddr)
            if ttl is not None and not hold_ttl:  # the SYN is out: what follows in full
                set_ttl(sock, None)
        except OSError as exc:
            sock.close()
            self.failed[errno_name(exc.errno or 0)] += 1
            return
        now = time.monotonic()
        self.first_sent = self.first_sent if self.first_sent is not None else now
        self.last_sent = now
        self.opened += 1
        if code not in (0, errno.EINPROGRESS):
            self.failed[errno_name(code)] += 1
            sock.close()
            return
        self.pending[sock.fileno()] = (sock, index)
        self.sel.register(sock, selectors.EVENT_WRITE, (sock, index))

    def poll(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for connects to finish; returns how many came up."""
        if not self.sel.get_map():
            if timeout_s > 0:
                time.sleep(timeout_s)
            return 0
        came = 0
        for key, _ in self.sel.select(max(0.0, timeout_s)):
            sock, index = key.data
            self.sel.unregister(sock)
            if self.pending.pop(key.fd, None) is None:  # a connected one, readable
                self.readable.append((sock, index))
                continue
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if tcp_state(sock) == TCP_ESTABLISHED:
                self.connected.append((sock, index))
                if self.watch_read:
                    self.sel.register(sock, selectors.EVENT_READ, (sock, index))
                came += 1
            else:
                self.failed[errno_name(code or errno.ENOTCONN)] += 1
                self._close(sock)
        return came

    def open_up_answered(self) -> int:
        """A full TTL for each held socket that a peer's SYN reached (SYN-RECEIVED): its
        SYN+ACK, resent on the SYN's own timer, then crosses. Returns how many."""
        count = 0
        for fd, (sock, _) in self.pending.items():
            if fd in self._opened_up:
                continue
            with contextlib.suppress(OSError):
                if tcp_state(sock) == TCP_SYN_RECV:
                    set_ttl(sock, None)
                    self._opened_up.add(fd)
                    count += 1
        return count

    def open_up(self) -> None:
        """A full TTL for every open socket (held ones: what they send from now on)."""
        for sock, _ in [*self.pending.values(), *self.connected]:
            with contextlib.suppress(OSError):
                set_ttl(sock, None)

    def burst(self, targets: Sequence[Endpoint], start: int, local_port: int | None,
              rate: float, ttl: int | None, deadline: float, stop_on_connect: bool,
              hold_ttl: bool = False) -> int:
        """Open a socket per target from index ``start`` on, at most ``rate`` per second,
        watching for connections in between; stop early while one is up when
        ``stop_on_connect``. Returns the index of the next target not sent."""
        t0 = time.monotonic()
        for index in range(start, len(targets)):
            due = t0 + (index - start) / rate
            while True:
                # Always look before the next SYN, even behind schedule (a late wake-up
                # under load): a connection that came meanwhile ends the burst there.
                now = time.monotonic()
                self.poll(max(0.0, min(due, deadline) - now))
                if time.monotonic() >= deadline or (stop_on_connect and self.connected):
                    return index
                if time.monotonic() >= due:
                    break
            self.open(targets[index], index, local_port, ttl, hold_ttl)
        if stop_on_connect:
            self.poll(0)
        return len(targets)

    def _close(self, sock: socket.socket) -> None:
        self.retransmitted += _retransmits(sock)
        abort(sock)

    def drop(self, sock: socket.socket) -> None:
        """Close a connected socket that lost (RST) and forget it."""
        self.connected = [(s, i) for s, i in self.connected if s is not sock]
        self.readable = [(s, i) for s, i in self.readable if s is not sock]
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)
        self._close(sock)

    def close(self, keep: socket.socket | None = None) -> None:
        """Close every socket but ``keep``: the pending ones send nothing (SYN-SENT), a
        connected one is reset."""
        for sock, _ in list(self.pending.values()):
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sock)
            self._close(sock)
        self.pending.clear()
        for sock, _ in self.connected:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sock)
            if sock is keep:
                self.retransmitted += _retransmits(sock)
            else:
                self._close(sock)
        self.connected = [(s, i) for s, i in self.connected if s is keep]
        self.readable = []
        self.sel.close()

    @property
    def syns_sent(self) -> int:
        return self.opened + self.retransmitted
