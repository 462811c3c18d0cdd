"""`synprobe lab`: bring a pair of NAT profiles up and down by hand, and the demo."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable

import click

from simulsyn_core._internal.exitcodes import ExitStatus
from simulsyn_core._internal.signals import sigterm_as_interrupt

from .. import lab as labmod
from ..cliutil import EPILOG, FiniteFloatRange
from .netns import DELAY_NODES, LinkDelays

PROFILE_CHOICE = click.Choice(sorted(labmod.PROFILES))


def _lab_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            labmod.check_lab_id(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def delay_options(command: Callable[..., None]) -> Callable[..., None]:
    seconds = FiniteFloatRange(0, 10)
    for name, what in (("--jitter", "Each delayed frame's delay varies by up to this "
                                    "(never more than the link's own delay); order is kept."),
                       ("--delay-broker", "One-way delay (s) between the broker and the router."),
                       ("--delay-b", "One-way delay (s) between B's NAT and the router."),
                       ("--delay-a", "One-way delay (s) between A's NAT and the router.")):
        command = click.option(name, type=seconds, default=0.0, show_default=True,
                               metavar="S", help=what)(command)
    return command


@click.group(epilog=EPILOG)
def lab() -> None:
    """The NAT lab: two hosts behind real Linux NATs in network namespaces.

    \b
    hA --lan-- gA --wan-- rt --wan-- gB --lan-- hB      (rt: a router hop)
                          |
                          br   broker host, 192.0.2.10 and 192.0.2.11
    Needs root (namespaces, iptables). Namespaces are named ssyn-<ID>-<node>;
    everything the lab creates lives in them and goes with them.
    """


@lab.command("profiles", epilog=EPILOG)
def profiles() -> None:
    """List the NAT profiles."""
    from tabulate import tabulate

    rows = [(p.name, "yes" if p.nat else "no", "nft" if p.nft else "iptables", p.description)
            for p in labmod.PROFILES.values()]
    click.echo(tabulate(rows, headers=["profile", "NAT", "rules", "what it does"],
                        maxcolwidths=[None, None, None, 60]))
    click.echo("\nIPv6 (lab up --a6/--b6):")
    rows = [(p.name, "NPTv6" if p.npt else "no", "ip6tables", p.description)
            for p in labmod.PROFILES6.values()]
    click.echo(tabulate(rows, headers=["profile", "NAT", "rules", "what it does"],
                        maxcolwidths=[None, None, None, 60]))


@lab.command("up", epilog=EPILOG)
@click.option("--a", "profile_a", type=PROFILE_CHOICE, default="home", show_default=True,
              help="Profile of host A's NAT.")
@click.option("--b", "profile_b", type=PROFILE_CHOICE, default="home", show_default=True,
              help="Profile of host B's NAT.")
@click.option("--a6", "v6_a", type=click.Choice(list(labmod.PROFILES6)), default=None,
              help="IPv6 beside IPv4 (2001:db8::/32): the IPv6 profile of A's gateway "
                   "(`synprobe lab profiles`). With --b6; not with a carrier profile.")
@click.option("--b6", "v6_b", type=click.Choice(list(labmod.PROFILES6)), default=None,
              help="The IPv6 profile of B's gateway.")
@click.option("--id", "lab_id", default="dev", show_default=True, callback=_lab_id,
              help="Lab id (a-z 0-9): namespaces are ssyn-ID-ha, -ga, -rt, -gb, -hb, -br.")
@delay_options
def up(profile_a: str, profile_b: str, v6_a: str | None, v6_b: str | None, lab_id: str,
       delay_a: float, delay_b: float, delay_broker: float, jitter: float) -> None:
    """Bring a lab up and leave it up (take it down with `synprobe lab down`).

    \b
    --delay-a/--delay-b/--delay-broker put a user-space delay element (namespace
    ssyn-ID-da, -db, -dr) on the link between that NAT (or the broker) and the router:
    each frame waits that long in each direction, in order. Needs ethtool.
    """
    labmod.require_root()
    labmod.sweep(lab_id)
    links = LinkDelays(delay_a, delay_b, delay_broker, jitter)
    if (v6_a is None) != (v6_b is None):
        raise click.UsageError("--a6 and --b6 go together")
    v6 = (v6_a, v6_b) if v6_a is not None and v6_b is not None else None
    try:
        the_lab = labmod.Lab(profile_a, profile_b, lab_id=lab_id, links=links, v6=v6)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    with sigterm_as_interrupt():
        the_lab.up()
    a, b = the_lab.side("a"), the_lab.side("b")
    click.echo(f"lab {lab_id} is up:")
    click.echo(f"  host A  {a.host:<15} ns {the_lab.ns('ha')}  behind {profile_a} "
               f"(public {a.public}, ns {the_lab.ns('ga')})")
    click.echo(f"  host B  {b.host:<15} ns {the_lab.ns('hb')}  behind {profile_b} "
               f"(public {b.public}, ns {the_lab.ns('gb')})")
    click.echo(f"  broker  {' and '.join(labmod.BROKER_IPS):<15} ns {the_lab.ns('br')}")
    if v6 is not None:
        for side, name in (("a", v6[0]), ("b", v6[1])):
            a6 = the_lab.side6(side)
            click.echo(f"  IPv6    host {side.upper()} {a6.host} behind {name} "
                       f"(seen as {a6.public})")
        click.echo(f"  IPv6    broker {' and '.join(labmod.BROKER_IPS6)}")
    for link in links.delayed():
        delay_s, jitter_s = links.of(link)
        click.echo(f"  delay   {link} link to the router: {delay_s * 1000:g} ms each way"
                   + (f" ± {jitter_s * 1000:g} ms" if jitter_s else "")
                   + f" (ns {the_lab.ns(DELAY_NODES[link])})")
    click.echo("try:")
    binds = [f"{ip}:{labmod.BROKER_PORT}" for ip in labmod.BROKER_IPS[:1]] + (
        [f"[{labmod.BROKER_IPS6[0]}]:{labmod.BROKER_PORT}"] if v6 else [])
    click.echo(f"  ip netns exec {the_lab.ns('br')} synprobe broker "
               + " ".join(f"--bind {b}" for b in binds) + " &")
    for node in ("ha", "hb"):
        click.echo(f"  ip netns exec {the_lab.ns(node)} synprobe punch "
                   f"--broker {binds[-1]} --session s1 -v")
    click.echo(f"and at the end: synprobe lab down --id {lab_id}")


@lab.command("down", epilog=EPILOG)
@click.option("--id", "lab_id", default="dev", show_default=True, callback=_lab_id,
              help="Which lab.")
@click.option("--all", "everything", is_flag=True,
              help="Every lab (all ssyn-* namespaces), e.g. after a crash.")
def down(lab_id: str, everything: bool) -> None:
    """Take a lab down: stop its processes, delete its namespaces."""
    labmod.require_root()
    removed = labmod.sweep(None if everything else lab_id)
    click.echo(f"removed {len(removed)} namespace(s)" + (f": {' '.join(removed)}" if removed
                                                         else ""))


@lab.command("demo", epilog=EPILOG)
@click.option("--a", "profile_a", type=PROFILE_CHOICE, default="home", show_default=True,
              help="Profile of host A's NAT.")
@click.option("--b", "profile_b", type=PROFILE_CHOICE, default="home", show_default=True,
              help="Profile of host B's NAT.")
@click.option("--timeout", "timeout_s", type=FiniteFloatRange(1, 600), default=10.0,
              show_default=True, help="--timeout given to each punch.")
@click.option("--id", "lab_id", default=None, callback=_lab_id,
              help="Lab id [default: demo<random>]; the lab is removed at the end anyway.")
@delay_options
def demo(profile_a: str, profile_b: str, timeout_s: float, lab_id: str | None,
         delay_a: float, delay_b: float, delay_broker: float, jitter: float) -> None:
    """Broker, two NATed peers, a punch and a message each way, then clean up."""
    labmod.require_root()
    lab_id = lab_id or f"demo{time.time_ns() % 100000}"
    labmod.sweep(lab_id)
    the_lab = labmod.Lab(profile_a, profile_b, lab_id=lab_id,
                         links=LinkDelays(delay_a, delay_b, delay_broker, jitter))
    with sigterm_as_interrupt(), the_lab:
        a, b = the_lab.side("a"), the_lab.side("b")
        click.echo(f"NAT lab up: host A {a.host} behind '{profile_a}' ({a.public})  <-- "
                   f"router -->  ({b.public}) '{profile_b}' in front of host B {b.host}")
        click.echo(f"broker on {labmod.BROKER_IPS[0]}:{labmod.BROKER_PORT} (--syn-probe: it "
                   "learns what each NAT does to an early SYN, and chooses the strategy)\n")
        broker_log = tempfile.TemporaryFile()
        labmod.start_broker(the_lab, ["--syn-probe"], stderr=broker_log)
        msgs = (f"hello from A ({a.host})\n", f"hello from B ({b.host})\n")
        click.echo(f"A and B run: synprobe punch --broker "
                   f"{labmod.BROKER_IPS[0]}:{labmod.BROKER_PORT} "
                   f"--session demo --verbose --json   (stdin: one line each)\n")
        run_a, run_b = labmod.punch_pair(the_lab, "demo", messages=msgs, args=["--verbose"],
                                         timeout_s=timeout_s)
        broker_log.seek(0)
        click.echo("--- broker (stderr) ---")
        for line in broker_log.read().decode(errors="replace").splitlines():
            click.echo("  " + line)
        click.echo("")
        for run in (run_a, run_b):
            click.echo(f"--- host {run.side.upper()}: steps (stderr) ---")
            for line in run.stderr.splitlines():
                click.echo("  " + line.removeprefix("synprobe: "))
            click.echo(f"--- host {run.side.upper()}: what it printed (stdout) ---")
            click.echo("  " + (run.stdout.split("\n", 1)[0] if run.report else "(no JSON)"))
            for line in run.chat_lines:
                click.echo(f"  peer says: {line}")
            click.echo(f"  exit code {run.returncode}\n")
        ok = all(r.returncode == 0 for r in (run_a, run_b))
        ra, rb = run_a.report or {}, run_b.report or {}
        if ok:
            ms = max(float(str(ra.get("elapsed_s") or 0)), float(str(rb.get("elapsed_s") or 0)))
            click.echo(f"connected {ra.get('local')} <-> {ra.get('peer')} through both NATs, "
                       f"{ms * 1000:.1f} ms after the peers were known; one message each way.")
        else:
            click.echo("the punch did not connect: "
                       f"A: {ra.get('error')}; B: {rb.get('error')}")
    click.echo("lab removed.")
    sys.exit(ExitStatus.OK if ok else ExitStatus.PUNCH_FAILED)
