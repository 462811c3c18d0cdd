"""`synprobe nat-check`: the click command (scapy is imported only when a probe runs)."""

from __future__ import annotations

import sys

import click

from simulsyn_core.endpoint import Endpoint
from simulsyn_core.signals import sigterm_as_interrupt

from .. import state
from ..cliutil import EPILOG, EndpointType, Reporter
from . import protocol as P


def _progress_bar(done: float, total: float) -> None:
    width = 30
    filled = int(width * min(1.0, done / total)) if total > 0 else width
    sys.stderr.write(f"\rsynprobe: hole lifetime [{'#' * filled}{'.' * (width - filled)}] "
                     f"{done:5.1f}/{total:.0f} s")
    if filled == width:
        sys.stderr.write("\n")
    sys.stderr.flush()


@click.command("nat-check", epilog=EPILOG)
@click.option("--server", "server", type=EndpointType(server=True), required=True,
              metavar="HOST[:PORT]", help="A `synprobe broker` (with its probe side on).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--timers", is_flag=True,
              help="Also measure how long a SYN's hole stays open (syn_sent_lifetime_s); "
                   "takes up to --max-wait seconds.")
@click.option("--max-wait", "max_wait_s", type=click.FloatRange(2, P.MAX_TIMER_WAIT_S),
              default=150.0, show_default=True, help="Longest hole lifetime --timers tries.")
@click.option("--pcap", "pcap", type=click.Path(dir_okay=False, writable=True),
              help="Write every probe packet sent and received to this pcap file.")
@click.option("-v", "--verbose", is_flag=True, help="Every step on stderr.")
def nat_check(server: Endpoint, as_json: bool, timers: bool, max_wait_s: float,
              pcap: str | None, verbose: bool) -> None:
    """Measure what the NAT in front of this host does to TCP, and how to punch it.

    \b
    Reports (table, or --json with these keys): public, behind_nat, mapping,
    port_preservation, port_allocation, filtering, unsolicited_syn, reply_syn,
    syn_sent_lifetime_s (--timers), hairpin, hops, host_stack, recommendation, verdict;
    a value that could not be measured is null with its reason in "reasons".
    The mapping probes need no privileges; the raw probes need CAP_NET_RAW and
    CAP_NET_ADMIN (without them: mapping only, then exit 6). While it runs it adds
    iptables rules dropping RSTs from its own probe ports, removed on every exit.
    """
    from .client import CheckConfig, run_natcheck
    from .render import as_json as render_json
    from .render import table

    reporter = Reporter(verbose)
    with sigterm_as_interrupt():
        report = run_natcheck(CheckConfig(server, timers, max_wait_s, pcap), reporter.step,
                              progress=_progress_bar if timers else None)
    data = report.to_json()
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
