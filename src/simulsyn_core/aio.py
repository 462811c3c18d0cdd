"""The asyncio API (docs/api.md): ``await connect(...)`` returns asyncio streams.

The establish (rendezvous, punch, relay, PAKE) is the blocking one of
``simulsyn_core.connect``, run in a worker thread: cancelling the awaiting task sets a
flag the establish checks at each step, shuts every socket it made down (so that a
blocked read returns at once), waits for the thread (``CANCEL_WAIT_S`` at most) and
closes whatever is still open. A plain connection's socket becomes the streams'
transport; a sealed one is bridged through a socketpair by two threads that seal and
open the records.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ._api import RECV_CHUNK, Connection, EventCallback, SimulsynError, establish_connection
from ._internal.options import Tuning
from ._internal.session import PunchReport
from ._internal.sockets import SocketTracker, abort

__all__ = ["Streams", "connect"]

CANCEL_WAIT_S = 5.0  # after a cancel, for the worker thread to unwind, at most
# At interpreter exit, for the bridges to send what the program wrote before it closed
# its writers (the bridge threads are daemons: a silent peer cannot hold the exit), at most.
BRIDGE_EXIT_S = 10.0
_outgoing: set[threading.Thread] = set()  # the bridges' app -> peer threads still running
_outgoing_lock = threading.Lock()


def _flush_bridges() -> None:
    deadline = time.monotonic() + BRIDGE_EXIT_S
    with _outgoing_lock:
        threads = list(_outgoing)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


atexit.register(_flush_bridges)


class Streams(NamedTuple):
    """What ``connect`` returns: unpack as ``reader, writer, report = await connect(...)``."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    report: PunchReport


async def connect(broker: str | None = None, session: str | None = None, *,
                  code: str | None = None, peer: str | None = None,
                  seed_broker: str | None = None, role: str | None = None,
                  timeout: float = 30.0, strategy: str = "auto", relay: str = "auto",
                  local_port: int | None = None, secret: str | None = None,
                  plain: bool = False, tuning: Tuning | None = None,
                  natcheck: Mapping[str, Any] | None = None,
                  on_event: EventCallback | None = None,
                  on_code: Callable[[str], None] | None = None,
                  on_local_port: Callable[[int], None] | None = None,
                  on_broker_address: Callable[[str], None] | None = None) -> Streams:
    """``simulsyn_core.connect`` for asyncio, with the same arguments and exceptions;
    ``on_event`` and ``on_code`` are called in the event loop, ``on_local_port`` and
    ``on_broker_address`` in the connecting thread (before the packets they announce
    leave, as they must for a capture to see them). The writer's ``close()``
    ends our side (the END record, then a FIN); the reader sees EOF at the peer's END.
    A sealed stream the peer's side altered or cut off surfaces as ConnectionResetError
    on the reader."""
    loop = asyncio.get_running_loop()
    cancel = threading.Event()
    tracker = SocketTracker()

    def in_loop(callback: Callable[[str], None] | None) -> Callable[[str], None] | None:
        if callback is None:
            return None
        given = callback

        def call(text: str) -> None:
            loop.call_soon_threadsafe(given, text)

        return call

    work = functools.partial(establish_connection, broker, session, code=code, peer=peer,
                             seed_broker=seed_broker, role=role, timeout=timeout,
                             strategy=strategy, relay=relay, local_port=local_port,
                             secret=secret, plain=plain, tuning=tuning, natcheck=natcheck,
                             on_event=in_loop(on_event), on_code=in_loop(on_code),
                             on_local_port=on_local_port,
                             on_broker_address=on_broker_address, cancel=cancel,
                             tracker=tracker)
    done = loop.create_future()

    def run() -> None:
        try:
            conn = work()
        except BaseException as exc:  # noqa: B036  # _Cancelled too: handed to the loop
            _settle(loop, done, None, exc)
        else:
            _settle(loop, done, conn, None)

    worker = threading.Thread(target=run, name="simulsyn-connect", daemon=True)
    worker.start()
    try:
        conn: Connection = await asyncio.shield(done)
    except asyncio.CancelledError:
        cancel.set()
        tracker.wake()
        await asyncio.wait({done}, timeout=CANCEL_WAIT_S)
        if done.done() and not done.cancelled() and done.exception() is None:
            abort(done.result().socket)
        await loop.run_in_executor(None, worker.join, CANCEL_WAIT_S)
        tracker.close_all()
        raise
    try:
        if conn.encrypted:
            return await _bridged(conn)
        return await _direct(conn)
    except BaseException:
        abort(conn.socket)
        raise


def _settle(loop: asyncio.AbstractEventLoop, done: asyncio.Future[Connection],
            conn: Connection | None, exc: BaseException | None) -> None:
    def settle() -> None:
        if done.cancelled():
            if conn is not None:
                abort(conn.socket)
            return
        if exc is not None:
            done.set_exception(exc if isinstance(exc, Exception) else
                               asyncio.CancelledError())
        else:
            done.set_result(conn)  # type: ignore[arg-type]

    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
        loop.call_soon_threadsafe(settle)


async def _direct(conn: Connection) -> Streams:
    """A plain connection: its socket is the transport (bytes it read already first)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    early = conn.take_buffered()
    if early:
        reader.feed_data(early)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.create_connection(lambda: protocol, sock=conn.socket)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return Streams(reader, writer, conn.report)


async def _bridged(conn: Connection) -> Streams:
    """A sealed connection: the streams' socket is one end of a socketpair; two threads
    carry the other end's bytes through the Connection (sealing and opening)."""
    inner, outer = socket.socketpair()
    try:
        reader, writer = await asyncio.open_connection(sock=outer)
    except BaseException:
        inner.close()
        outer.close()
        raise
    _Bridge(conn, inner).start()
    return Streams(reader, writer, conn.report)


class _Bridge:
    """Peer -> app (``_inward``) and app -> peer (``_outward``); when both are over, both
    sockets are closed."""

    def __init__(self, conn: Connection, inner: socket.socket) -> None:
        self.conn, self.inner = conn, inner
        self._left = 2
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._run, args=(self._inward,), name="simulsyn-bridge-in",
                         daemon=True).start()
        outward = threading.Thread(target=self._run, args=(self._outward,),
                                   name="simulsyn-bridge-out", daemon=True)
        outward.start()
        with _outgoing_lock:  # after start(): one that already ended is joined at once
            _outgoing.add(outward)

    def _run(self, target: Callable[[], None]) -> None:
        try:
            target()
        finally:
            with _outgoing_lock:
                _outgoing.discard(threading.current_thread())
            with self._lock:
                self._left -= 1
                last = self._left == 0
            if last:
                self.conn.socket.close()
                self.inner.close()

    def _inward(self) -> None:
        try:
            while data := self.conn.recv(RECV_CHUNK):
                self.inner.sendall(data)
            self.inner.shutdown(socket.SHUT_WR)
        except (SimulsynError, OSError):
            abort(self.inner)  # the app's reader sees a reset, not a clean EOF
            with contextlib.suppress(OSError):
                self.conn.socket.shutdown(socket.SHUT_RDWR)

    def _outward(self) -> None:
        try:
            while data := self.inner.recv(RECV_CHUNK):
                self.conn.sendall(data)
            self.conn.shutdown_write()
        except (SimulsynError, OSError):
            with contextlib.suppress(OSError):
                self.conn.socket.shutdown(socket.SHUT_RDWR)
