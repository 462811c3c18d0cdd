"""One run of the punch: learn the peer, punch, report, then chat (or exchange a hello)."""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TextIO

from . import birthday as bday
from .chat import (
    SealedCodec,
    chat,
    close_cleanly,
    confirm_path,
    hello_exchange,
    secure_records,
)
from .client import (
    STRATEGY_RELAY,
    Control,
    NatFacts,
    Rendezvous,
    relay_connect,
    relay_status,
    rendezvous,
    seed_rendezvous,
)
from .endpoint import Endpoint
from .exitcodes import ExitStatus, ToolError
from .moving import MovingChat, Upgrade, Upgrades
from .prime import (
    DEFAULT_TTL,
    FULL_TTL,
    ICMP_TIME_EXCEEDED,
    NO_ANSWER,
    PRIME_MINHOPS_V6,
    TCP_CLOSE,
    TCP_SYN_SENT,
    choose_ttl,
    clear_minttl,
    measure_hops,
    prime,
)
from .punch import (
    ATTEMPT_TIMEOUT_S,
    CONFIRM_TIMEOUT_S,
    DEFAULT_RETRIES,
    PUNCH_TIMEOUT_S,
    RETRY_INTERVAL_S,
    Attempt,
    PunchResult,
    PunchSchedule,
    punch,
)
from .rendezvous import STRATEGY_BIRTHDAY, STRATEGY_ORDER, STRATEGY_PRIME, STRATEGY_SYNC
from .secure import CIPHER, DATA, END, PAKE, AuthFailed, Channel, Tampered
from .sockets import abort, bound_socket
from .spray import Pool, raise_nofile

AUTH_TIMEOUT_S = 10.0  # the PAKE and the key confirmation, at most
PRIME_EXCHANGE_S = 5.0  # the ordering exchange at the broker, at most (then: plain)
CONTROL_CLOSE_S = 1.0  # for the broker to close the kept connection first
# Without a synprobe broker (--peer, --seed-broker), --first connects this long after the
# peer is known: the --second side, started first, has opened its hole by then.
FIRST_WAIT_S = 0.5
# Birthday punching: after the last SYN of the side that sends after GO, its guesses get
# this long to be answered (the kernel's own retransmission of each, 1 s later, included).
BIRTHDAY_LINGER_S = 1.2
# TTL-limited sockets first (the easy NAT may answer a full SYN): the random side's sockets
# keep their limited TTL until the guesses are all out, so that the kernel's own SYN
# retransmission (1 s after each SYN) cannot reach the easy NAT before the guess that
# opens its hole and be answered with an RST that ends the socket. A guess that met a
# socket meanwhile got a SYN+ACK that died on the way; the socket resends it 1 s later, in
# full by then (a socket the guess reached is given its full TTL at once; its SYN+ACK is
# resent on the SYN's own timer, 1 s then 3 s after the SYN): the pair connects up to this
# much later.
BIRTHDAY_HOLD_S = 2.2
BIRTHDAY_OPEN_UP_MAX_S = 0.95  # open up at most this long after GO (before the first resend)
# With a relay (the broker's PEER relay=): the punch gets this long, then the chat goes
# through the relay while the punch goes on in the background (upgrade rounds).
RELAY_AFTER_S = 6.0
RELAY_JOIN_MIN_S = 8.0  # to join the relay, at least (the peer's punch fails about then)
# The background rounds: the pause before each (the first punch just failed), and each
# round's bound (the peer's registration for it included).
UPGRADE_PAUSES_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 30.0, 30.0)
UPGRADE_ROUND_S = 20.0
RELAY_MODES = ("auto", "never", "only")
# What each --strategy offers the broker (REGISTER strategies=); auto offers all, and the
# broker chooses from what it knows of both NATs (rendezvous.plan_pair).
_ALL = (STRATEGY_PRIME, STRATEGY_ORDER, STRATEGY_SYNC, STRATEGY_BIRTHDAY)
OFFERS = {"auto": _ALL, "plain": (), **{name: (name,) for name in _ALL}}


@dataclass(frozen=True)
class PunchConfig:
    local_port: int = 0  # 0: allocate one, then reuse it for every socket
    broker: Endpoint | None = None
    session: str | None = None
    seed_broker: Endpoint | None = None
    peer: Endpoint | None = None
    retries: int = DEFAULT_RETRIES
    timeout_s: float = PUNCH_TIMEOUT_S
    retry_interval_s: float = RETRY_INTERVAL_S
    attempt_timeout_s: float = ATTEMPT_TIMEOUT_S
    strategy: str = "auto"  # one of STRATEGIES
    ttl: int | None = None  # the priming TTL; None: nat-check's, else measured
    role: str | None = None  # without a synprobe broker: "first" or "second" (order)
    facts: NatFacts | None = None  # what the last nat-check found (synprobe passes it)
    birthday_sockets: int = bday.DEFAULT_SOCKETS  # N, when our NAT randomises ports
    birthday_guesses: int = bday.DEFAULT_GUESSES  # M, when the peer's does
    birthday_rate: float = bday.DEFAULT_RATE  # new SYNs per second, at most
    birthday_seed: int | None = None  # the guesses' random order (tests); None: fresh
    nameplate: str | None = None  # a code's number ("new": the broker hands one out)
    words: str | None = None  # a code's words (with the number: the PAKE's password)
    secret: str | None = None  # --secret: the PAKE's password with --session or --peer
    plain: bool = False  # --plain: the original's framing, no PAKE, no encryption
    relay: str = "auto"  # one of RELAY_MODES: the broker's relay when the punch fails

    @property
    def mode(self) -> str:
        if self.broker is not None:
            return "broker"
        if self.seed_broker is not None:
            return "seed-broker"
        return "direct"


