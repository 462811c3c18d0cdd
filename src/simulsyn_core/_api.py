"""The public, blocking API (docs/api.md): ``connect`` hands back a ``Connection``; the
exceptions, one per exit reason of ``synprobe punch``; an embeddable broker.

Everything here is re-exported by ``simulsyn_core``; this module's own name is private.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from ._internal.endpoint import Endpoint
from ._internal.exitcodes import ExitStatus, ToolError
from ._internal.moving import END_LINGER_S, MovingChat
from ._internal.options import Tuning, build_config
from ._internal.session import Established, PunchReport, establish, moving_session
from ._internal.sockets import SocketTracker, abort, enable_keepalive, tracking

RECV_CHUNK = 65536
ENGINES_EXIT_S = 10.0  # at interpreter exit, the moving engines' last bytes: this long
_engines: set[threading.Thread] = set()
_engines_lock = threading.Lock()


def _run_engine(engine: MovingChat) -> None:
    try:
        engine.run()
    finally:
        with _engines_lock:
            _engines.discard(threading.current_thread())


@atexit.register
def _flush_engines() -> None:
    """A program that ends right after close() still gets its last records out."""
    end = time.monotonic() + ENGINES_EXIT_S
    with _engines_lock:
        live = list(_engines)
    for thread in live:
        thread.join(max(0.0, end - time.monotonic()))
LINGER_S = 2.0  # close(): how long to wait for the peer's end after ours, at most
EventCallback = Callable[[str], None]


class SimulsynError(Exception):
    """Why ``connect`` (or a Connection) failed. ``exit_code`` is the code ``synprobe
    punch`` exits with for the same reason; ``report`` the run's report (its ``error`` and
    ``exit_code`` set) when one was made."""

    exit_code: ExitStatus = ExitStatus.ERROR

    def __init__(self, message: str, report: PunchReport | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.report = report


class BrokerUnreachable(SimulsynError):
    """The broker refused, did not answer in time, or spoke an unexpected protocol."""

    exit_code = ExitStatus.BROKER_UNREACHABLE


class NoPeer(SimulsynError):
    """No peer came to the session (or code) within ``timeout``."""

    exit_code = ExitStatus.NO_PEER


class PunchFailed(SimulsynError):
    """The peer was known but no connection came up (nor a relayed one)."""

    exit_code = ExitStatus.PUNCH_FAILED


class AddressInUse(SimulsynError):
    """``local_port`` cannot be bound."""

    exit_code = ExitStatus.ADDRESS_IN_USE


class AuthFailed(SimulsynError):
    """The peer did not prove it holds the same code (or secret); nothing was sent."""

    exit_code = ExitStatus.AUTH_FAILED


class Tampered(SimulsynError):
    """A sealed record was altered, replayed, reordered, or the stream was cut off: the
    connection was reset."""

    exit_code = ExitStatus.TAMPERED


class PeerLost(SimulsynError):
    """The connection to the peer broke (reset, or unacknowledged data timed out)."""

    exit_code = ExitStatus.PEER_LOST


_BY_STATUS: dict[ExitStatus, type[SimulsynError]] = {
    cls.exit_code: cls for cls in (BrokerUnreachable, NoPeer, PunchFailed, AddressInUse,
                                   AuthFailed, Tampered, PeerLost)}


def error_for(exc: ToolError, report: PunchReport | None = None) -> SimulsynError:
    """The public exception for a ToolError (SimulsynError itself for a status without a
    class of its own)."""
    cls = _BY_STATUS.get(exc.status, SimulsynError)
    err = cls(exc.message, report)
    if cls is SimulsynError:
        err.exit_code = exc.status
    return err


class _Cancelled(BaseException):
    """aio.connect was cancelled: unwinds the establish (not an Exception, so that no
    handler inside takes it for a network error)."""


class Connection:
    """A connected session: ``sendall``/``recv``/``close`` carry bytes to and from the
    peer, sealed (ChaCha20-Poly1305 records) unless ``plain``.

    ``socket``: the underlying connected socket (the punched one, or the one to the
    broker's relay when ``path == "relay"``); write to it directly only when ``encrypted``
    is False. ``peer``: the peer's endpoint as seen from here (``"ip:port"``; through the
    relay, the peer's public endpoint the broker reported). ``report``: what ``synprobe
    punch --json`` prints (PunchReport).
    """

    def __init__(self, est: Established, engine: MovingChat | None = None) -> None:
        self.socket: socket.socket = est.sock
        self.report: PunchReport = est.report
        self._channel = est.channel if engine is None else None
        sealing = est.channel if engine is None else engine.relay.channel  # the PAKE's
        self._verifier = sealing.verifier if sealing is not None else None
        # A relayed session that may move (moving.py): ``socket`` is our end of a
        # socketpair, the engine's thread seals, relays and moves the bytes.
        self._engine = engine
        self._engine_thread: threading.Thread | None = None
        if engine is not None:
            self._engine_thread = threading.Thread(target=_run_engine, args=(engine,),
                                                   name="simulsyn-moving", daemon=True)
            with _engines_lock:
                _engines.add(self._engine_thread)
            self._engine_thread.start()
        self._buffer = bytearray(est.leftover if est.channel is None else b"")
        self._ended = False  # the peer's END (or EOF, plain) was read
        self._write_shut = False
        self._closed = False
        for kind, payload in est.records:
            self._take(kind, payload)
        if engine is None:  # (the engine's socketpair is no TCP socket)
            enable_keepalive(self.socket)
        self.socket.setblocking(True)

    @property
    def path(self) -> str:
        """``"direct"``, or ``"relay"``: a relayed connection whose punch failed first
        moves to ``"direct"`` when a later punch succeeds (nothing lost, repeated or
        reordered)."""
        return self.report.path or "direct"

    @property
    def peer(self) -> str:
        """The peer's endpoint (through the relay: its public endpoint, as the broker
        reported it)."""
        return self.report.peer or ""

    @property
    def encrypted(self) -> bool:
        return self._channel is not None or self._engine is not None

    @property
    def verifier(self) -> str | None:
        """A short string both sides see alike when the PAKE ran (to compare aloud)."""
        return self._verifier

    def fileno(self) -> int:
        """The socket's descriptor: for a plain connection, or a relayed one that may move
        (its socket carries the data; the engine seals it). Raises ValueError for a sealed
        one (its bytes on the socket are records, not the data)."""
        if self._channel is not None:
            raise ValueError("a sealed connection has no descriptor of its data: use "
                             "recv/sendall (or aio.connect for streams)")
        return self.socket.fileno()

    def take_buffered(self) -> bytes:
        """What was received but not read yet (for a transport that takes the socket
        over)."""
        out = bytes(self._buffer)
        self._buffer.clear()
        return out

    def settimeout(self, timeout_s: float | None) -> None:
        """A bound on each later ``recv``/``sendall`` (``TimeoutError`` when it passes)."""
        self.socket.settimeout(timeout_s)

    def _take(self, kind: int, payload: bytes) -> None:
        from ._internal.secure import DATA, END

        if kind == DATA:
            self._buffer += payload
        elif kind == END:
            self._ended = True

    def sendall(self, data: bytes) -> None:
        """Send all of ``data``. Raises PeerLost when the connection broke."""
        from ._internal.secure import DATA, RECORD_MAX

        if self._write_shut:
            raise ValueError("sendall after shutdown_write/close")
        view = memoryview(data)
        try:
            if self._channel is None:
                self.socket.sendall(view)
                return
            for start in range(0, len(view), RECORD_MAX):
                self.socket.sendall(self._channel.seal(DATA, bytes(view[start:start
                                                                        + RECORD_MAX])))
        except TimeoutError:
            raise
        except OSError as exc:
            raise self._lost(exc) from None

    def _lost(self, exc: OSError) -> SimulsynError:
        """What a broken socket means: the engine's reason when it broke it, or the
        peer's, when it sent an ALERT before its reset."""
        from ._internal.secure import Tampered as _SealTampered
        from ._internal.sockets import queued_before_reset

        if self._channel is not None:
            try:
                for data in queued_before_reset(self.socket):
                    for kind, payload in self._channel.feed(data):
                        self._take(kind, payload)
            except _SealTampered as seal_exc:
                return Tampered(f"connection closed: {seal_exc.describe()}", self.report)
        engine = self._engine
        if engine is not None and self._engine_thread is not None:
            self._engine_thread.join(LINGER_S)  # its reason is set before the reset
            if engine.status == ExitStatus.TAMPERED:
                return Tampered(engine.failure, self.report)
            if engine.failure:
                return PeerLost(engine.failure, self.report)
        return PeerLost(f"connection to the peer lost: {exc}", self.report)

    def recv(self, bufsize: int = RECV_CHUNK) -> bytes:
        """Up to ``bufsize`` bytes from the peer; ``b""`` once the peer has finished
        sending. Raises Tampered (a sealed stream altered or cut off: the connection is
        reset), PeerLost."""
        from ._internal.secure import Tampered as _SealTampered

        while not self._buffer and not self._ended:
            try:
                data = self.socket.recv(RECV_CHUNK)
            except TimeoutError:
                raise
            except OSError as exc:
                raise self._lost(exc) from None
            if self._channel is None:
                if not data and self._engine is not None and self._engine.status is not None:
                    # The engine closed our socketpair on a failure (a Unix socket has no
                    # reset to tell it by): its reason, not an end of stream.
                    raise self._lost(ConnectionResetError("the engine failed"))
                if not data:
                    self._ended = True
                self._buffer += data
                continue
            try:
                if not data:
                    self._channel.check_end()
                for kind, payload in self._channel.feed(data):
                    self._take(kind, payload)
            except _SealTampered as exc:
                from ._internal.secure import tell_peer

                tell_peer(self.socket, self._channel, exc)
                abort(self.socket)
                self._closed = self._write_shut = True
                raise Tampered(f"connection closed: {exc.describe()}", self.report) from None
        out = bytes(self._buffer[:bufsize])
        del self._buffer[:bufsize]
        return out

    def shutdown_write(self) -> None:
        """We send nothing more: the END record (sealed), then a FIN. ``recv`` goes on."""
        from ._internal.secure import END

        if self._write_shut:
            return
        self._write_shut = True
        with contextlib.suppress(OSError):
            if self._channel is not None:
                self.socket.sendall(self._channel.seal(END))
            self.socket.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """End our side (``shutdown_write``), wait (``LINGER_S`` at most) for the peer to
        end its side, reading away what it still sends, then close the socket: a peer
        that reads everything sees a clean end, never a reset."""
        if self._closed:
            return
        self.shutdown_write()
        self._closed = True
        with contextlib.suppress(OSError):
            end = time.monotonic() + LINGER_S
            while (left := end - time.monotonic()) > 0:
                self.socket.settimeout(left)
                if not self.socket.recv(RECV_CHUNK):
                    break
        self.socket.close()
        if self._engine_thread is not None:  # its last records and FINs, bounded
            self._engine_thread.join(LINGER_S + END_LINGER_S)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None and not self._closed:  # an error: no clean end to wait for
            self._closed = True
            if self._engine is not None and self._engine_thread is not None:
                self._engine.abandon()  # it resets the connections (not an END)
                self._engine_thread.join(LINGER_S)
            abort(self.socket)
            return
        self.close()

    def __repr__(self) -> str:
        return (f"<Connection {self.path} to {self.peer} "
                f"{'sealed' if self.encrypted else 'plain'}>")


