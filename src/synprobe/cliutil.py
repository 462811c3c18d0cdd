"""What every synprobe command shares: the exit-code epilog of --help, the endpoint and
number parameter types, and the stderr reporter. Light on purpose: `synprobe --help` and
`synprobe punch` import it, so nothing heavy is imported at the top (no scapy)."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import click

from simulsyn_core._internal.exitcodes import EXIT_CODES_HELP
from simulsyn_core._internal.numbers import (
    finite,
    has_foreign_digits,
    parse_finite_float,
    parse_int,
    parse_port,
)
from simulsyn_core._internal.wire import DEFAULT_BROKER_PORT

if TYPE_CHECKING:  # imported where used: `synprobe --help` must start fast
    from simulsyn_core._internal.endpoint import Endpoint

EPILOG = "\b\nExit codes:\n" + EXIT_CODES_HELP


def server_syntax(text: str, default_port: int = DEFAULT_BROKER_PORT) -> tuple[str, int]:
    """(host, port) of HOST[:PORT], checked but not resolved. Raises click.BadParameter."""
    from simulsyn_core._internal.endpoint import split_host_port

    try:
        host, port_text = split_host_port(text, default_port)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    try:
        port = parse_port(port_text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: port must be 1-65535 in ASCII digits") from None
    if has_foreign_digits(host):  # the resolver would read "１２７.0.0.1" as 127.0.0.1
        raise click.BadParameter(f"{text!r}: digits other than ASCII 0-9 in the host")
    return host, port


def check_server(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A click callback: HOST[:PORT]'s syntax at parse time (resolved later, once the
    family options are known)."""
    if value is not None:
        server_syntax(value)
    return value


def parse_server(text: str, default_port: int = DEFAULT_BROKER_PORT,
                 v6: bool | None = None) -> Endpoint:
    """HOST[:PORT] where HOST is an IPv4 address, [an IPv6 address], or a name (its IPv4
    address if it has one, else its IPv6 address; only the one family when ``v6`` says
    which, and then an address of the other family is an error)."""
    import socket

    from simulsyn_core._internal.endpoint import Endpoint

    host, port = server_syntax(text, default_port)
    wanted = {None: (socket.AF_INET, socket.AF_INET6), False: (socket.AF_INET,),
              True: (socket.AF_INET6,)}[v6]
    try:
        literal = Endpoint.parse(str(Endpoint(host, port)))
    except ValueError:
        literal = None
    if literal is not None:
        if literal.family not in wanted:
            raise click.BadParameter(f"{text!r} is not an IPv{'6' if v6 else '4'} address")
        return literal
    for family in wanted:
        try:
            infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        except (ValueError, OSError, UnicodeError):
            continue
        ip, resolved_port = infos[0][4][:2]
        return Endpoint.from_sockaddr((str(ip), int(resolved_port)))
    if v6 is not None:
        raise click.BadParameter(f"{text!r}: {host!r} has no IPv{'6' if v6 else '4'} "
                                 f"address (-{'6' if v6 else '4'} asks for one)")
    raise click.BadParameter(f"{text!r}: expected HOST:PORT (an IPv4 address, [an IPv6 "
                             "address], or a name that resolves)")


class EndpointType(click.ParamType):
    name = "IP:PORT"

    def __init__(self, default_port: int | None = None, server: bool = False,
                 allow_zero_port: bool = False) -> None:
        self.default_port = default_port
        self.server = server
        self.allow_zero_port = allow_zero_port
        if server:
            self.name = "HOST:PORT"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Endpoint:
        from simulsyn_core._internal.endpoint import Endpoint

        if isinstance(value, Endpoint):
            return value
        if self.server:  # a command's -4/-6 (eager: known before this) picks the family
            v6 = ctx.params.get("v6") if ctx is not None else None
            return parse_server(str(value), self.default_port or DEFAULT_BROKER_PORT, v6)
        try:
            return Endpoint.parse(str(value), default_port=self.default_port,
                                  allow_zero_port=self.allow_zero_port)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange for a finite number written in ASCII: "nan", "inf", "1e999" and
    other scripts' digits ("٣", "３") are usage errors (exit 2), not values."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        try:
            number = parse_finite_float(value) if isinstance(value, str) else finite(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return super().convert(number, param, ctx)


class AsciiIntRange(click.IntRange):
    """click.IntRange for a whole number in ASCII digits: "٣", "３", "²" and "1_0" are
    usage errors (exit 2), not values."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            try:
                value = parse_int(value)
            except ValueError as exc:
                self.fail(str(exc), param, ctx)
        return super().convert(value, param, ctx)


class Reporter:
    """Diagnostics on stderr, stamped relative to the start of the command."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.start = time.monotonic()

    def step(self, message: str) -> None:
        if self.verbose:
            self.say(message)

    def say(self, message: str) -> None:
        print(f"synprobe: [{time.monotonic() - self.start:7.3f}s] {message}", file=sys.stderr,
              flush=True)