@dataclass
class PunchReport:
    """The --json object (documented in the README)."""

    established: bool = False
    mode: str = "broker"
    session: str | None = None
    local: str | None = None
    public: str | None = None
    peer: str | None = None
    peer_local: str | None = None
    role: str | None = None
    attempts: int = 0
    elapsed_s: float | None = None
    error: str | None = None
    exit_code: int = 0
    peer_known_at: float | None = None  # Unix time the peer's endpoint became known
    established_at: float | None = None  # Unix time the connection came up
    attempt_log: list[dict[str, Any]] = field(default_factory=list)
    strategy: str | None = None  # what ran: "plain", "sync", "order" or "prime"
    strategy_reason: str | None = None  # why (the broker's reason, or the options')
    ttl: int | None = None  # prime: the TTL of the priming SYN
    ttl_source: str | None = None  # prime: "--ttl", "nat-check", "measured" or "default"
    phases: list[dict[str, Any]] = field(default_factory=list)  # steps and their times
    birthday: dict[str, Any] | None = None  # strategy birthday: N, M, range, chance, winner
    nameplate: str | None = None  # the code's number (never its words)
    security: dict[str, Any] | None = None  # mode, encrypted, authenticated, verifier...
    path: str | None = None  # "direct" or "relay": where the chat ran (ended) once connected
    upgraded_after_s: float | None = None  # relay -> direct: seconds after the relay came up

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_port(local_port: int) -> int:
    """The run's local port: ``local_port`` if it can be bound, else one the kernel picks
    when it is 0. Raises ToolError(ADDRESS_IN_USE)."""
    try:
        sock = bound_socket(local_port)
    except OSError as exc:
        raise ToolError(ExitStatus.ADDRESS_IN_USE,
                        f"cannot bind local port {local_port}: {exc.strerror}") from None
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.close()


def run_punch(cfg: PunchConfig, *, event: Callable[[str], None],
              on_report: Callable[[PunchReport], None], chat_mode: str = "chat",
              stdin_fd: int = 0, out: TextIO = sys.stdout,
              on_local_port: Callable[[int], None] | None = None,
              on_broker_address: Callable[[Endpoint], None] | None = None,
              on_nameplate: Callable[[str], None] | None = None) -> ExitStatus:
    """Carry out one punch. ``on_report`` is called once, when connected or given up.

    ``on_broker_address`` with each other broker address the run connects to (the
    mapping check's), before it does.
    ``on_local_port`` is called with the local port before the first packet is sent
    (synprobe starts its capture there). ``on_nameplate`` with the code's number the
    broker handed out (``cfg.nameplate == "new"``).
    """
    report = PunchReport(mode=cfg.mode, session=cfg.session)
    reported: list[PunchReport] = []

    def report_once(r: PunchReport) -> None:
        if not reported:
            reported.append(r)
            on_report(r)

    try:
        return _run_punch(cfg, report, event, report_once, chat_mode, stdin_fd, out,
                          on_local_port, on_broker_address, on_nameplate)
    except ToolError as exc:
        report.error, report.exit_code = exc.message, int(exc.status)
        report_once(report)
        raise
    except KeyboardInterrupt:
        report.error, report.exit_code = "interrupted", int(ExitStatus.INTERRUPTED)
        report_once(report)
        raise


def _run_punch(cfg: PunchConfig, report: PunchReport, event: Callable[[str], None],
               on_report: Callable[[PunchReport], None], chat_mode: str, stdin_fd: int,
               out: TextIO, on_local_port: Callable[[int], None] | None,
               on_broker_address: Callable[[Endpoint], None] | None = None,
               on_nameplate: Callable[[str], None] | None = None) -> ExitStatus:
    est = establish(cfg, report, event, on_local_port, on_broker_address, on_nameplate)
    if est.report.path == "relay":
        return _relayed(cfg, est, event, on_report, chat_mode, stdin_fd, out)
    on_report(report)
    deadline = est.deadline
    with est.sock as sock:
        codec = SealedCodec(est.channel) if est.channel is not None else None
        if chat_mode == "hello":
            if codec is not None:  # authenticated: the PAKE was the hello
                with contextlib.suppress(OSError):
                    sock.sendall(codec.end())
                return close_cleanly(sock)
            if est.confirmed:  # the HELLO/ACK exchange was the hello
                return close_cleanly(sock)
            return hello_exchange(sock, max(1.0, deadline - time.monotonic()), event)
        initial = b"" if codec is not None else est.leftover
        return chat(sock, stdin_fd, out, event, initial=initial, codec=codec,
                    early=est.early)


@dataclass
class Established:
    """A connected (and, unless plain, authenticated) session before anything of the
    user's was sent: what ``establish`` hands to the chat, or to the library's
    Connection."""

    sock: socket.socket  # the punched connection, or the connection to the broker's relay
    report: PunchReport  # established, path "direct" or "relay"
    deadline: float  # the run's (--timeout)
    channel: Channel | None = None  # the PAKE's sealing state; None: plain
    records: list[tuple[int, bytes]] = field(default_factory=list)  # came with CONFIRM
    leftover: bytes = b""  # plain: bytes that came after the path check (or RELAYED)
    confirmed: bool = False  # direct: the HELLO/ACK path check ran
    rdv: Rendezvous | None = None
    port: int = 0
    token: str | None = None  # relay: the pair's relay token
    upgrade: bool = False  # relay: the punch failed; the CLI punches on in the background
    relayed_at: float | None = None

    @property
    def early(self) -> list[bytes]:
        """The DATA payloads that came with the peer's confirmation."""
        return [p for kind, p in self.records if kind == DATA]


