"""The line chat over the punched connection, framed as the original (length byte + UTF-8).

stdin lines go to the peer, the peer's messages go to stdout. At the end of stdin we
stop sending (shutdown SHUT_WR) and keep printing until the peer closes, as netcat does.
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from .exitcodes import ExitStatus
from .secure import (
    DATA,
    END,
    PAKE_PREFIX,
    AuthFailed,
    Channel,
    Handshake,
    Tampered,
    tell_peer,
)
from .sockets import abort, enable_keepalive, queued_before_reset
from .wire import Confirmation, FrameDecoder, ProtocolError, encode_chat

HELLO = "simulsyn hello"
HELLO_TIMEOUT_S = 10.0
LINGER_S = 2.0  # after --no-chat's hello, wait this long for the peer's FIN
SELECT_SLICE_S = 1.0
USER_TIMEOUT_MS = 20000  # TCP_USER_TIMEOUT: unacknowledged data for this long = peer lost
PENDING_MAX = 65536  # a line longer than this is sent before its newline comes
OUTBUF_MAX = 1 << 20  # framed input waiting for the socket; stdin is not read past it


def _print_frame(payload: bytes, out: TextIO, event: Callable[[str], None]) -> None:
    text = payload.decode("utf-8", errors="replace")
    if "\ufffd" in text and b"\xef\xbf\xbd" not in payload:
        event("peer sent a message that is not valid UTF-8; shown with replacement characters")
    out.write(text + "\n")
    out.flush()


class _PeerLost(Exception):
    pass


class LineInput:
    """stdin bytes to chat lines: whole lines as they come, a line over PENDING_MAX sent
    before its newline, the unfinished last line at the end of input."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, chunk: bytes) -> list[str]:
        """The lines ``chunk`` completes; b"" (end of input): the unfinished one, if any."""
        if not chunk:
            last, self.pending = self.pending, b""
            return [_text(last)] if last else []
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        if len(self.pending) > PENDING_MAX:  # a huge line: send what we have
            lines.append(self.pending)
            self.pending = b""
        return [_text(line) for line in lines]


class PlainCodec:
    """The original's framing: a length byte, then UTF-8 (messages over 255 bytes are
    cut into several)."""

    encrypted = False

    def __init__(self) -> None:
        self._decoder = FrameDecoder()

    def encode(self, text: str) -> bytes:
        return encode_chat(text)

    def feed(self, data: bytes) -> Iterator[bytes]:
        for payload in self._decoder.feed(data):
            if payload.startswith(PAKE_PREFIX):
                raise AuthFailed("the peer encrypts and authenticates, we run --plain: "
                                 "nothing of theirs shown")
            yield payload

    def end(self) -> bytes:
        return b""

    def peer_closed(self, event: Callable[[str], None]) -> None:
        if self._decoder.pending:
            event(f"peer closed inside a message ({self._decoder.pending} bytes dropped)")


class SealedCodec:
    """Sealed records of an authenticated channel (secure.py)."""

    encrypted = True

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def encode(self, text: str) -> bytes:
        return self.channel.seal_text(text)

    def feed(self, data: bytes) -> Iterator[bytes]:
        for kind, payload in self.channel.feed(data):
            if kind == DATA:
                yield payload

    def end(self) -> bytes:
        return self.channel.seal(END)

    def peer_closed(self, event: Callable[[str], None]) -> None:
        self.channel.check_end()


Codec = PlainCodec | SealedCodec


def _recv_chunks(sock: socket.socket, deadline: float) -> Iterator[bytes]:
    """What the peer sends until ``deadline``: data chunks, then b"" if it closes.
    Stops silently at the deadline; raises OSError if the connection breaks."""
    sock.setblocking(False)
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if not sel.select(remaining):
                continue
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue  # a wake-up with nothing to read (e.g. a late ICMP error)
            yield data
            if not data:
                return


