"""The ladder diagram of one attempt, drawn as the original README draws TCP openings:
side A's state down the left, side B's down the right, one arrow per packet with its
flags, and (beyond the ladder) the time of every arrow and its frame number."""

from __future__ import annotations

import re

from ..packets.decode import FIN, RST
from .tcp import SIDES, Arrow, Attempt, Event, Step

LEFT, RIGHT = 5, 27  # the columns of the two vertical bars
ARROW = RIGHT - LEFT - 3  # characters between "| " and " |"
TIME_COL = 36
_TIME_RE = re.compile(r"\s+\d+\.\d{3} ms\b.*$")


def state_line(left: str, right: str) -> str:
    start_left = max(0, LEFT - (len(left) - 1) // 2)
    start_right = max(start_left + len(left) + 1, RIGHT - (len(right) - 1) // 2)
    return (" " * start_left + left).ljust(start_right) + right


def _between(text: str) -> str:
    return " " * LEFT + "| " + text + " |"


def event_line(side: str, text: str) -> str:
    return _between(text.ljust(ARROW) if side == "A" else text.rjust(ARROW))


def arrow_text(label: str, rightwards: bool, note: str = "") -> str:
    """``--------SYN------->`` or, for a packet that never arrived, ``----SYN-> (dropped)``.
    A label longer than the arrow allows is cut (the JSON arrows keep it whole)."""
    label = label[:ARROW - 2]
    dashes = min(4, ARROW - len(label) - len(note) - 5)
    if note and dashes >= 1:
        short = (f"{'-' * dashes}{label}-> ({note})" if rightwards
                 else f"({note}) <-{label}{'-' * dashes}")
        return short.ljust(ARROW) if rightwards else short.rjust(ARROW)
    fill = ARROW - 1 - len(label)
    if rightwards:
        return "-" * ((fill + 1) // 2) + label + "-" * (fill // 2) + ">"
    return "<" + "-" * (fill // 2) + label + "-" * ((fill + 1) // 2)


def _annotations(arrow: Arrow, fitted: bool) -> str:
    ev = arrow.event
    notes = [n for n in arrow.note.split(", ") if n and (not fitted or n == "retransmission")]
    if ev.is_icmp:
        notes.append(f"from {ev.reporter}")
    if ev.comment:
        notes.append(ev.comment)
    return "  " + "; ".join(notes) if notes else ""


def arrow_line(arrow: Arrow, t0: float) -> str:
    ev = arrow.event
    inside = "" if arrow.delivered else next(
        (n for n in arrow.note.split(", ") if n in ("dropped", "rejected", "lost")), "")
    text = arrow_text(ev.label, ev.sender == "A", inside)
    fitted = bool(inside) and f"({inside})" in text
    line = _between(text).ljust(TIME_COL)
    return f"{line}{(ev.time - t0) * 1000:10.3f} ms  #{ev.frame}{_annotations(arrow, fitted)}"


def _tail(tail: tuple[Event, ...], t0: float) -> str:
    with_data = sum(1 for e in tail if e.payload)
    fins = sorted({e.sender for e in tail if not e.is_icmp and e.flags & FIN})
    rsts = sorted({e.sender for e in tail if not e.is_icmp and e.flags & RST})
    parts = [f"{with_data} with data"]
    if fins:
        parts.append("FIN from " + " and ".join(fins))
    if rsts:
        parts.append("RST from " + " and ".join(rsts))
    return (f"(then {len(tail)} more packet(s) to {(tail[-1].time - t0) * 1000:.3f} ms: "
            + ", ".join(parts) + ")")


def draw(attempt: Attempt) -> str:
    """The whole diagram (no trailing newline)."""
    t0 = attempt.first_packet_time
    lines = [state_line("CLOSED", "CLOSED")]
    if attempt.listener is not None:
        lines.append(event_line(attempt.listener, "(listen)"))
        states = ["CLOSED", "CLOSED"]
        states[SIDES.index(attempt.listener)] = "LISTEN"
        lines.append(state_line(*states))
    for step in attempt.steps:
        lines.extend(_step_lines(step, t0))
    if attempt.tail:
        lines.append(_tail(attempt.tail, t0))
    return "\n".join(lines)


def _step_lines(step: Step, t0: float) -> list[str]:
    lines = [event_line(side, "(connect)") for side in step.connects]
    if step.connects:
        lines.append(state_line(*step.states_before))
    lines.extend(arrow_line(arrow, t0) for arrow in step.arrows)
    lines.append(state_line(*step.states_after))
    return lines


def ladder_only(diagram: str) -> str:
    """The diagram without times, frame numbers, notes and the summary line: the part to
    compare with the original README's drawings."""
    kept = [_TIME_RE.sub("", line).rstrip() for line in diagram.splitlines()
            if not line.startswith("(then ")]
    return "\n".join(kept)