def establish(cfg: PunchConfig, report: PunchReport, event: Callable[[str], None],
              on_local_port: Callable[[int], None] | None = None,
              on_broker_address: Callable[[Endpoint], None] | None = None,
              on_nameplate: Callable[[str], None] | None = None) -> Established:
    """Rendezvous, strategy, punch, relay fallback and PAKE: everything before the chat.
    Raises ToolError; never returns a connection that is not up (and protected)."""
    deadline = time.monotonic() + cfg.timeout_s
    if protection(cfg, "0")[1] is not None:
        # The PAKE's and the cipher's modules (about 50 ms) now, not between connected and
        # the first chat line; and never in the middle of a timed punch.
        import cryptography.hazmat.primitives.ciphers.aead  # noqa: F401
        import spake2  # noqa: F401
    port = check_port(cfg.local_port)
    event(f"local port {port} (bound with SO_REUSEADDR for every socket of this run)")
    if on_local_port is not None:
        on_local_port(port)
    rdv = _learn_peer(cfg, port, deadline, event, on_broker_address, on_nameplate)
    report.nameplate = rdv.nameplate
    report.public = str(rdv.public) if rdv.public else None
    report.peer = str(rdv.peer)
    report.peer_local = str(rdv.peer_local) if rdv.peer_local else None
    report.role = rdv.role
    report.peer_known_at = rdv.known_wall
    event(f"peer {rdv.peer}" + (f" (its local endpoint {rdv.peer_local})" if rdv.peer_local
                                else "") + (f"; our role: {rdv.role}" if rdv.role else ""))
    token = rdv.relay if cfg.relay != "never" else None
    if cfg.relay == "only" and token is None:
        if rdv.control is not None:
            rdv.control.sock.close()
        raise ToolError(ExitStatus.PUNCH_FAILED, "--relay only: the broker offers no relay "
                        "(it runs without --relay, or is an older synprobe broker)")
    if token is not None and (rdv.strategy == STRATEGY_RELAY or cfg.relay == "only"):
        if rdv.control is not None:
            rdv.control.sock.close()
        report.strategy = STRATEGY_RELAY
        report.strategy_reason = rdv.why if rdv.strategy == STRATEGY_RELAY else "--relay only"
        event(f"relay: {report.strategy_reason}")
        return _join_relay(cfg, rdv, token, port, deadline, event, report, upgrade=False)
    direct_deadline = deadline if token is None else min(deadline,
                                                         time.monotonic() + RELAY_AFTER_S)
    result = _punch_direct(cfg, rdv, port, direct_deadline, event, report)
    report.attempts = len(result.attempts)
    report.attempt_log = [
        {"n": a.number, "t_s": round(a.started_s, 6), "duration_s": round(a.duration_s, 6),
         "outcome": a.outcome} for a in result.attempts]
    if result.sock is None and token is not None:
        event(f"punch to {rdv.peer} failed ({result.error}); the chat goes through the "
              "broker's relay, and the punch goes on in the background")
        return _join_relay(cfg, rdv, token, port, deadline, event, report, upgrade=True)
    if result.sock is None:
        raise ToolError(ExitStatus.PUNCH_FAILED, f"punch to {rdv.peer} failed: {result.error}")
    report.path = "direct"
    assert result.established_at is not None
    report.established = True
    report.local = str(result.local)
    if rdv.birthday is not None and result.peer is not None:
        report.peer = str(result.peer)  # the guess that won
    report.elapsed_s = round(result.established_at - rdv.known_at, 6)
    report.established_at = rdv.known_wall + (result.established_at - rdv.known_at)
    event(f"connected: {result.local} <-> {result.peer or rdv.peer} after {report.attempts} "
          f"attempt(s), {report.elapsed_s * 1000:.1f} ms after the peer was known")
    try:
        channel, records = _protect(cfg, rdv, result.sock, result.leftover, event, report)
    except BaseException:
        result.sock.close()
        raise
    return Established(result.sock, report, deadline, channel, records, result.leftover,
                       result.confirmed, rdv, port)


def _punch_direct(cfg: PunchConfig, rdv: Rendezvous, port: int, deadline: float,
                  event: Callable[[str], None], report: PunchReport) -> PunchResult:
    """The punch for the strategy the broker chose (or the options'), until ``deadline``."""
    schedule = PunchSchedule(cfg.retries, cfg.retry_interval_s, cfg.attempt_timeout_s)
    # Both sides of a broker session are synprobe: prove the path before calling it up.
    # The original's peers (seed-broker, direct) would not answer the check.
    confirm = confirm_path if cfg.mode == "broker" else None
    if rdv.birthday is not None and rdv.control is not None:
        result = _birthday(cfg, rdv, rdv.control, port, deadline, event, report)
    else:
        pending = _choose(cfg, rdv, port, deadline, event, report)
        result = punch(port, rdv.peer, schedule, deadline, rdv.known_at, event, confirm,
                       pending)
    if result.sock is not None:
        clear_minttl(result.sock)
    return result


def _join_relay(cfg: PunchConfig, rdv: Rendezvous, token: str, port: int, deadline: float,
                event: Callable[[str], None], report: PunchReport, upgrade: bool
                ) -> Established:
    """Join the broker's relay (docs/protocol.md, "Relay") and protect the session."""
    assert cfg.broker is not None
    # With brokers sharing sessions (--redis), the relay is the deciding broker's (relay_at=).
    relay_ep = rdv.relay_at or cfg.broker
    sock, leftover = relay_connect(relay_ep, token, max(deadline, time.monotonic()
                                                          + RELAY_JOIN_MIN_S))
    relayed_at = time.monotonic()
    _phase(report, rdv.known_at, "relay")
    report.established = True
    report.path = "relay"
    report.local = str(Endpoint.from_sockaddr(sock.getsockname()))
    report.elapsed_s = round(relayed_at - rdv.known_at, 6)
    report.established_at = rdv.known_wall + (relayed_at - rdv.known_at)
    event(f"relayed: connected to the peer through the broker's relay {relay_ep}, "
          f"{report.elapsed_s * 1000:.1f} ms after the peer was known")

    try:
        mode, password = protection(cfg, rdv.nameplate)
        channel, records = _protect(cfg, rdv, sock, leftover, event, report)
    except BaseException:
        sock.close()
        raise
    if password is None:
        event("the relay reads and could change this chat (not encrypted); no move to a "
              "direct connection without encryption")
    elif mode == "session-name":
        event("the relay forwards sealed records, but the broker knows the session name, "
              "the only secret here: it could open them (use a code or --secret)")
    else:
        event("the relay sees only sealed records: without the code or secret it cannot "
              "read or change the chat")
    return Established(sock, report, deadline, channel, records, leftover, False, rdv, port,
                       token, upgrade, relayed_at)


