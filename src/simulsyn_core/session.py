"""One run of the punch: learn the peer, punch, report, then chat (or exchange a hello)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from .chat import chat, close_cleanly, confirm_path, hello_exchange
from .client import Rendezvous, rendezvous, seed_rendezvous
from .endpoint import Endpoint
from .exitcodes import ExitStatus, ToolError
from .punch import (
    ATTEMPT_TIMEOUT_S,
    DEFAULT_RETRIES,
    PUNCH_TIMEOUT_S,
    RETRY_INTERVAL_S,
    PunchSchedule,
    punch,
)
from .sockets import bound_socket


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
              on_local_port: Callable[[int], None] | None = None) -> ExitStatus:
    """Carry out one punch. ``on_report`` is called once, when connected or given up.

    ``on_local_port`` is called with the local port before the first packet is sent
    (synprobe starts its capture there).
    """
    report = PunchReport(mode=cfg.mode, session=cfg.session)
    reported: list[PunchReport] = []

    def report_once(r: PunchReport) -> None:
        if not reported:
            reported.append(r)
            on_report(r)

    try:
        return _run_punch(cfg, report, event, report_once, chat_mode, stdin_fd, out,
                          on_local_port)
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
               out: TextIO, on_local_port: Callable[[int], None] | None) -> ExitStatus:
    deadline = time.monotonic() + cfg.timeout_s
    port = check_port(cfg.local_port)
    event(f"local port {port} (bound with SO_REUSEADDR for every socket of this run)")
    if on_local_port is not None:
        on_local_port(port)
    rdv = _learn_peer(cfg, port, deadline, event)
    report.public = str(rdv.public) if rdv.public else None
    report.peer = str(rdv.peer)
    report.peer_local = str(rdv.peer_local) if rdv.peer_local else None
    report.role = rdv.role
    report.peer_known_at = rdv.known_wall
    event(f"peer {rdv.peer}" + (f" (its local endpoint {rdv.peer_local})" if rdv.peer_local
                                else "") + (f"; we registered {rdv.role}" if rdv.role else ""))
    schedule = PunchSchedule(cfg.retries, cfg.retry_interval_s, cfg.attempt_timeout_s)
    # Both sides of a broker session are synprobe: prove the path before calling it up.
    # The original's peers (seed-broker, direct) would not answer the check.
    confirm = confirm_path if cfg.mode == "broker" else None
    result = punch(port, rdv.peer, schedule, deadline, rdv.known_at, event, confirm)
    report.attempts = len(result.attempts)
    report.attempt_log = [
        {"n": a.number, "t_s": round(a.started_s, 6), "duration_s": round(a.duration_s, 6),
         "outcome": a.outcome} for a in result.attempts]
    if result.sock is None:
        raise ToolError(ExitStatus.PUNCH_FAILED, f"punch to {rdv.peer} failed: {result.error}")
    assert result.established_at is not None
    report.established = True
    report.local = str(result.local)
    report.elapsed_s = round(result.established_at - rdv.known_at, 6)
    report.established_at = rdv.known_wall + (result.established_at - rdv.known_at)
    event(f"connected: {result.local} <-> {rdv.peer} after {report.attempts} attempt(s), "
          f"{report.elapsed_s * 1000:.1f} ms after the peer was known")
    on_report(report)
    with result.sock as sock:
        if chat_mode == "hello":
            if result.confirmed:  # the HELLO/ACK exchange was the hello
                return close_cleanly(sock)
            return hello_exchange(sock, max(1.0, deadline - time.monotonic()), event)
        return chat(sock, stdin_fd, out, event, initial=result.leftover)


def _learn_peer(cfg: PunchConfig, port: int, deadline: float,
                event: Callable[[str], None]) -> Rendezvous:
    if cfg.broker is not None:
        assert cfg.session is not None
        event(f"registering with broker {cfg.broker} in session {cfg.session!r}")
        return rendezvous(cfg.broker, cfg.session, port, deadline, event)
    if cfg.seed_broker is not None:
        event(f"polling list broker {cfg.seed_broker} for another endpoint")
        return seed_rendezvous(cfg.seed_broker, port, deadline, event)
    assert cfg.peer is not None
    now = time.monotonic()
    return Rendezvous(None, cfg.peer, None, None, now, time.time())