def establish_connection(broker: str | None = None, session: str | None = None, *,
                         code: str | None = None, peer: str | None = None,
                         seed_broker: str | None = None, role: str | None = None,
                         timeout: float = 30.0, strategy: str = "auto", relay: str = "auto",
                         local_port: int | None = None, secret: str | None = None,
                         plain: bool = False, tuning: Tuning | None = None,
                         natcheck: Mapping[str, Any] | None = None,
                         on_event: EventCallback | None = None,
                         on_code: Callable[[str], None] | None = None,
                         on_local_port: Callable[[int], None] | None = None,
                         on_broker_address: Callable[[str], None] | None = None,
                         cancel: threading.Event | None = None,
                         tracker: SocketTracker | None = None) -> Connection:
    """``connect``, with what aio.connect needs: a ``cancel`` flag (the establish unwinds
    at its next step once set) and a ``tracker`` of every socket it makes."""
    cfg = build_config(broker=broker, session=session, code=code, peer=peer,
                       seed_broker=seed_broker, role=role, local_port=local_port,
                       timeout=timeout, strategy=strategy, relay=relay, secret=secret,
                       plain=plain, tuning=tuning, natcheck=natcheck,
                       new_code=on_code is not None)
    report = PunchReport(mode=cfg.mode, session=cfg.session)

    def event(text: str) -> None:
        if cancel is not None and cancel.is_set():
            raise _Cancelled
        if on_event is not None:
            on_event(text)

    def told(number: str) -> None:
        from ._internal.codes import make_code

        if on_code is not None:
            on_code(make_code(number, cfg.words or ""))

    def broker_address(address: Endpoint) -> None:
        if on_broker_address is not None:
            on_broker_address(str(address))

    try:
        with tracking(tracker or SocketTracker()):
            est = establish(cfg, report, event, on_local_port=on_local_port,
                            on_broker_address=broker_address,
                            on_nameplate=told if cfg.nameplate == "new" else None)
    except ToolError as exc:
        report.error, report.exit_code = exc.message, int(exc.status)
        raise error_for(exc, report) from None
    try:
        if est.report.path == "relay" and est.channel is not None and est.upgrade:
            # The punch goes on; the session moves to a direct connection when one comes.
            ours, theirs = socket.socketpair()
            try:
                engine = moving_session(cfg, est, on_event or (lambda text: None),
                                        app=theirs)
            except BaseException:
                ours.close()
                theirs.close()
                raise
            return Connection(Established(ours, est.report, est.deadline), engine)
        return Connection(est)
    except BaseException:
        est.sock.close()
        raise