def _relayed(cfg: PunchConfig, est: Established, event: Callable[[str], None],
             on_report: Callable[[PunchReport], None], chat_mode: str, stdin_fd: int,
             out: TextIO) -> ExitStatus:
    """The chat through the broker's relay; when the punch failed first (``upgrade``), the
    punch goes on in the background and the chat moves onto the first direct connection
    that comes up (moving.py)."""
    assert cfg.broker is not None and est.token is not None and est.rdv is not None
    sock, token, report, channel = est.sock, est.token, est.report, est.channel
    if channel is None:
        on_report(report)
        with sock:
            if chat_mode == "hello":
                return hello_exchange(sock, max(1.0, est.deadline - time.monotonic()), event)
            status = chat(sock, stdin_fd, out, event, initial=est.leftover)
            if status == ExitStatus.PEER_LOST:  # why: the broker's RELAY_STATUS
                event(relay_status(est.rdv.relay_at or cfg.broker, token))
            return status
    if chat_mode == "hello":
        on_report(report)
        with sock:
            with contextlib.suppress(OSError):
                sock.sendall(channel.seal(END))
            return close_cleanly(sock)
    engine = moving_session(cfg, est, event, stdin_fd=stdin_fd, out=out)
    # With a move possible, the JSON says where the chat ended: it comes at the end.
    if engine.upgrades is None:
        on_report(report)
    try:
        return engine.run()
    finally:
        on_report(report)


def moving_session(cfg: PunchConfig, est: Established, event: Callable[[str], None],
                   stdin_fd: int = 0, out: TextIO | None = None,
                   app: socket.socket | None = None) -> MovingChat:
    """The loop of a relayed, sealed session (moving.py): the chat's (stdin, ``out``) or
    the library's (``app``, a byte stream). When the punch failed first (``est.upgrade``)
    it goes on in the background, and the session moves onto the first direct connection
    that comes up (the report then says path "direct", upgraded_after_s)."""
    assert cfg.broker is not None and est.token is not None and est.rdv is not None
    assert est.relayed_at is not None and est.channel is not None
    token, report, rdv, relayed_at = est.token, est.report, est.rdv, est.relayed_at
    relay_ep = rdv.relay_at or cfg.broker  # --redis: the deciding broker's relay

    def broke() -> str:
        return relay_status(relay_ep, token)

    _, password = protection(cfg, rdv.nameplate)
    assert password is not None
    upgrades = None
    if est.upgrade:
        upgrades = Upgrades()
        threading.Thread(target=_upgrade_rounds, name="upgrade", daemon=True,
                         args=(cfg, token, est.port, password, upgrades, event)).start()

    def moved(at: float, upgrade: Upgrade) -> None:
        with contextlib.suppress(OSError):
            report.local = str(Endpoint.from_sockaddr(upgrade.sock.getsockname()))
            report.peer = str(Endpoint.from_sockaddr(upgrade.sock.getpeername()))
        report.path = "direct"
        report.upgraded_after_s = round(at - relayed_at, 6)
        _phase(report, rdv.known_at, "upgraded")

    return MovingChat(est.sock, est.channel, est.records, stdin_fd, out, event, upgrades,
                      broke, moved, app=app)


def _upgrade_rounds(cfg: PunchConfig, token: str, port: int, password: bytes,
                    upgrades: Upgrades, event: Callable[[str], None]) -> None:
    """In the background of a relayed chat: punch again, round after round, each a new
    pairing at the broker (session ``<sha256(token)[:32]>.<round>``: only the two peers
    know the token),
    with the strategy it chooses; hand the first direct connection that passes the path
    check and the PAKE to the chat."""
    assert cfg.broker is not None
    # Named after the token, not by it: the rounds' names show in -v output and logs.
    base = hashlib.sha256(token.encode()).hexdigest()[:32]
    for number, pause in enumerate(UPGRADE_PAUSES_S, 1):
        if upgrades.stop.wait(pause):
            return

        def said(text: str, n: int = number) -> None:
            if not upgrades.stop.is_set():
                event(f"upgrade {n}: {text}")

        sub = replace(cfg, session=f"{base}.{number}", nameplate=None, relay="never")
        scratch = PunchReport()
        deadline = time.monotonic() + UPGRADE_ROUND_S
        result: PunchResult | None = None
        try:
            rdv = _learn_peer(sub, port, deadline, said)
            result = _punch_direct(sub, rdv, port, deadline, said, scratch)
            if result.sock is None:
                said(f"no direct connection ({result.error})")
                continue
            channel, records = secure_records(result.sock, password, result.leftover,
                                              AUTH_TIMEOUT_S)
        except ToolError as exc:
            said(exc.message)
            continue
        except (AuthFailed, Tampered, OSError) as exc:
            said(f"the direct connection failed its authentication: {exc}")
            if result is not None and result.sock is not None:
                abort(result.sock)
            continue
        what = f"{result.local} <-> {result.peer or rdv.peer}"
        said(f"direct connection {what} up and authenticated")
        if not upgrades.offer(Upgrade(result.sock, channel, records, what)):
            abort(result.sock)
        return
    event("upgrade: no direct connection after "
          f"{len(UPGRADE_PAUSES_S)} rounds; the chat stays on the relay")