def confirm_path(sock: socket.socket, timeout_s: float) -> bytes | None:
    """Run the HELLO/ACK exchange (wire.Confirmation); the bytes after it, or None."""
    check = Confirmation()
    try:
        _send_all(sock, check.opening())
        for data in _recv_chunks(sock, time.monotonic() + max(0.0, timeout_s)):
            if not data:
                return None
            reply = check.feed(data)
            if reply:
                _send_all(sock, reply)
            if check.done:
                return check.leftover
    except (OSError, ProtocolError):
        return None
    return None


def close_cleanly(sock: socket.socket) -> ExitStatus:
    """Half-close and wait (bounded) for the peer's FIN, so neither side sees an RST."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        for data in _recv_chunks(sock, time.monotonic() + LINGER_S):
            if not data:
                break
    return ExitStatus.OK


def chat(sock: socket.socket, stdin_fd: int, out: TextIO,
         event: Callable[[str], None], initial: bytes = b"",
         codec: Codec | None = None, early: list[bytes] | None = None) -> ExitStatus:
    """Run the chat until both directions are finished (our stdin ended, everything we
    framed was sent, and the peer closed its side).

    Nothing here blocks: frames wait in a bounded send buffer while the socket is not
    writable, and stdin is not read while that buffer is full, so two peers that both
    send a lot never wait on each other. poll() (unlike epoll) takes any stdin, a
    regular file included (always readable). The kernel's keepalive and
    TCP_USER_TIMEOUT bound a dead peer.

    ``codec``: the framing (PlainCodec by default, SealedCodec after the PAKE); ``early``:
    messages that came with the handshake. A record that fails its check ends the chat
    with TAMPERED (the connection is reset), a plain peer of an encrypting one with
    AUTH_FAILED.
    """
    codec = codec if codec is not None else PlainCodec()
    enable_keepalive(sock)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        # Data the peer never acknowledges ends the chat (PEER_LOST) instead of a hang.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    sock.setblocking(False)
    outbuf = bytearray()
    lines = LineInput()
    sent = received = 0
    stdin_open = peer_open = True
    write_shut = False
    try:
        for payload in [*(early or []), *codec.feed(initial)]:
            received += 1
            _print_frame(payload, out, event)
    except (Tampered, AuthFailed) as exc:
        return _broken(sock, exc, event, codec)

    def take_input(chunk: bytes) -> None:
        nonlocal sent, stdin_open
        for line in lines.feed(chunk):
            outbuf.extend(codec.encode(line))
            sent += 1
        if not chunk:  # end of input: after the last unfinished line, the end
            outbuf.extend(codec.end())
            stdin_open = False

    try:
        while stdin_open or peer_open or outbuf:
            poller = select.poll()
            sock_mask = (select.POLLIN if peer_open else 0) | (select.POLLOUT if outbuf else 0)
            if sock_mask:
                poller.register(sock, sock_mask)
            if stdin_open and len(outbuf) < OUTBUF_MAX:
                poller.register(stdin_fd, select.POLLIN)
            ready = dict(poller.poll(int(SELECT_SLICE_S * 1000)))
            if ready.get(stdin_fd, 0):
                try:
                    chunk = os.read(stdin_fd, 65536)
                except (BlockingIOError, InterruptedError):
                    chunk = None
                except OSError:
                    chunk = b""  # stdin went away: treat it as its end
                if chunk is not None:
                    take_input(chunk)
            events = ready.get(sock.fileno(), 0)
            if events & select.POLLOUT and outbuf:
                try:
                    del outbuf[: sock.send(outbuf)]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as exc:
                    for queued in queued_before_reset(sock):  # its ALERT raises Tampered
                        for payload in codec.feed(queued):
                            received += 1
                            _print_frame(payload, out, event)
                    raise _PeerLost(str(exc)) from None
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and peer_open:
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    data = None  # a wake-up with nothing to read (e.g. a late ICMP error)
                except OSError as exc:
                    raise _PeerLost(str(exc)) from None
                if data:
                    for payload in codec.feed(data):
                        received += 1
                        _print_frame(payload, out, event)
                elif data is not None:
                    codec.peer_closed(event)
                    event(f"peer finished sending: received {received} message(s)")
                    peer_open = False
            if not stdin_open and not outbuf and not write_shut:
                write_shut = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                event(f"end of input: sent {sent} message(s)"
                      + ("; waiting for the peer to finish" if peer_open else ""))
    except _PeerLost as exc:
        event(f"connection to the peer lost: {exc}")
        return ExitStatus.PEER_LOST
    except (Tampered, AuthFailed) as exc:
        return _broken(sock, exc, event, codec, bytes(outbuf))
    return ExitStatus.OK


def _broken(sock: socket.socket, exc: Exception, event: Callable[[str], None],
            codec: Codec, pending: bytes = b"") -> ExitStatus:
    """A record that is not the peer's, or a plain peer of an encrypting one: tell the peer
    what we found (an ALERT after what we still had to send), reset the connection
    (nothing more is read or sent) and say which."""
    tell_peer(sock, codec.channel if isinstance(codec, SealedCodec) else None, exc, pending)
    abort(sock)
    if isinstance(exc, AuthFailed):
        event(f"authentication failed: {exc}")
        return ExitStatus.AUTH_FAILED
    assert isinstance(exc, Tampered)
    event(f"connection closed: {exc.describe()}")
    return ExitStatus.TAMPERED


def secure(sock: socket.socket, password: bytes, initial: bytes, timeout_s: float
           ) -> tuple[Channel, list[bytes]]:
    """Run the PAKE and the key confirmation on a connected socket (secure.py); returns
    the channel and any chat messages that came with the peer's confirmation. ``initial``:
    bytes already received (after the path check). Raises AuthFailed (also when the peer
    says nothing in time, or leaves), Tampered."""
    channel, records = secure_records(sock, password, initial, timeout_s)
    return channel, [p for kind, p in records if kind == DATA]


def secure_records(sock: socket.socket, password: bytes, initial: bytes, timeout_s: float
                   ) -> tuple[Channel, list[tuple[int, bytes]]]:
    """``secure``, with every record that came with the peer's confirmation (opened).
    Raises AuthFailed, or Tampered (a record behind the peer's confirmation; the peer was
    sent our ALERT: the caller resets the connection)."""
    hs = Handshake(password)
    try:
        _send_all(sock, hs.opening())
        chunks = _recv_chunks(sock, time.monotonic() + max(0.0, timeout_s))
        data = initial
        while True:
            reply = hs.feed(data)
            if reply:
                _send_all(sock, reply)
            hs.check()
            if hs.confirmed:
                assert hs.channel is not None
                try:
                    return hs.channel, hs.leftover()
                except Tampered as exc:  # a record behind the confirmation: tell the peer
                    tell_peer(sock, hs.channel, exc)
                    raise
            got = next(chunks, None)
            if got is None:
                raise AuthFailed(f"the peer did not authenticate within {timeout_s:.0f} s")
            data = got
            if not data:
                raise AuthFailed("the peer closed the connection during authentication")
    except OSError as exc:
        raise AuthFailed(f"connection lost during authentication: {exc}") from None


def _text(line: bytes) -> str:
    return line.decode("utf-8", errors="replace").rstrip("\r")


def _send_all(sock: socket.socket, frame: bytes) -> None:
    sock.setblocking(True)
    try:
        sock.sendall(frame)
    finally:
        sock.setblocking(False)


def hello_exchange(sock: socket.socket, timeout_s: float,
                   event: Callable[[str], None]) -> ExitStatus:
    """--no-chat with a peer that may be the original: send one framed hello, read the
    peer's first message, close cleanly."""
    decoder = FrameDecoder()
    try:
        _send_all(sock, encode_chat(HELLO))
        for data in _recv_chunks(sock, time.monotonic() + min(timeout_s, HELLO_TIMEOUT_S)):
            if not data:
                event("the peer closed before its hello")
                return ExitStatus.PEER_LOST
            for payload in decoder.feed(data):
                event(f"peer said {payload.decode('utf-8', errors='replace')!r}")
                return close_cleanly(sock)
    except OSError as exc:
        event(f"connection to the peer lost: {exc}")
        return ExitStatus.PEER_LOST
    event("the peer sent no hello in time")
    return ExitStatus.PEER_LOST
