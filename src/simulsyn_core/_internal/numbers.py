"""The one reader of numbers typed by a user or carried on the wire: ASCII digits only.

Python's int() and float() take any Unicode decimal digit ("٣" is 3, "３" is 3), "_"
between digits, surrounding whitespace, and float() takes "nan" and "inf": none of that
is a port, a count or a number of seconds. Everything that reads a number from text (the
click types of every command, Endpoint.parse, the wire protocol's fields) goes through
these.
"""

from __future__ import annotations

import math
import re

_INT_RE = re.compile(r"[0-9]+")
MAX_DIGITS = 4000  # int() refuses more than 4300 (CVE-2020-10735)
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def ascii_int(text: str, max_digits: int | None = None) -> int | None:
    """The value of ``text`` if it is ASCII digits only (at most ``max_digits`` of them,
    and fewer than Python's 4300), else None. No sign, no spaces, no "_"."""
    limit = MAX_DIGITS if max_digits is None else min(max_digits, MAX_DIGITS)
    if len(text) > limit or not _INT_RE.fullmatch(text):
        return None
    return int(text)


def parse_int(text: str) -> int:
    """An integer written in ASCII digits, with an optional "-" or "+". Raises ValueError
    (saying why) for anything else."""
    body = text[1:] if text[:1] in ("-", "+") else text
    value = ascii_int(body)
    if value is None:
        raise ValueError(f"{text!r} is not a whole number in ASCII digits (0-9)")
    return -value if text.startswith("-") else value


def parse_port(text: str, allow_zero: bool = False) -> int:
    """A TCP port in ASCII digits, 1-65535 (0-65535 with ``allow_zero``). Raises
    ValueError."""
    if not _INT_RE.fullmatch(text):
        raise ValueError(f"port {text!r} is not a number in ASCII digits (0-9)")
    value = ascii_int(text, max_digits=5)
    if value is None or not (0 if allow_zero else 1) <= value <= 65535:
        raise ValueError(f"port {text} out of range")
    return value


def parse_finite_float(text: str) -> float:
    """A finite number written in ASCII ("1", "0.5", "1e-3"): no NaN, no infinity, no
    other digits. Raises ValueError."""
    if len(text) > MAX_DIGITS or not _FLOAT_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a finite number in ASCII digits (0-9)")
    value = float(text)
    if not math.isfinite(value):  # "1e999"
        raise ValueError(f"{text!r} is not a finite number")
    return value


def finite(value: float) -> float:
    """``value`` if it is a finite float or int; ValueError for NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return float(value)


def has_foreign_digits(text: str) -> bool:
    """True if ``text`` holds a digit or number character other than ASCII 0-9 (a name
    resolver, IDNA, reads "１２７" as "127")."""
    return any(not c.isascii() and c.isnumeric() for c in text)