def protection(cfg: PunchConfig, nameplate: str | None) -> tuple[str, bytes | None]:
    """How the session is protected: ``(mode, the PAKE's password)``.

    code: the code's number and words (the broker saw only the number); secret: --secret
    with the session name (or with --peer); session-name: only the name, which the broker,
    anyone on the path to it and anyone who guesses it know: encrypted, not authenticated
    (a passive eavesdropper on the punched path reads nothing; whoever knows the name can
    be the peer); plain:
    --plain, or a peer of the original (--seed-broker, --peer without --secret)."""
    if cfg.plain:
        return "plain", None
    if cfg.words is not None and nameplate is not None:
        return "code", f"{nameplate}-{cfg.words}".encode()
    if cfg.secret is not None:
        return "secret", f"session {cfg.session or '-'}\n{cfg.secret}".encode()
    if cfg.mode == "broker" and cfg.session is not None:
        return "session-name", f"session {cfg.session}".encode()
    return "plain", None


def _protect(cfg: PunchConfig, rdv: Rendezvous, sock: socket.socket, leftover: bytes,
             event: Callable[[str], None], report: PunchReport
             ) -> tuple[Channel | None, list[tuple[int, bytes]]]:
    """The PAKE over the connection, when the session is protected: the channel and the
    records that came with the peer's confirmation. Raises ToolError(AUTH_FAILED or
    TAMPERED): then nothing of stdin was sent, and the connection is reset."""
    mode, password = protection(cfg, rdv.nameplate)
    info: dict[str, Any] = {"mode": mode, "encrypted": False, "authenticated": False,
                            "pake": None, "cipher": None, "verifier": None}
    report.security = info
    if password is None:
        why = "--plain" if cfg.plain else "the original's peers speak only plain framing"
        event(f"the chat is NOT encrypted ({why}): anyone on the path can read and change it")
        return None, []
    return _secure(cfg, rdv, sock, leftover, event, report)


def _secure(cfg: PunchConfig, rdv: Rendezvous, sock: socket.socket, leftover: bytes,
            event: Callable[[str], None], report: PunchReport
            ) -> tuple[Channel, list[tuple[int, bytes]]]:
    """The PAKE of a protected session (``protection`` gives a password): the channel and
    the records that came with the peer's confirmation. Raises ToolError(AUTH_FAILED or
    TAMPERED)."""
    mode, password = protection(cfg, rdv.nameplate)
    assert password is not None
    info: dict[str, Any] = {"mode": mode, "encrypted": False, "authenticated": False,
                            "pake": PAKE, "cipher": None, "verifier": None}
    report.security = info
    try:
        channel, records = secure_records(sock, password, leftover, AUTH_TIMEOUT_S)
    except Tampered as exc:  # a record behind the peer's confirmation (which passed)
        abort(sock)
        info.update(encrypted=True, authenticated=mode != "session-name", cipher=CIPHER)
        raise ToolError(ExitStatus.TAMPERED, f"connection closed: {exc.describe()}") from None
    except AuthFailed as exc:
        abort(sock)
        raise ToolError(ExitStatus.AUTH_FAILED, f"authentication failed: {exc}; nothing "
                        "was sent" + ("; start again with a new code" if mode == "code"
                                      else "")) from None
    info.update(encrypted=True, authenticated=mode != "session-name", cipher=CIPHER,
                verifier=channel.verifier)
    if mode == "session-name":
        event(f"encrypted ({CIPHER}) but NOT authenticated: anyone who knows the session "
              "name can pair with us; use a code (no --session) or --secret")
    else:
        event(f"authenticated: the peer holds the same {'code' if mode == 'code' else 'secret'}"
              f"; the chat is encrypted ({CIPHER}); verification string {channel.verifier} "
              "(the peer sees the same)")
    return channel, records


