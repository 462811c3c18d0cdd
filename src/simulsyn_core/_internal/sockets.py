"""Small socket helpers shared by the client, the punch and the chat."""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator

from .endpoint import Endpoint

# What each connect() outcome means on Linux (tcp_v4_err, icmp_err_convert).
ERRNO_MEANING = {
    errno.ECONNREFUSED: "an RST or an ICMP port-unreachable came back",
    errno.ETIMEDOUT: "nothing came back",
    errno.EHOSTUNREACH: "an ICMP host-unreachable or admin-prohibited came back",
    errno.ENETUNREACH: "an ICMP net-unreachable came back, or no route",
    errno.EACCES: "an ICMPv6 administratively-prohibited came back",
    errno.EADDRINUSE: "the local port is taken for this destination",
    errno.EADDRNOTAVAIL: "the 4-tuple is still in use (TIME_WAIT?)",
    errno.ECONNRESET: "the connection was reset",
    errno.ENOTCONN: "connected, then reset at once: the attempts crossed",
}


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, f"errno {code}")


def describe_errno(code: int) -> str:
    return f"{errno_name(code)} ({ERRNO_MEANING.get(code, os.strerror(code))})"


# IPv6: every socket of a punch sends with the largest hop limit, so that what reaches the
# peer arrives with more than IPV6_MINHOPCOUNT (prime.py says why).
FULL_HOPS_V6 = 255


class SocketTracker:
    """Every socket this thread creates while the tracker is active (``tracking``), so that
    a cancelled establish (aio.connect) can wake and close them all from outside."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sockets: list[socket.socket] = []

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self.sockets.append(sock)

    def wake(self) -> None:
        """Shut every open socket down (blocked reads and selects return); the owner
        thread then fails fast and closes them itself."""
        with self._lock:
            for sock in self.sockets:
                if sock.fileno() != -1:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def close_all(self, keep: socket.socket | None = None) -> None:
        with self._lock:
            for sock in self.sockets:
                if sock is not keep:
                    sock.close()


_local = threading.local()


@contextlib.contextmanager
def tracking(tracker: SocketTracker) -> Iterator[SocketTracker]:
    """Register every socket ``new_socket`` makes in this thread with ``tracker``."""
    previous = getattr(_local, "tracker", None)
    _local.tracker = tracker
    try:
        yield tracker
    finally:
        _local.tracker = previous


def new_socket(kind: int = socket.SOCK_STREAM,
               family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    """A socket, registered with this thread's tracker if there is one."""
    sock = socket.socket(family, kind)
    tracker: SocketTracker | None = getattr(_local, "tracker", None)
    if tracker is not None:
        tracker.add(sock)
    return sock


def bound_socket(local_port: int | None, local_ip: str | None = None,
                 family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    """A TCP socket bound to local_ip:local_port with SO_REUSEADDR, as the technique needs.

    SO_REUSEADDR lets every socket of the run share one local port (Linux allows it as
    long as no socket on the port listens), so the NAT sees one internal endpoint. An
    IPv6 socket is IPv6 only, and sends with hop limit FULL_HOPS_V6. ``local_port`` None:
    not bound here (connect() picks a port whose 4-tuple is free).
    """
    sock = new_socket(family=family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, FULL_HOPS_V6)
        if local_port is not None:
            sock.bind((local_ip or ("::" if family == socket.AF_INET6 else "0.0.0.0"),
                       local_port))
    except BaseException:
        sock.close()
        raise
    return sock


def connect_nonblocking(sock: socket.socket, remote: Endpoint, timeout_s: float) -> int:
    """connect() bounded by timeout_s without a busy loop. Returns 0 or an errno."""
    sock.setblocking(False)
    code = sock.connect_ex(remote.sockaddr)
    if code == 0:
        return 0
    if code != errno.EINPROGRESS:
        return code
    return wait_connected(sock, timeout_s)


def wait_connected(sock: socket.socket, timeout_s: float) -> int:
    """Wait (bounded) for a non-blocking connect() under way. Returns 0 or an errno."""
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_WRITE)
        if not sel.select(max(0.0, timeout_s)):
            return errno.ETIMEDOUT
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code and tcp_state(sock) == TCP_ESTABLISHED:
        # An ICMP error that came while our own syscall held the socket is kept as a
        # soft error only (tcp_v4_err) and the connect went on: SO_ERROR reports it even
        # though the peer's SYN then got through. The connection is up.
        return 0
    return code


TCP_ESTABLISHED = 1  # include/net/tcp_states.h


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of sock (struct tcp_info's first byte), or -1."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return -1


def recv_until_eof(sock: socket.socket, deadline: float, limit: int = 65536) -> bytes:
    """Read until the remote closes, at most ``limit`` bytes, until ``deadline``."""
    data = bytearray()
    sock.setblocking(False)
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        while len(data) <= limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for the broker's answer")
            if not sel.select(remaining):
                continue
            chunk = sock.recv(4096)
            if not chunk:
                return bytes(data)
            data += chunk
    raise ValueError(f"answer longer than {limit} bytes")


def enable_keepalive(sock: socket.socket, idle_s: int = 30, interval_s: int = 10,
                     count: int = 3) -> None:
    """Let the kernel bound the chat: a silent dead peer is noticed in ~idle+interval*count."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", interval_s),
                       ("TCP_KEEPCNT", count)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


TCP_INFO_RTT_OFFSET = 68  # struct tcp_info: tcpi_rtt, tcpi_rttvar (microseconds), Linux's layout


def tcp_rtt(sock: socket.socket) -> tuple[float, float] | None:
    """The kernel's smoothed RTT of a connected TCP socket and its mean deviation
    (TCP_INFO tcpi_rtt, tcpi_rttvar), in seconds; None if unknown."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return None
    if len(info) < TCP_INFO_RTT_OFFSET + 8:
        return None
    rtt_us, var_us = struct.unpack_from("II", info, TCP_INFO_RTT_OFFSET)
    return (rtt_us / 1e6, var_us / 1e6) if rtt_us else None


def abort(sock: socket.socket) -> None:
    """Close with an RST, not a FIN (SO_LINGER 0): no TIME_WAIT, and a peer that got as
    far as SYN-RECEIVED is not left to take it for a finished exchange. A socket still in
    SYN-SENT sends nothing either way."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


QUEUED_READS = 16  # reads of 64 KiB: what a peer sent before its reset


def queued_before_reset(sock: socket.socket) -> Iterator[bytes]:
    """After a send failed on a reset: what the peer sent before it, still queued (the
    kernel hands out received data ahead of the error), such as a sealed ALERT that says
    why. No waiting; bounded; stops at the error or the end."""
    saved = sock.gettimeout()
    try:
        sock.setblocking(False)
        for _ in range(QUEUED_READS):
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            yield data
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(saved)
