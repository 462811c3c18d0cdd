"""`synprobe analyze FILE...`: every TCP connection attempt in a capture, how it opened,
and its ladder diagram. The table/text form and the --json form are rendered here from
the same records (tcp.Attempt)."""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import click

from simulsyn_core.exitcodes import ExitStatus, ToolError

from ..cliutil import EPILOG
from ..packets.reader import CaptureContents, read_capture
from .ladder import draw
from .tcp import Attempt, find_attempts

UTC = datetime.timezone.utc  # noqa: UP017 (datetime.UTC needs Python 3.11)


@dataclass(frozen=True)
class FileAnalysis:
    path: str
    contents: CaptureContents | None  # None: not even opened
    attempts: tuple[Attempt, ...]
    skipped_segments: int  # TCP segments of connections opened before the capture
    problem: str | None  # why this file gets exit code 7, if it does


def analyze_bytes(path: str, data: bytes) -> FileAnalysis:
    """Pure: a capture's bytes to its attempts, and what is wrong with it if anything."""
    contents = read_capture(data)
    attempts, skipped = find_attempts(contents)
    problem = None
    if contents.damage is not None:
        problem = contents.damage
        if contents.frames:
            problem += f" (the {contents.frames} packet(s) before it were analysed)"
    elif not contents.segments:
        problem = (f"no TCP in its {contents.frames} packet(s): nothing to analyse"
                   if contents.frames else "a capture with no packets: nothing to analyse")
    elif not attempts:
        problem = (f"{len(contents.segments)} TCP segment(s) but no connection opening (no "
                   "SYN): the capture began after its connections opened")
    return FileAnalysis(path, contents, tuple(attempts), skipped, problem)