def _birthday(cfg: PunchConfig, rdv: Rendezvous, control: Control, port: int,
              deadline: float, event: Callable[[str], None], report: PunchReport
              ) -> PunchResult:
    """Birthday punching (birthday.py says why it works, spray.py how the sockets go).

    The side whose SYNs go first (role second) sends them all, says PRIMED and waits;
    the other sends after GO, and stops at its first connection. The easy side (the
    guesses) decides which connection wins: it runs the path check on the first that
    comes up and resets any other; the random side answers the path check on whichever
    connection the easy side's HELLO arrives first, so both keep the same one."""
    assert rdv.birthday is not None
    side, plan = rdv.birthday
    report.strategy, report.strategy_reason = STRATEGY_BIRTHDAY, rdv.why
    spraying = side == bday.SIDE_SOCKETS
    wanted = plan.sockets if spraying else plan.guesses
    count = raise_nofile(wanted)
    rate = cfg.birthday_rate
    first_out = (plan.order == bday.ORDER_SOCKETS_FIRST) == spraying
    info: dict[str, Any] = {
        "side": side, "order": plan.order, "sockets": plan.sockets, "guesses": plan.guesses,
        "range": list(plan.port_range), "hot_band": list(plan.port_hot) if plan.port_hot
        else None, "p_expected": round(plan.p_expected(), 4),
        "p_uniform": round(plan.p_uniform(), 4), "rate": rate, "sockets_used": 0,
        "syns_sent": 0, "errors": {}, "winner": None}
    report.birthday = info
    event("birthday: " + ("our NAT randomises ports: we open sockets" if spraying
                          else "our NAT keeps its port: we send guesses")
          + f"; {bday.summary(plan)}")
    if count < wanted:
        event(f"birthday: RLIMIT_NOFILE lets us open {count} of {wanted} sockets")
    ttl = None
    if spraying and first_out and plan.ttl_limited:
        ttl = _priming_ttl(cfg, rdv, event, report)
        report.ttl = ttl
    held_s = BIRTHDAY_HOLD_S if plan.ttl_limited and plan.order == bday.ORDER_SOCKETS_FIRST \
        else 0.0
    if spraying:
        targets = [rdv.peer] * count
        local: int | None = None
    else:
        guesses = bday.guess_ports(count, plan.port_range, random.Random(cfg.birthday_seed))
        targets = [Endpoint(rdv.peer.ip, g) for g in guesses]
        local = port
    pool = Pool(watch_read=spraying)
    winner: tuple[socket.socket, int, bytes] | None = None
    cpu_start = time.process_time()
    try:
        sent = 0
        try:
            if first_out:
                sent = pool.burst(targets, 0, local, rate, ttl, deadline, stop_on_connect=False,
                                  hold_ttl=ttl is not None)
                _phase(report, rdv.known_at, "sent", syns=pool.opened, ttl=ttl)
                event(f"birthday: {pool.opened} SYNs out" + (f" with TTL {ttl}" if ttl else "")
                      + "; waiting for GO")
                control.send("PRIMED")
            control.wait("GO", min(deadline, time.monotonic() + PRIME_EXCHANGE_S))
        except ToolError as exc:
            control.sock.close()
            raise ToolError(ExitStatus.PUNCH_FAILED, f"birthday: {exc.message}") from None
        go = time.monotonic()
        _phase(report, rdv.known_at, "go")
        control.close(min(deadline, go + CONTROL_CLOSE_S))
        # How long to keep watching: the side sending after GO stops LINGER after its last
        # SYN; the other waits for all of that, and the random side (which follows the
        # easy side's choice) a path check longer.
        other = plan.guesses if spraying else plan.sockets
        follow_s = CONFIRM_TIMEOUT_S if spraying else 0.0
        until = (min(deadline, go + other / rate + BIRTHDAY_LINGER_S + held_s + follow_s)
                 if first_out else deadline)
        open_up_at = go + min(other / rate, BIRTHDAY_OPEN_UP_MAX_S) if ttl is not None else None
        while (now := time.monotonic()) < until:
            if open_up_at is not None and now >= open_up_at:
                pool.open_up()
                open_up_at = None
                _phase(report, rdv.known_at, "open-up")
            elif open_up_at is not None:
                pool.open_up_answered()
            candidates = pool.readable if spraying else pool.connected
            if candidates:
                sock, index = candidates.pop(0)
                leftover = confirm_path(sock, min(CONFIRM_TIMEOUT_S, deadline - now))
                if leftover is not None:
                    winner = (sock, index, leftover)
                    break
                event(f"birthday: {targets[index] if not spraying else 'a connection'} came "
                      "up but the path check failed: dropped")
                pool.drop(sock)
                continue
            if not first_out and sent < len(targets) and not pool.connected:
                sent = pool.burst(targets, sent, local, rate, None, until, stop_on_connect=True)
                if sent == len(targets):
                    until = min(deadline, time.monotonic() + BIRTHDAY_LINGER_S + held_s
                                + follow_s)
                continue
            pool.poll(min(until - now, 0.05, max(0.0, (open_up_at or until) - now)))
    finally:
        keep = winner[0] if winner else None
        pool.close(keep=keep)
        info["sockets_used"] = pool.opened
        info["syns_sent"] = pool.syns_sent
        info["errors"] = dict(pool.failed)
        info["cpu_s"] = round(time.process_time() - cpu_start, 4)
    attempt_time = (pool.first_sent or go) - rdv.known_at
    if winner is None:
        return PunchResult(None, [Attempt(1, attempt_time, time.monotonic() - go, "ETIMEDOUT")],
                           None, f"birthday: no guess matched: {plan.sockets} sockets x "
                           f"{plan.guesses} guesses (p = {plan.p_expected():.4f}), "
                           f"{pool.opened} SYNs of ours out, {pool.syns_sent} with the "
                           "kernel's retransmissions")
    sock, index, leftover = winner
    ended = time.monotonic()
    sock.setblocking(True)
    mine = Endpoint.from_sockaddr(sock.getsockname())
    theirs = Endpoint.from_sockaddr(sock.getpeername())
    info["winner"] = {"local": str(mine), "peer": str(theirs), "index": index,
                      "t_s": round(ended - rdv.known_at, 6)}
    event(f"birthday: {'socket' if spraying else 'guess'} #{index + 1} won: {mine} <-> "
          f"{theirs}; every other socket closed ({pool.opened} opened, {pool.syns_sent} "
          "SYNs with retransmissions)")
    return PunchResult(sock, [Attempt(1, attempt_time, ended - go, "connected")], mine, None,
                       ended, leftover, True, theirs)


def _choose(cfg: PunchConfig, rdv: Rendezvous, port: int, deadline: float,
            event: Callable[[str], None], report: PunchReport) -> socket.socket | None:
    """Run what comes before the punch's connect()s for the strategy the broker chose
    (or the options, without a synprobe broker). Returns the socket the punch's first
    attempt waits on, or None."""
    report.strategy, report.strategy_reason = rdv.strategy or "plain", rdv.why
    control = rdv.control
    if rdv.strategy is not None:
        event(f"{rdv.strategy}: {rdv.why}" if rdv.why else f"strategy {rdv.strategy}")
    if control is not None:
        try:
            pending = _exchange(cfg, rdv, control, port, deadline, event, report)
        except ToolError as exc:
            # Closed at once: the broker tells a peer still waiting for GO that we left
            # (peer-gone), and it punches plain too.
            control.sock.close()
            if exc.status != ExitStatus.PUNCH_FAILED:
                raise
            event(f"{rdv.strategy}: {exc.message}; going on with the plain punch")
            report.strategy = "plain"
            return None
        except BaseException:
            control.sock.close()
            raise
        control.close(min(deadline, time.monotonic() + CONTROL_CLOSE_S))
        return pending
    if cfg.mode != "broker" and (cfg.role is not None or cfg.ttl is not None):
        return _without_broker(cfg, rdv, port, deadline, event, report)
    if cfg.mode == "broker" and cfg.strategy not in ("auto", "plain") and \
            rdv.strategy != cfg.strategy:
        event(f"{cfg.strategy}: the broker did not offer it (an older broker, or the peer "
              f"did not ask for it); punching {report.strategy}")
    return None


