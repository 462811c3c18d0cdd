"""`synprobe analyze FILE...`: every TCP connection attempt in a capture, how it opened,
and its ladder diagram. The table/text form and the --json form are rendered here from
the same records (tcp.Attempt)."""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import click

from simulsyn_core._internal.exitcodes import ExitStatus, ToolError

from ..cliutil import EPILOG
from ..packets.reader import CaptureContents, Source, read_capture
from ..schema import SCHEMA_VERSION
from .ladder import draw
from .tcp import Attempt, Opening, attempt_of, find_openings

UTC = datetime.timezone.utc  # noqa: UP017 (datetime.UTC needs Python 3.11)


class Attempts(Sequence[Attempt]):
    """A file's attempts, by first packet, each replayed when it is asked for and not
    kept: only the openings' packets are held (a capture of 100,000 SYNs is 100,000
    attempts)."""

    def __init__(self, openings: Sequence[Opening]) -> None:
        self._openings = openings

    def __len__(self) -> int:
        return len(self._openings)

    @overload
    def __getitem__(self, index: int) -> Attempt: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Attempt]: ...

    def __getitem__(self, index: int | slice) -> Attempt | Sequence[Attempt]:
        if isinstance(index, slice):
            return Attempts(self._openings[index])
        return attempt_of(self._openings[index])

    def __iter__(self) -> Iterator[Attempt]:
        for opening in self._openings:
            yield attempt_of(opening)


@dataclass(frozen=True)
class FileAnalysis:
    path: str
    contents: CaptureContents | None  # None: not even opened
    attempts: Sequence[Attempt]
    skipped_segments: int  # TCP segments of connections opened before the capture
    problem: str | None  # why this file gets exit code 7, if it does


def analyze_source(path: str, source: Source) -> FileAnalysis:
    """A capture (its bytes, or a binary stream read as it goes) to its attempts, and
    what is wrong with it if anything."""
    contents = read_capture(source)
    openings, skipped = find_openings(contents)
    problem = None
    if contents.damage is not None:
        problem = contents.damage
        if contents.frames:
            problem += f" (the {contents.frames} packet(s) before it were analysed)"
    elif not contents.segments:
        problem = (f"no TCP in its {contents.frames} packet(s): nothing to analyse"
                   if contents.frames else "a capture with no packets: nothing to analyse")
    elif not openings:
        problem = (f"{len(contents.segments)} TCP segment(s) but no connection opening (no "
                   "SYN): the capture began after its connections opened")
    return FileAnalysis(path, contents, Attempts(openings), skipped, problem)


def analyze_bytes(path: str, data: bytes) -> FileAnalysis:
    """Pure: a capture's bytes to its attempts, and what is wrong with it if anything."""
    return analyze_source(path, data)


def analyze_file(path: str) -> FileAnalysis:
    """``path`` "-" reads standard input (tcpdump -w - | synprobe analyze -). The file is
    read as it is decoded: a file that is not a capture is refused after its first bytes."""
    try:
        if path == "-":
            return analyze_source(path, sys.stdin.buffer)
        with open(path, "rb") as capture:
            return analyze_source(path, capture)
    except OSError as exc:
        return FileAnalysis(path, None, (), 0, f"cannot read it: {exc.strerror or exc}")


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


