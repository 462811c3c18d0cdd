"""The one table of exit codes, shared by every command (documented in --help and README)."""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    OK = 0
    ERROR = 1  # unexpected internal error (a bug: please report it)
    USAGE = 2  # bad arguments (click's own code for usage errors)
    BROKER_UNREACHABLE = 3  # broker refused, timed out, or answered something unexpected
    NO_PEER = 4  # the broker never paired us with a peer within --timeout
    PUNCH_FAILED = 5  # the peer was known but no connection came up within --timeout/--retries
    NO_PRIVILEGE = 6  # needs CAP_NET_RAW / CAP_NET_ADMIN and does not have it
    BAD_INPUT = 7  # an input file is unreadable, damaged, or not what the command reads
    ADDRESS_IN_USE = 8  # could not bind the requested local address/port
    PEER_LOST = 9  # connected, then the peer's connection broke (reset, keepalive timeout)
    MISSING_TOOL = 10  # a system tool the command runs (ip, iptables, tcpdump...) is missing
    AUTH_FAILED = 11  # the peer did not prove it holds the same code (or does not encrypt)
    TAMPERED = 12  # a sealed record was altered, replayed, reordered, or the stream truncated
    INTERRUPTED = 130  # Ctrl-C / SIGTERM


EXIT_CODES_HELP = "\n".join(
    f"  {int(s):>3}  {s.name.lower().replace('_', '-')}: {d}"
    for s, d in [
        (ExitStatus.OK, "success (connected; chat ended cleanly)"),
        (ExitStatus.ERROR, "internal error (a bug; run with --traceback)"),
        (ExitStatus.USAGE, "usage error (bad option or value)"),
        (ExitStatus.BROKER_UNREACHABLE, "broker unreachable or spoke an unexpected protocol"),
        (ExitStatus.NO_PEER, "no peer registered in the session within --timeout"),
        (ExitStatus.PUNCH_FAILED, "peer known, but the punch did not connect"),
        (ExitStatus.NO_PRIVILEGE, "missing CAP_NET_RAW/CAP_NET_ADMIN for this command"),
        (ExitStatus.BAD_INPUT, "input file unreadable, damaged or of the wrong kind"),
        (ExitStatus.ADDRESS_IN_USE, "could not bind the local address or port"),
        (ExitStatus.PEER_LOST, "connection to the peer broke during the chat"),
        (ExitStatus.MISSING_TOOL, "a system tool it needs (ip, iptables, nft...) is missing"),
        (ExitStatus.AUTH_FAILED, "the peer does not know the code (wrong code, or a stranger "
         "took the session); nothing sent"),
        (ExitStatus.TAMPERED, "a chat record was altered, replayed, reordered or cut off: "
         "connection closed"),
        (ExitStatus.INTERRUPTED, "interrupted (Ctrl-C or SIGTERM)"),
    ]
)


class ToolError(Exception):
    """An error the user can act on: printed as one line, mapped to an exit status."""

    def __init__(self, status: ExitStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