def _phase(report: PunchReport, known_at: float, name: str, **more: Any) -> None:
    report.phases.append({"phase": name, "t_s": round(time.monotonic() - known_at, 6),
                          **more})


def _without_broker(cfg: PunchConfig, rdv: Rendezvous, port: int, deadline: float,
                    event: Callable[[str], None], report: PunchReport) -> socket.socket | None:
    """--peer / --seed-broker with --first, --second or --ttl: the order is the user's
    (the --second side is started first), the clock stands in for GO."""
    report.strategy = "prime" if cfg.ttl is not None else "order"
    report.strategy_reason = " ".join(
        ([f"--{cfg.role}"] if cfg.role else []) + ([f"--ttl {cfg.ttl}"] if cfg.ttl else []))
    if cfg.ttl is not None:
        report.ttl, report.ttl_source = cfg.ttl, "--ttl"
    ttl = cfg.ttl if cfg.ttl is not None else FULL_TTL
    opened = None
    try:
        if cfg.role == "second" or cfg.ttl is not None:
            opened = prime(port, rdv.peer, ttl)
        if opened is not None:
            opened.open_up()  # the SYN+ACK it answers the peer's SYN with needs a full TTL
    except OSError as exc:
        if opened is not None:
            opened.sock.close()
        raise ToolError(ExitStatus.PUNCH_FAILED,
                        f"opening our hole failed: {exc.strerror or exc}") from None
    if cfg.role != "second":  # --first, or --ttl alone: our hole, then connect()s
        if opened is not None:
            opened.sock.close()  # in SYN-SENT a close sends nothing; the NAT's entry stays
            _phase(report, rdv.known_at, "primed", ttl=ttl)
            event(f"prime: our NAT's hole opened with a TTL {ttl} SYN")
        if cfg.role == "first":
            wait_s = max(0.0, min(FIRST_WAIT_S, deadline - time.monotonic()))
            event(f"--first: connecting in {wait_s:.1f} s, once the --second side's hole is "
                  "open")
            time.sleep(wait_s)
            _phase(report, rdv.known_at, "go")
        return None
    assert opened is not None
    _phase(report, rdv.known_at, "primed" if cfg.ttl is not None else "sent", ttl=ttl)
    event(f"{'prime' if cfg.ttl is not None else 'order'}: our SYN (TTL {ttl}) opened our "
          "NAT's hole; waiting on that socket for the peer's SYN")
    return opened.sock


def _exchange(cfg: PunchConfig, rdv: Rendezvous, control: Control, port: int,
              deadline: float, event: Callable[[str], None], report: PunchReport
              ) -> socket.socket | None:
    """The PRIMED -> GO exchange of prime and order (docs/protocol.md). Returns the
    socket the punch's first attempt waits on (the second's), or None for a fresh
    connect() (the first). Raises ToolError(PUNCH_FAILED) when it cannot work or finish:
    the run punches plain then."""
    if rdv.strategy == "order":
        return _order(rdv, control, port, deadline, event, report)
    return _prime(cfg, rdv, control, port, deadline, event, report)


def _order(rdv: Rendezvous, control: Control, port: int, deadline: float,
           event: Callable[[str], None], report: PunchReport) -> socket.socket | None:
    """order: the second sends its SYN at once (the first's NAT drops it silently, so
    the second's hole stays open), says PRIMED, and waits on that socket; the first
    sends after GO (which the broker sends as soon as the second said PRIMED)."""
    opened = None
    if rdv.role == "second":
        try:
            opened = prime(port, rdv.peer, FULL_TTL)
        except OSError as exc:
            raise ToolError(ExitStatus.PUNCH_FAILED,
                            f"sending our SYN failed: {exc.strerror or exc}") from None
        _phase(report, rdv.known_at, "sent")
        event("order: our SYN is out (the peer's NAT drops it silently); our hole is open")
    try:
        if opened is not None:
            control.send("PRIMED")
        control.wait("GO", min(deadline, time.monotonic() + PRIME_EXCHANGE_S))
        _phase(report, rdv.known_at, "go")
        if opened is None:
            event("order: GO: the peer's hole is open; we connect")
            return None
        # Any state but CLOSE is fine: SYN-SENT, or SYN-RECEIVED and later when the
        # peer's SYN came before we read GO.
        if opened.state == TCP_CLOSE:
            raise ToolError(ExitStatus.PUNCH_FAILED,
                            "our early SYN was answered (an RST or ICMP ended the socket): "
                            "the peer's NAT does not drop unsolicited SYNs")
        event("order: GO: waiting for the peer's SYN on our open socket")
        return opened.sock
    except BaseException:
        if opened is not None:
            opened.sock.close()
        raise