_encode_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def _json(value: Any, level: int) -> str:
    """json.dumps(value, indent=2) as it writes ``value`` ``level`` levels down, for the
    types a connection holds. json's indenting encoder is pure Python and took most of
    the --json time of a capture of 100,000 attempts; this is the same text, faster."""
    if isinstance(value, str):
        return str(_encode_string(value))
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return json.dumps(value)
    inner = "\n" + "  " * (level + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        return ("{" + inner + ("," + inner).join(
            f"{_encode_string(key)}: {_json(item, level + 1)}" for key, item in value.items())
            + "\n" + "  " * level + "}")
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        return ("[" + inner + ("," + inner).join(_json(item, level + 1) for item in value)
                + "\n" + "  " * level + "]")
    return json.dumps(value, indent=2).replace("\n", "\n" + "  " * level)


def _json_list(key: str, items: Iterable[dict[str, Any]]) -> Iterator[str]:
    """``"key": [...]`` exactly as json.dumps(..., indent=2) writes it one level down,
    an item at a time."""
    yield f'  "{key}": ['
    empty = True
    for item in items:
        yield ("\n    " if empty else ",\n    ") + _json(item, 2)
        empty = False
    yield "]" if empty else "\n  ]"


def json_chunks(results: Iterable[FileAnalysis]) -> Iterator[str]:
    """render_json's text in pieces, one connection at a time; each file is analysed (if
    ``results`` is lazy) and dropped before the next."""
    files: list[dict[str, Any]] = []

    def connections() -> Iterator[dict[str, Any]]:
        for result in results:
            files.append(file_json(result))
            for number, attempt in enumerate(result.attempts, 1):
                yield attempt_json(attempt, result.path, number)

    yield f'{{\n  "schema_version": "{SCHEMA_VERSION}",\n'
    yield from _json_list("connections", connections())
    yield ",\n"
    yield from _json_list("files", files)
    yield "\n}"


def render_json(results: Sequence[FileAnalysis]) -> str:
    return "".join(json_chunks(results))


HEADERS = ("#", "A -> B (A sent the first SYN)", "kind", "established", "first packet (UTC)",
           "packets", "seen at")
NUMERIC = (True, False, False, False, False, True, False)  # right-aligned columns


def table_lines(rows: Callable[[], Iterable[Sequence[object]]]) -> Iterator[str]:
    """The table as tabulate's "simple" format draws it (numbers right, text left, a
    column two wider than its heading at least, trailing spaces cut), for any number of
    rows: ``rows()`` is called twice (widths, then lines) rather than the rows kept."""
    widths = [len(h) + 2 for h in HEADERS]
    for row in rows():
        widths = [max(w, len(str(cell))) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Iterable[object]) -> str:
        return "  ".join(str(c).rjust(w) if right else str(c).ljust(w)
                         for c, w, right in zip(cells, widths, NUMERIC, strict=True)).rstrip()

    yield line(HEADERS)
    yield "  ".join("-" * w for w in widths)
    for row in rows():
        yield line(row)


def text_lines(result: FileAnalysis, diagrams: bool = True) -> Iterator[str]:
    """One file's part of the text form, a line (or a diagram) at a time: its heading,
    the table, and each attempt's diagram. Nothing for a file without attempts."""
    contents = result.contents
    if contents is None or not result.attempts:
        return
    yield (f"{result.path}: {contents.fmt}, {contents.frames} packet(s), "
           f"{len(result.attempts)} connection attempt(s)"
           + (f", {result.skipped_segments} segment(s) of connections opened before "
              "the capture skipped" if result.skipped_segments else ""))
    # The table's columns, kept per attempt in one flat list of references to what the
    # packets already hold (the replay is not kept: it is done again for the diagrams).
    verdicts: dict[tuple[str, bool, str], int] = {}
    summary: list[Any] = []
    for a in result.attempts:
        verdict = verdicts.setdefault((a.kind, a.established, a.vantage_point), len(verdicts))
        summary += (a.endpoints[0], a.endpoints[1], verdict, a.first_packet_time, a.packets)
    names = list(verdicts)

    def rows() -> Iterator[tuple[object, ...]]:
        for n, at in enumerate(range(0, len(summary), 5), 1):
            a, b, verdict, first, packets = summary[at:at + 5]
            kind, established, seen_at = names[verdict]
            yield (n, f"{a} -> {b}", kind, "yes" if established else "no", utc(first),
                   packets, seen_at)

    yield from table_lines(rows)
    del summary[:]
    if diagrams:
        for n, attempt in enumerate(result.attempts, 1):
            yield ""
            yield (f"#{n} {attempt.kind}: A {attempt.endpoints[0]} (left), "
                   f"B {attempt.endpoints[1]} (right)")
            yield f"   seen at: {attempt.vantage}"
            for view in attempt.views[1:] if len(attempt.views) > 1 else ():
                yield f"   also seen as: A {view[0]}, B {view[1]}"
            for note in attempt.anomalies:
                yield f"   note: {note}"
            yield draw(attempt)


def text_chunks(results: Iterable[FileAnalysis], diagrams: bool = True) -> Iterator[str]:
    """render_text's text in pieces, each ending with its newline; a blank line between
    files. Each file is analysed (if ``results`` is lazy) and dropped before the next."""
    first = True
    for result in results:
        lines = text_lines(result, diagrams)
        for n, line in enumerate(lines):
            if n == 0 and not first:
                yield "\n"
            first = False
            yield line + "\n"


def render_text(results: Sequence[FileAnalysis], diagrams: bool = True) -> str:
    return "".join(text_chunks(results, diagrams)).rstrip("\n")


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
    # One file at a time, written as it is rendered: only the file being written is
    # held, and only its openings' packets.
    problems: list[str] = []

    def results() -> Iterator[FileAnalysis]:
        for path in files:
            result = analyze_file(path)
            if result.problem:
                problems.append(f"{path}: {result.problem}")
            yield result

    chunks = json_chunks(results()) if as_json else text_chunks(results(), not brief)
    for chunk in chunks:
        click.echo(chunk, nl=False)
    if as_json:
        click.echo("")
    for message in problems[:-1]:
        click.echo(f"synprobe: {message}", err=True)
    if problems:
        raise ToolError(ExitStatus.BAD_INPUT, problems[-1])