def analyze_file(path: str) -> FileAnalysis:
    """``path`` "-" reads standard input (tcpdump -w - | synprobe analyze -)."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as capture:
                data = capture.read()
    except OSError as exc:
        return FileAnalysis(path, None, (), 0, f"cannot read it: {exc.strerror or exc}")
    return analyze_bytes(path, data)


def utc(time: float) -> str:
    moment = datetime.datetime.fromtimestamp(time, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def attempt_json(attempt: Attempt, path: str, number: int) -> dict[str, Any]:
    t0 = attempt.first_packet_time
    arrows = [{"frame": a.event.frame, "t_ms": round((a.event.time - t0) * 1000, 3),
               "from": a.event.sender, "label": a.event.label, "delivered": a.delivered,
               "note": a.note}
              for step in attempt.steps for a in step.arrows]
    final = attempt.steps[-1].states_after if attempt.steps else ("CLOSED", "CLOSED")
    return {
        "file": path, "number": number, "endpoints": list(attempt.endpoints),
        "kind": attempt.kind, "established": attempt.established,
        "first_packet_time": t0, "first_packet_utc": utc(t0),
        "vantage": attempt.vantage, "vantage_point": attempt.vantage_point,
        "views": [list(v) for v in attempt.views], "listener": attempt.listener,
        "packets": attempt.packets, "arrows": arrows,
        "final_states": {"A": final[0], "B": final[1]},
        "anomalies": list(attempt.anomalies), "diagram": draw(attempt),
    }


def file_json(result: FileAnalysis) -> dict[str, Any]:
    contents = result.contents
    return {
        "file": result.path, "format": contents.fmt if contents else None,
        "packets": contents.frames if contents else 0,
        "tcp_segments": len(contents.segments) if contents else 0,
        "icmp_errors": len(contents.icmp_errors) if contents else 0,
        "attempts": len(result.attempts), "skipped_segments": result.skipped_segments,
        "error": result.problem,
    }


def render_json(results: Sequence[FileAnalysis]) -> str:
    connections = [attempt_json(a, r.path, n) for r in results
                   for n, a in enumerate(r.attempts, 1)]
    return json.dumps({"connections": connections, "files": [file_json(r) for r in results]},
                      indent=2)


def render_text(results: Sequence[FileAnalysis], diagrams: bool = True) -> str:
    from tabulate import tabulate

    out: list[str] = []
    for result in results:
        contents = result.contents
        if contents is None or not result.attempts:
            continue
        out.append(f"{result.path}: {contents.fmt}, {contents.frames} packet(s), "
                   f"{len(result.attempts)} connection attempt(s)"
                   + (f", {result.skipped_segments} segment(s) of connections opened before "
                      "the capture skipped" if result.skipped_segments else ""))
        rows = [(n, f"{a.endpoints[0]} -> {a.endpoints[1]}", a.kind,
                 "yes" if a.established else "no", utc(a.first_packet_time), a.packets,
                 a.vantage_point)
                for n, a in enumerate(result.attempts, 1)]
        out.append(tabulate(rows, headers=["#", "A -> B (A sent the first SYN)", "kind",
                                           "established", "first packet (UTC)", "packets",
                                           "seen at"]))
        if diagrams:
            for n, attempt in enumerate(result.attempts, 1):
                out.append("")
                out.append(f"#{n} {attempt.kind}: A {attempt.endpoints[0]} (left), "
                           f"B {attempt.endpoints[1]} (right)")
                out.append(f"   seen at: {attempt.vantage}")
                for view in attempt.views[1:] if len(attempt.views) > 1 else ():
                    out.append(f"   also seen as: A {view[0]}, B {view[1]}")
                for note in attempt.anomalies:
                    out.append(f"   note: {note}")
                out.append(draw(attempt))
        out.append("")
    return "\n".join(out).rstrip("\n")


@click.command("analyze", epilog=EPILOG)
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"connections": [...], "files": [...]} on stdout.')
@click.option("--brief", is_flag=True, help="The table only, no ladder diagrams.")
def analyze(files: tuple[str, ...], as_json: bool, brief: bool) -> None:
    """Explain every TCP connection attempt in pcap/pcapng FILEs ("-": stdin).

    \b
    Each attempt (one 4-tuple, one opening) is classified as it looks from where
    the capture was taken:
      three-way          SYN, SYN+ACK, ACK
      simultaneous-open  both SYNs sent before either arrived
      syn-dropped        one SYN got no answer; the other side's SYN then reached
                         it and it answered SYN+ACK
      syn-rejected       a SYN answered by RST or an ICMP error
      incomplete         never ESTABLISHED otherwise
      primed             a TTL-limited SYN (ttl <= 16) died on the way with an ICMP
                         time-exceeded: punch's prime strategy opening its own NAT's
                         hole (established if the peer's SYN then met that socket)
    and drawn as a ladder: side A (the first SYN's sender) left, B right, both
    sides' states, one arrow per packet with its time (ms) and frame number.
    A capture taken at several points (e.g. tcpdump -i any on a NAT) is matched
    by ports and ISN: one connection, each packet drawn once.

    \b
    "seen at" (vantage_point), guessed from the TTLs and the addresses:
      host-a / host-b  at that side's host or on its LAN (its packets unrouted)
      path             between them: a NAT's public side, a router
      several          the same connection under several address pairs
      local            both sides on one host (loopback)
      unknown          nothing to count hops on (only a TTL-limited SYN)

    \b
    JSON keys per connection: file, number, endpoints, kind, established,
    first_packet_time, first_packet_utc, vantage, vantage_point, views, listener,
    packets, arrows, final_states, anomalies, diagram.
    A damaged, truncated or non-capture file, or one with no TCP opening, exits
    7 with one line on stderr (what could be read is still shown).
    """
    results = [analyze_file(path) for path in files]
    if as_json:
        click.echo(render_json(results))
    else:
        text = render_text(results, diagrams=not brief)
        if text:
            click.echo(text)
    problems = [f"{r.path}: {r.problem}" for r in results if r.problem]
    for message in problems[:-1]:
        click.echo(f"synprobe: {message}", err=True)
    if problems:
        raise ToolError(ExitStatus.BAD_INPUT, problems[-1])
