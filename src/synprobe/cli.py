"""The synprobe command line. Keep this module light: `synprobe --help` and
`synprobe punch` must start fast, so scapy (and anything heavy) is imported only inside
the commands that craft or capture packets.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from simulsyn_core import __version__
from simulsyn_core._internal.birthday import (
    DEFAULT_GUESSES,
    DEFAULT_RATE,
    DEFAULT_SOCKETS,
    MAX_GUESSES,
    MAX_RATE,
    MAX_SOCKETS,
)
from simulsyn_core._internal.exitcodes import ExitStatus, ToolError
from simulsyn_core._internal.punch import (
    ATTEMPT_TIMEOUT_S,
    DEFAULT_RETRIES,
    PUNCH_TIMEOUT_S,
    RETRY_INTERVAL_S,
    STRATEGIES,
)
from simulsyn_core._internal.relay import RelayLimits
from simulsyn_core._internal.wire import DEFAULT_BROKER_PORT

from .cliutil import EPILOG, AsciiIntRange, EndpointType, FiniteFloatRange, Reporter

if TYPE_CHECKING:  # imported where used: `synprobe --help` must start fast
    from simulsyn_core._internal.endpoint import Endpoint

# Subcommands that live in their own modules, imported only when named (or for --help),
# so that `synprobe punch` never pays for them. Each module must keep scapy out of its
# top-level imports.
LAZY_COMMANDS: dict[str, str] = {
    "lab": "synprobe.lab.cli:lab",
    "analyze": "synprobe.analyze.command:analyze",
    "report": "synprobe.report:report",
    "nat-check": "synprobe.natcheck.cli:nat_check",
}


# One-line help of the lazy commands, so that `synprobe --help` imports none of them.
LAZY_HELP: dict[str, str] = {
    "lab": "The NAT lab: two hosts behind real Linux NATs in network namespaces.",
    "analyze": "Explain TCP openings in pcap/pcapng files, with ladder diagrams.",
    "report": "Bundle a bug report: last nat-check, recorded pcaps, versions.",
    "nat-check": "Measure what a NAT does to TCP and recommend how to punch it.",
}


class LazyGroup(click.Group):
    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS and name in LAZY_HELP:
                rows.append((name, LAZY_HELP[name]))
                continue
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = LAZY_COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        import importlib

        module_name, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module_name), attr)
        return command


@click.group(cls=LazyGroup, epilog=EPILOG,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="synprobe")
@click.option("--traceback", is_flag=True, help="On an internal error, show the Python stack.")
@click.pass_context
def cli(ctx: click.Context, traceback: bool) -> None:
    """TCP NAT traversal by simultaneous open, and a probe of what a NAT does to TCP.

    \b
    Typical use:
      synprobe broker --bind 0.0.0.0:8086              # on a public host
      synprobe punch --broker HOST:8086 --session S -v # on each of two peers
    """
    ctx.ensure_object(dict)
    ctx.obj["traceback"] = traceback


DEFAULT_RELAY = RelayLimits()


@cli.command(epilog=EPILOG)
@click.option("--bind", "binds", multiple=True,
              type=EndpointType(DEFAULT_BROKER_PORT, allow_zero_port=True),
              default=[f"0.0.0.0:{DEFAULT_BROKER_PORT}"], show_default=True, metavar="HOST:PORT",
              help="Address to listen on; repeat for several (a second address or port "
                   "serves the probes of nat-check).")
@click.option("-q", "--quiet", is_flag=True, help="Log nothing but errors.")
@click.option("--probe/--no-probe", default=False, show_default=True,
              help="Serve `synprobe nat-check` too: also listen on PORT+1 of each address "
                   "and send raw probes from PORT+2 (README: safety of the probe server). "
                   "Raw probes need CAP_NET_RAW and CAP_NET_ADMIN; without them only the "
                   "mapping probe is served. Implies --syn-probe.")
@click.option("--syn-probe", is_flag=True,
              help="Send each registering client one unsolicited SYN (an ordinary connect() "
                   "to its public endpoint, no privilege) to learn whether its NAT drops it "
                   "or answers it (RST, ICMP): the pair's strategy is chosen from that "
                   "(docs/protocol.md). Delays REGISTERED by up to 1 s for a dropping NAT.")
@click.option("--relay", "relay", is_flag=True,
              help="Relay the pairs that offer it (punch --relay): their PEER lines carry a "
                   "token, and a pair no punch can join gets strategy=relay instead of ERROR "
                   "untraversable. The relay sees what the peers send: only ciphertext "
                   "unless they use --plain (README: Relay).")
@click.option("--relay-sessions", type=AsciiIntRange(min=1, max=1_000_000),
              default=DEFAULT_RELAY.sessions, show_default=True, metavar="N",
              help="Relayed sessions at once (a waiting side counts); more get "
                   "ERROR code=relay-full.")
@click.option("--relay-per-ip", type=AsciiIntRange(min=1, max=1_000_000),
              default=DEFAULT_RELAY.per_ip, show_default=True, metavar="N",
              help="Relayed sessions one address takes part in at once; more get "
                   "ERROR code=relay-busy.")
@click.option("--relay-rate", type=AsciiIntRange(min=0, max=10**12),
              default=DEFAULT_RELAY.rate, show_default=True, metavar="BYTES",
              help="Bytes a second per relayed session, both directions together (0: no "
                   "limit). Over it the relay reads more slowly; it never drops.")
@click.option("--relay-bytes", type=AsciiIntRange(min=0, max=10**15),
              default=DEFAULT_RELAY.budget, show_default=True, metavar="BYTES",
              help="Bytes per relayed session, both directions together (0: no limit); "
                   "past it the session is cut (both connections reset).")
@click.option("--relay-idle", type=FiniteFloatRange(min=0.1, max=86400.0),
              default=DEFAULT_RELAY.idle_s, show_default=True, metavar="SECONDS",
              help="A relayed session with no byte either way for this long is cut (both "
                   "connections reset).")
@click.option("--redis", "redis_url", metavar="redis://HOST:PORT/DB",
              help="Share the sessions with the other brokers on this Redis (README: Scaling "
                   "out on Redis): peers registered at different brokers are paired. Without "
                   "it, the sessions live in this process only. Needs the redis extra "
                   "(pip install 'synprobe[redis]').")
@click.option("--advertise", type=EndpointType(DEFAULT_BROKER_PORT), metavar="HOST:PORT",
              help="With --redis --relay: where peers reach this broker's relay (PEER "
                   "relay_at=); default: the address the deciding client reached.")
def broker(binds: tuple[Endpoint, ...], quiet: bool, probe: bool, syn_probe: bool,
           relay: bool, relay_sessions: int, relay_per_ip: int, relay_rate: int,
           relay_bytes: int, relay_idle: float, redis_url: str | None,
           advertise: Endpoint | None) -> None:
    """Run the rendezvous broker.

    \b
    A client that connects and sends nothing gets the original example's list answer
    (1 byte N, then N x [4-byte IPv4, 2-byte port], its own entry last), so the
    original client works unchanged. A client that sends `SSYN1 REGISTER session=NAME`
    is paired with the other client of that session: both are told, at the same
    moment, their own public endpoint and the peer's, and nothing else
    (docs/protocol.md). Stops on SIGTERM (exit 0) or Ctrl-C (exit 130).

    With --relay it also forwards the bytes of pairs that offered a relay (their
    PEER lines carry a token; --relay-* set the limits; a session over its bytes
    or idle is cut with a reset of both connections).
    """
    from simulsyn_core._internal.broker import run_broker, stderr_log

    def log(line: str) -> None:
        if not quiet:
            stderr_log(line)

    limits = RelayLimits(sessions=relay_sessions, per_ip=relay_per_ip, rate=relay_rate,
                         budget=relay_bytes, idle_s=relay_idle) if relay else None
    if redis_url is not None and probe:
        raise click.UsageError("--redis does not serve nat-check's probes (--probe): run "
                               "a probing broker without --redis")
    if advertise is not None and redis_url is None:
        raise click.UsageError("--advertise is for --redis")
    if probe:
        from synprobe.natcheck.broker_side import run_probing_broker

        sys.exit(run_probing_broker(list(binds), log))
    try:
        status = run_broker(list(binds), log=log, syn_probe=syn_probe, relay=limits,
                            redis_url=redis_url, advertise=advertise)
    except OSError as exc:
        raise ToolError(ExitStatus.ADDRESS_IN_USE,
                        f"cannot listen: {exc.strerror or exc}") from None
    except ImportError:
        raise click.UsageError("--redis needs the redis package: pip install "
                               "'synprobe[redis]'") from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--redis") from None
    sys.exit(status)


@cli.command(epilog=EPILOG)
@click.option("-4", "v6", flag_value=False, default=None, is_eager=True,
              help="Reach the broker over IPv4 (its name resolves to its IPv4 address, the "
                   "default for a name that has one): the peer is an IPv4 peer.")
@click.option("-6", "v6", flag_value=True, is_eager=True,
              help="Reach the broker over IPv6 (its name resolves to its IPv6 address): the "
                   "broker pairs us with a peer that came over IPv6 too.")
@click.option("--broker", "broker_ep", type=EndpointType(server=True), metavar="HOST:PORT",
              help="A synprobe broker. Without --session or --code it hands out a short "
                   "code (printed on stderr) for the peer's --code.")
@click.option("--code", metavar="CODE",
              help="The code the other side printed (e.g. 7-guitarist-revenge): the number "
                   "pairs us at the broker, the words authenticate the peer (SPAKE2) and "
                   "key the encryption; the broker never sees them. May be given to both "
                   "sides.")
@click.option("--session", metavar="NAME",
              help="Session name shared with the peer (1-64 of A-Z a-z 0-9 . _ -). Encrypted "
                   "but not authenticated unless --secret is given too.")
@click.option("--secret", metavar="WORDS",
              help="With --session (or --peer): a secret both sides share; it authenticates "
                   "the peer as a code's words do.")
@click.option("--plain", is_flag=True,
              help="No authentication, no encryption: the original's framing (with "
                   "--session). --seed-broker, and --peer without --secret, are always "
                   "plain (the original's peers).")
@click.option("--seed-broker", "seed_ep", type=EndpointType(server=True), metavar="HOST:PORT",
              help="A broker that speaks only the original list protocol: poll it until "
                   "another endpoint is listed and take the newest.")
@click.option("--peer", "peer_ep", type=EndpointType(), metavar="IP:PORT",
              help="Connect straight to this public endpoint (no broker; needs --local-port).")
@click.option("--local-port", type=AsciiIntRange(0, 65535), default=0,
              help="Local port for every socket of the run [default: allocated once].")
@click.option("--retries", type=AsciiIntRange(1, 100000), default=DEFAULT_RETRIES,
              show_default=True,
              help="connect() attempts at most.")
@click.option("--timeout", "timeout_s", type=FiniteFloatRange(0.1, 86400),
              default=PUNCH_TIMEOUT_S,
              show_default=True, help="Seconds for the whole run up to connected "
                                      "(waiting for the peer included).")
@click.option("--retry-interval", "retry_interval_s", type=FiniteFloatRange(0, 60),
              default=RETRY_INTERVAL_S,
              show_default=True, help="Seconds to pause after an attempt refused at once "
                                      "(RST or ICMP).")
@click.option("--attempt-timeout", "attempt_timeout_s", type=FiniteFloatRange(0.05, 3600),
              default=ATTEMPT_TIMEOUT_S, show_default=True,
              help="Seconds one connect() may wait while the kernel resends the SYN.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="auto", show_default=True,
              help="auto: offer all and let the broker choose from what it knows of both "
                   "NATs (README: strategies); plain: connect() with retries, as the "
                   "original; sync: plain, with both peers told at the same moment; order: "
                   "the side whose NAT answers unsolicited SYNs sends first, the other after "
                   "the broker's GO; prime: both open their own NAT's hole with a "
                   "TTL-limited SYN, then one SYN crosses; birthday: through a "
                   "port-randomising NAT on one side, many sockets on that side and many "
                   "guessed ports from the other (chosen by auto when the broker's mapping "
                   "check sees exactly one such NAT). sync, order, prime and birthday need "
                   "a synprobe broker and a peer that offer them.")
@click.option("--ttl", type=AsciiIntRange(1, 64), default=None,
              help="TTL of the priming SYN: it must cross our NAT(s) and die before the "
                   "peer's [default: measured towards the peer with UDP probes; when no hop "
                   "answers, the last nat-check's for this network, else 2]. With --peer or "
                   "--seed-broker: prime.")
@click.option("--first", "role", flag_value="first", default=None,
              help="With --peer or --seed-broker (order without a broker): connect "
                   "0.5 s after the peer is known, once the --second side's hole is open.")
@click.option("--second", "role", flag_value="second",
              help="With --peer or --seed-broker: send our SYN at once and wait on that "
                   "socket for the peer's (start this side first; with --ttl its SYN dies "
                   "on the way).")
@click.option("--nat-check/--no-nat-check", "use_natcheck", default=True, show_default=True,
              help="Use the last `synprobe nat-check` of this network (same public address, "
                   "under a day old): tell the broker what our NAT does to unsolicited and "
                   "reply SYNs; its TTL stands in when the measure towards the peer gets no "
                   "answer.")
@click.option("--birthday-sockets", type=AsciiIntRange(1, MAX_SOCKETS), default=DEFAULT_SOCKETS,
              show_default=True,
              help="Birthday punching, when our NAT randomises ports: open this many "
                   "sockets (N) towards the peer, each from its own local port. "
                   "RLIMIT_NOFILE is raised within its hard limit.")
@click.option("--birthday-guesses", type=AsciiIntRange(1, MAX_GUESSES),
              default=DEFAULT_GUESSES, show_default=True,
              help="Birthday punching, when the peer's NAT randomises ports: send SYNs to "
                   "this many guessed ports (M) of its address, from our one port. "
                   "P(success) ~ 1 - exp(-N*M/R) for R ports in the random NAT's range.")
@click.option("--birthday-rate", type=FiniteFloatRange(1, MAX_RATE), default=DEFAULT_RATE,
              show_default=True, help="Birthday punching: new SYNs per second at most.")
@click.option("--relay", "relay", type=click.Choice(("auto", "never", "only")), default="auto",
              show_default=True,
              help="With a synprobe broker that relays (broker --relay): auto: when the "
                   "punch fails (6 s) or cannot work, chat through the broker's relay while "
                   "the punch goes on in the background, and move the chat onto the direct "
                   "connection when it comes up (nothing lost, repeated or reordered); "
                   "only: the relay at once, no punch; never: no relay (exit 5 when the "
                   "punch fails). The relay sees only sealed records (not with --plain).")
@click.option("-v", "--verbose", is_flag=True, help="Every step on stderr.")
@click.option("--no-chat", is_flag=True,
              help="Exit 0 once connected and both sides exchanged one framed hello.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object on stdout when connected or given up "
                   "(chat lines follow it); for a chat through the relay that may move "
                   "to a direct connection, when the chat ends (after its lines).")
@click.option("--pcap", "pcap_path", metavar="FILE",
              help="Write the run's packets (its port's TCP, ICMP errors about it) to this "
                   "pcapng, each with a comment naming its role. Needs CAP_NET_RAW; "
                   "without it the capture is skipped with a note.")
def punch(v6: bool | None, broker_ep: Endpoint | None, code: str | None, session: str | None,
          secret: str | None, plain: bool, seed_ep: Endpoint | None,
          peer_ep: Endpoint | None, local_port: int, retries: int, timeout_s: float,
          retry_interval_s: float, attempt_timeout_s: float, strategy: str, ttl: int | None,
          role: str | None, use_natcheck: bool, birthday_sockets: int, birthday_guesses: int,
          birthday_rate: float, relay: str, verbose: bool, no_chat: bool, as_json: bool,
          pcap_path: str | None) -> None:
    """Connect to a peer by TCP simultaneous open, then chat.

    \b
    Binds one local port (SO_REUSEADDR on every socket), learns its public endpoint
    and the peer's from the broker, and calls connect() towards the peer until the two
    SYNs meet. With a synprobe broker the pair's strategy is the broker's choice
    (--strategy auto), so that no full SYN reaches a NAT that would answer it (RST,
    ICMP) before that NAT's own host has opened its hole: sync when both NATs drop an
    early SYN silently; order when one does (the other side sends first); prime
    otherwise (both open their holes with SYNs that die on the way, then one crosses);
    birthday when exactly one NAT randomises its ports (N sockets on that side, M
    guessed ports from the other; two such NATs are refused at once, exit 5).

    \b
    \b
    Through a synprobe broker the two sides then prove to each other that they hold the
    same code (or --secret) with SPAKE2, and the chat is sealed with ChaCha20-Poly1305:
    a wrong code exits 11 on both sides before anything is sent; an altered, replayed,
    reordered or truncated record exits 12. Then stdin lines go to the peer and the
    peer's lines come to stdout. With --plain, --seed-broker or --peer (the original's
    peers) the chat is unencrypted, framed as the original example (1 length byte +
    UTF-8; longer lines split). At the end of stdin it stops sending and prints until
    the peer closes.

    \b
    Needs no privileges. JSON keys: established, mode, session, local, public, peer,
    peer_local, role, attempts, elapsed_s, error, exit_code, peer_known_at,
    established_at, attempt_log, strategy, strategy_reason, ttl, ttl_source, phases,
    birthday (null unless birthday punching ran), nameplate (the code's number), security
    (mode, encrypted, authenticated, pake, cipher, verifier), path (direct or relay:
    where the chat ended), upgraded_after_s (relay to direct: seconds after the relay
    came up).
    """
    from simulsyn_core._internal.options import Tuning, build_config
    from simulsyn_core._internal.session import PunchReport, run_punch

    reporter = Reporter(verbose)
    facts = None
    if use_natcheck and broker_ep is not None:
        from .state import last_natcheck_facts

        facts = last_natcheck_facts()
    # The API's own rules (connect() takes the same arguments): nothing here it lacks.
    try:
        cfg = build_config(
            broker=broker_ep, session=session, code=code, peer=peer_ep, seed_broker=seed_ep,
            role=role, local_port=local_port, timeout=timeout_s, strategy=strategy,
            relay=relay, secret=secret, plain=plain, natcheck=facts, cli=True,
            tuning=Tuning(retries=retries, retry_interval=retry_interval_s,
                          attempt_timeout=attempt_timeout_s, ttl=ttl,
                          birthday_sockets=birthday_sockets,
                          birthday_guesses=birthday_guesses, birthday_rate=birthday_rate))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    words = cfg.words

    def on_nameplate(number: str) -> None:
        from simulsyn_core._internal.codes import make_code

        given = make_code(number, words or "")
        click.echo(f"synprobe: your code is {given}\n"
                   f"  on the other machine: synprobe punch --broker {broker_ep} --code {given}",
                   err=True)

    def on_report(report: PunchReport) -> None:
        if as_json:
            import json

            from .schema import SCHEMA_VERSION

            click.echo(json.dumps({"schema_version": SCHEMA_VERSION, **report.to_json()}))
            sys.stdout.flush()

    capture = None
    if pcap_path is not None:
        from .punch_pcap import PunchCapture

        capture = PunchCapture(pcap_path, [e for e in (broker_ep, seed_ep) if e], reporter.say)
    from simulsyn_core._internal.signals import sigterm_as_interrupt

    # SIGTERM unwinds like Ctrl-C: the capture is closed, the JSON says "interrupted",
    # and the exit code is 130.
    with sigterm_as_interrupt():
        try:
            status = run_punch(cfg, event=reporter.step, on_report=on_report,
                               chat_mode="hello" if no_chat else "chat",
                               on_local_port=capture.start if capture else None,
                               on_broker_address=capture.add_broker if capture else None,
                               on_nameplate=on_nameplate if code is None else None)
        finally:
            if capture is not None:
                capture.stop()
    sys.exit(int(status))


def main(argv: list[str] | None = None) -> int:
    """Entry point: the one place exceptions become exit codes."""
    traceback = "--traceback" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="synprobe", standalone_mode=False)
    except ToolError as exc:
        click.echo(f"synprobe: {exc.message}", err=True)
        return int(exc.status)
    except click.exceptions.Abort:
        click.echo("synprobe: interrupted", err=True)
        return int(ExitStatus.INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        return int(ExitStatus.USAGE) if isinstance(exc, click.UsageError) else exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except KeyboardInterrupt:
        click.echo("synprobe: interrupted", err=True)
        return int(ExitStatus.INTERRUPTED)
    except BrokenPipeError:
        return int(ExitStatus.OK)
    except Exception as exc:  # a bug: one line unless asked for the stack
        if traceback:
            raise
        click.echo(f"synprobe: internal error: {exc.__class__.__name__}: {exc} "
                   "(run with --traceback and report it)", err=True)
        return int(ExitStatus.ERROR)
    return 0


def run() -> None:
    sys.exit(main())