def connect(broker: str | None = None, session: str | None = None, *,
            code: str | None = None, peer: str | None = None, seed_broker: str | None = None,
            role: str | None = None, timeout: float = 30.0, strategy: str = "auto",
            relay: str = "auto", local_port: int | None = None, secret: str | None = None,
            plain: bool = False, tuning: Tuning | None = None,
            natcheck: Mapping[str, Any] | None = None, on_event: EventCallback | None = None,
            on_code: Callable[[str], None] | None = None,
            on_local_port: Callable[[int], None] | None = None,
            on_broker_address: Callable[[str], None] | None = None) -> Connection:
    """Meet the peer at ``broker`` (``"ip:port"``) and connect to it: punched directly,
    else through the broker's relay (``relay``). Blocks until connected, at most
    ``timeout`` seconds (the relay may take a few more to join).

    The peer: ``session=NAME`` (both use the same name; add ``secret=`` to authenticate),
    ``code="7-word-word"`` (the code the other side was told), or neither with ``on_code``:
    the broker hands out a new code, given to ``on_code`` to pass on to the peer.
    Without a synprobe broker: ``peer="ip:port"`` (its public endpoint, learnt your own
    way; needs ``local_port``, the port the peer aims at; ``secret=`` to authenticate) or
    ``seed_broker=`` (the original example's list broker); ``role="first"|"second"``
    orders the two SYNs there.

    ``tuning``: the punch's knobs (Tuning); ``natcheck``: a ``synprobe nat-check --json``
    result of this network, told to the broker. ``on_local_port(port)`` before the first
    packet, ``on_broker_address("ip:port")`` before each other broker address is reached
    (to start a capture there, as ``synprobe punch --pcap`` does).

    Returns a Connection that is up and, unless ``plain``, authenticated and encrypted.
    Raises BrokerUnreachable, NoPeer, PunchFailed, AddressInUse, AuthFailed, Tampered
    (all SimulsynError); ValueError for bad arguments. ``on_event`` gets each step as a
    line of text (what ``synprobe punch -v`` prints)."""
    return establish_connection(broker, session, code=code, peer=peer,
                                seed_broker=seed_broker, role=role, timeout=timeout,
                                strategy=strategy, relay=relay, local_port=local_port,
                                secret=secret, plain=plain, tuning=tuning, natcheck=natcheck,
                                on_event=on_event, on_code=on_code,
                                on_local_port=on_local_port,
                                on_broker_address=on_broker_address)


