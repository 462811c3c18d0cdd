"""`synprobe nat-check`: the click command (scapy is imported only when a probe runs)."""

from __future__ import annotations

import sys

import click

from simulsyn_core._internal.signals import sigterm_as_interrupt

from .. import state
from ..cliutil import (
    DEFAULT_BROKER_PORT,
    EPILOG,
    AsciiIntRange,
    FiniteFloatRange,
    Reporter,
    check_server,
    parse_server,
)
from . import protocol as P
from .port_samples import DEFAULT_PORT_SAMPLES, MAX_OPEN, MAX_SAMPLES, RATE_PER_S


def _bar(what: str, done: float, total: float, figures: str) -> None:
    width = 30
    filled = int(width * min(1.0, done / total)) if total > 0 else width
    sys.stderr.write(f"\rsynprobe: {what} [{'#' * filled}{'.' * (width - filled)}] {figures}")
    if filled == width:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _progress_bar(done: float, total: float) -> None:
    _bar("hole lifetime", done, total, f"{done:5.1f}/{total:.0f} s")


def _samples_bar(done: float, total: float) -> None:
    _bar("port samples", done, total, f"{done:5.0f}/{total:.0f}")


@click.command("nat-check", epilog=EPILOG)
@click.option("--server", "server_text", required=True, metavar="HOST[:PORT]",
              callback=check_server,
              help="A `synprobe broker` (with its probe side on); [IPV6]:PORT for IPv6.")
@click.option("-4", "v6", flag_value=False, default=None,
              help="Check over IPv4 (a name resolves to its IPv4 address; the default "
                   "for a name that has one).")
@click.option("-6", "v6", flag_value=True,
              help="Check over IPv6 (a name resolves to its IPv6 address): NPTv6 shows as "
                   "a mapping (prefix translation), a plain firewall as behind_nat false.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--timers", is_flag=True,
              help="Also measure how long a SYN's hole stays open (syn_sent_lifetime_s); "
                   "takes up to --max-wait seconds.")
@click.option("--max-wait", "max_wait_s", type=FiniteFloatRange(2, P.MAX_TIMER_WAIT_S),
              default=150.0, show_default=True, help="Longest hole lifetime --timers tries.")
@click.option("--pcap", "pcap", type=click.Path(dir_okay=False, writable=True),
              help="Write every probe packet sent and received to this pcap file (not the "
                   "port samples' connections).")
@click.option("--port-samples", "port_samples", type=AsciiIntRange(0, MAX_SAMPLES),
              default=DEFAULT_PORT_SAMPLES, show_default=True, metavar="K",
              help="When the mapping is endpoint-dependent: open K connections from fresh "
                   f"local ports (at most {RATE_PER_S:.0f}/s, {MAX_OPEN} at once) to learn "
                   "the NAT's public port range (port_range); 0 skips it. 1000 take about "
                   "2 s and show Linux's --random-fully hot band 7 times in 10; 2200 show "
                   "it 39 times in 40.")
@click.option("--rfc5382", "rfc5382", is_flag=True,
              help="Also print RFC 5382's requirements one by one (pass, fail, not "
                   "measured); runs the slow probes: REQ-4 watches the unsolicited SYN's "
                   "answer for 7 s, REQ-10 sends an ICMP error then a SYN on one mapping. "
                   "REQ-5 needs --timers.")
@click.option("--no-hairpin", "no_hairpin", is_flag=True,
              help="Send no SYN to this host's own public endpoint (some firewalls take it "
                   "for a LAND attack and drop the host's NAT sessions); hairpin, REQ-8 "
                   "and REQ-8a are then not measured.")
@click.option("-v", "--verbose", is_flag=True,
              help="Every step on stderr; with --rfc5382, each requirement's packets.")
def nat_check(server_text: str, v6: bool | None, as_json: bool, timers: bool, max_wait_s: float,
              pcap: str | None, port_samples: int, rfc5382: bool, no_hairpin: bool,
              verbose: bool) -> None:
    """Measure what the NAT in front of this host does to TCP, and how to punch it.

    \b
    Reports (table, or --json with these keys): public, behind_nat, mapping,
    port_preservation, port_allocation, filtering, unsolicited_syn, reply_syn,
    syn_sent_lifetime_s (--timers), hairpin, hops, host_stack, port_range (behind an
    endpoint-dependent mapping, --port-samples), recommendation, verdict, rfc5382 (RFC
    5382 requirement by requirement; the slow probes only with --rfc5382), schema_version
    (docs/schema/natcheck.schema.json); a value that could not be measured is null with
    its reason in "reasons". With --rfc5382 the verdict names the failing REQs; a
    failing requirement does not change the exit code (0: the check was done).
    The mapping probes need no privileges; the raw probes need CAP_NET_RAW and
    CAP_NET_ADMIN (without them: mapping only, then exit 6). While it runs it adds
    iptables rules dropping RSTs from its own probe ports, removed on every exit.
    """
    from .client import CheckConfig, run_natcheck
    from .render import as_json as render_json
    from .render import evidence_lines, table

    try:
        server = parse_server(server_text, DEFAULT_BROKER_PORT, v6)
    except click.BadParameter as exc:
        exc.param_hint = "'--server'"
        raise
    reporter = Reporter(verbose)
    with sigterm_as_interrupt():
        report = run_natcheck(CheckConfig(server, timers, max_wait_s, pcap, port_samples,
                                          rfc5382, not no_hairpin),
                              reporter.step, progress=_progress_bar if timers else None,
                              sample_progress=_samples_bar)
    data = report.to_json()
    if rfc5382:
        for line in evidence_lines(report):
            reporter.step(line)
    click.echo(render_json(report) if as_json else table(report))
    try:
        state.save_last_natcheck(data)
        if pcap:
            state.record_pcap(pcap)
    except OSError as exc:
        reporter.say(f"could not save the result for `synprobe report`: {exc}")
    if report.error:
        click.echo(f"synprobe: nat-check: {report.error}", err=True)
    sys.exit(report.exit_code)