def _priming_ttl(cfg: PunchConfig, rdv: Rendezvous, event: Callable[[str], None],
                 report: PunchReport) -> int:
    """The TTL of a hole-opening SYN: --ttl, else measured towards the peer (nat-check's
    when no hop answered, else a default). Raises ToolError(PUNCH_FAILED) when no TTL can
    leave our NAT without reaching the peer's."""

    def phase(name: str, **more: Any) -> None:
        _phase(report, rdv.known_at, name, **more)

    # nat-check's TTL was measured towards its server, not the peer: only the measure
    # sees a peer too close to prime (no router between the NATs). It stands in for the
    # blind default when no hop answered the measure.
    facts = cfg.facts
    if facts is not None and (facts.ttl is None or rdv.public is None
                              or rdv.public.ip != facts.public_ip):
        facts = None
    if cfg.ttl is not None:
        ttl, report.ttl_source = cfg.ttl, "--ttl"
    elif rdv.peer.is_v6:
        # No NAT to find past: the firewall is the first hop (a home gateway), and the
        # next router is not the peer's.
        ttl, report.ttl_source = DEFAULT_TTL, "default"
        event(f"prime: IPv6: hop limit {ttl} (past our gateway's firewall at hop 1, dead at "
              "the next router); ICMPv6 errors are dropped by a minimum hop limit of "
              f"{PRIME_MINHOPS_V6}, and every SYN of the punch leaves with hop limit 255")
    else:
        answers = measure_hops(rdv.peer.ip)
        found, why = choose_ttl(answers, rdv.peer.ip)
        path = ", ".join(f"{a.ttl}:{a.offender}" for a in answers
                         if a.icmp_type == ICMP_TIME_EXCEEDED) or "none"
        phase("measure", time_exceeded_from=path)
        if found is not None:
            ttl, report.ttl_source = found, "measured"
            event(f"prime: TTL {ttl}: {why} (time-exceeded from: {path})")
        elif why == NO_ANSWER and facts is not None and facts.ttl is not None:
            ttl, report.ttl_source = facts.ttl, "nat-check"
            event(f"prime: {why}; TTL {ttl} from the last {facts.describe()}")
        elif why == NO_ANSWER:
            ttl, report.ttl_source = DEFAULT_TTL, "default"
            event(f"prime: {why}; trying TTL {ttl} (a home NAT and one router)")
        else:
            # Any TTL that leaves our NAT reaches the peer's: priming would wedge it.
            raise ToolError(ExitStatus.PUNCH_FAILED, f"{why} (time-exceeded from: {path})")
    return ttl


def _prime(cfg: PunchConfig, rdv: Rendezvous, control: Control, port: int, deadline: float,
           event: Callable[[str], None], report: PunchReport) -> socket.socket | None:
    """Open our NAT's hole with a TTL-limited SYN whose socket stays in SYN-SENT, tell the
    broker, wait for GO (prime.py says why). Returns the socket the punch's first
    attempt waits on (the second's primed one), or None for a fresh connect() (the
    first). Raises ToolError(PUNCH_FAILED) when priming cannot work or the exchange
    cannot finish: the run punches plain then."""

    def phase(name: str, **more: Any) -> None:
        _phase(report, rdv.known_at, name, **more)

    ttl = _priming_ttl(cfg, rdv, event, report)
    report.ttl = ttl
    try:
        primed = prime(port, rdv.peer, ttl)
    except OSError as exc:
        raise ToolError(ExitStatus.PUNCH_FAILED,
                        f"priming failed: {exc.strerror or exc}") from None
    try:
        if rdv.role != "first":
            # The first's SYN may come the moment the broker's GO left, before we read
            # GO: our SYN+ACK must already carry a full TTL. (Our kernel's own SYN
            # retransmission, 1 s after priming, then goes out in full too: by then the
            # first has primed as well, unless it is over a second behind us.)
            primed.open_up()
        phase("primed", ttl=ttl)
        control.send("PRIMED")
        control.wait("GO", min(deadline, time.monotonic() + PRIME_EXCHANGE_S))
        phase("go")
        event(primed.describe())
        state = primed.state
        if state in (TCP_SYN_SENT, TCP_CLOSE) and rdv.role == "first":
            # Our full SYN now, from a fresh socket: a later ISN re-opens our NAT's entry,
            # still in SYN_SENT (nothing full came from the peer yet). In SYN-SENT a close
            # sends nothing.
            event("prime: GO: both holes are open; we connect first")
            primed.sock.close()
            return None
        if state == TCP_CLOSE:
            primed.sock.close()
            raise ToolError(ExitStatus.PUNCH_FAILED, "the primed socket did not stay open")
        primed.open_up()  # the first, when the peer's SYN reached its primed socket
        event("prime: GO: both holes are open; waiting for the peer's SYN on the primed "
              "socket")
        return primed.sock
    except BaseException:
        primed.sock.close()
        raise


def _learn_peer(cfg: PunchConfig, port: int, deadline: float, event: Callable[[str], None],
                on_broker_address: Callable[[Endpoint], None] | None = None,
                on_nameplate: Callable[[str], None] | None = None) -> Rendezvous:
    if cfg.broker is not None:
        key = cfg.nameplate if cfg.nameplate is not None else cfg.session
        assert key is not None
        event(f"registering with broker {cfg.broker} " + (
            "for a new code" if key == "new" else f"under code number {key}"
            if cfg.nameplate is not None else f"in session {key!r}"))
        offers = OFFERS[cfg.strategy] + ((STRATEGY_RELAY,) if cfg.relay != "never" else ())
        return rendezvous(cfg.broker, key, port, deadline, event,
                          offers, on_broker_address, cfg.facts,
                          (cfg.birthday_sockets, cfg.birthday_guesses),
                          nameplate=cfg.nameplate is not None, on_nameplate=on_nameplate)
    if cfg.seed_broker is not None:
        event(f"polling list broker {cfg.seed_broker} for another endpoint")
        return seed_rendezvous(cfg.seed_broker, port, deadline, event)
    assert cfg.peer is not None
    now = time.monotonic()
    return Rendezvous(None, cfg.peer, None, None, now, time.time())