def _endpoints(binds: Sequence[str]) -> list[object]:
    from ._internal.endpoint import Endpoint

    if not binds:
        raise ValueError("give at least one address to listen on (\"ip:port\")")
    return [Endpoint.parse(b, allow_zero_port=True) for b in binds]


class Broker:
    """A broker to embed in an asyncio program::

        async with Broker(["127.0.0.1:0"], relay=True) as broker:
            print(broker.addresses)   # ["127.0.0.1:40123"]
            await stop.wait()

    ``relay``: relay pairs whose punch fails (``synprobe broker --relay``, default
    limits). ``log``: each log line (default: none)."""

    def __init__(self, binds: Sequence[str], *, relay: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        from ._internal.broker import Broker as _Broker
        from ._internal.relay import RelayLimits, RelayTable

        self._broker = _Broker(_endpoints(binds),  # type: ignore[arg-type]
                               log=log or (lambda line: None),
                               relay=RelayTable(RelayLimits()) if relay else None)
        self._stop = asyncio.Event()
        self._expiry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen (raises OSError when an address cannot be bound)."""
        loop = asyncio.get_running_loop()
        handler = loop.get_exception_handler()
        await self._broker.start()
        loop.set_exception_handler(handler)  # the embedding program's, not the broker's
        self._expiry = asyncio.ensure_future(self._broker.serve_forever(self._stop))

    @property
    def addresses(self) -> list[str]:
        """Where it listens, ``"ip:port"`` (the port the kernel chose for port 0)."""
        return [str(ep) for ep in self._broker.listening]

    async def close(self) -> None:
        """Stop listening and close every connection (relayed sessions are reset)."""
        self._stop.set()
        if self._expiry is not None:
            await self._expiry
            self._expiry = None
        await self._broker.close()

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def serve_broker(binds: Sequence[str], *, relay: bool = False,
                 log: Callable[[str], None] | None = None) -> int:
    """Run a broker in this thread until SIGINT (returns 130) or SIGTERM (returns 0), as
    ``synprobe broker`` does. ``log``: each log line (default: stderr). Raises OSError
    when an address cannot be bound."""
    from ._internal.broker import run_broker, stderr_log
    from ._internal.relay import RelayLimits

    return run_broker(_endpoints(binds), log=log or stderr_log,  # type: ignore[arg-type]
                      relay=RelayLimits() if relay else None)
