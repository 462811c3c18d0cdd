"""Where synprobe keeps what a bug report needs: the last nat-check result and the pcaps
it recorded, each with the command line that made it.

The directory is ``$SYNPROBE_STATE_DIR`` if set, else ``$XDG_STATE_HOME/synprobe``, else
``~/.local/state/synprobe`` (XDG Base Directory spec: "state data that should persist
between restarts"). Only what these functions write goes there; ``synprobe report``
bundles it and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulsyn_core._internal.client import NatFacts, facts_from_natcheck

NATCHECK_FILE = "natcheck-last.json"
PCAP_INDEX_FILE = "pcaps.jsonl"
MAX_RECORDED_PCAPS = 20  # the index keeps the newest entries only


@dataclass(frozen=True)
class RecordedPcap:
    path: str  # absolute path of the pcap as written
    command: tuple[str, ...]  # the synprobe command line that wrote it
    time: float  # Unix time it was recorded


def state_dir() -> Path:
    explicit = os.environ.get("SYNPROBE_STATE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "synprobe"


def _command(argv: Sequence[str] | None) -> list[str]:
    words = list(sys.argv if argv is None else argv)
    if words and os.path.basename(words[0]) in ("synprobe", "__main__.py", "-m"):
        words[0] = "synprobe"
    return words


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_last_natcheck(result: dict[str, Any], argv: Sequence[str] | None = None) -> Path:
    """Keep ``result`` (nat-check's --json object) as the last nat-check, with its command.

    Returns the file written. ``argv`` defaults to ``sys.argv``.
    """
    record = {"command": _command(argv), "time": time.time(), "result": result}
    path = state_dir() / NATCHECK_FILE
    _write_atomically(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def load_last_natcheck() -> dict[str, Any] | None:
    """The record save_last_natcheck wrote ({"command", "time", "result"}), or None."""
    path = state_dir() / NATCHECK_FILE
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


NATCHECK_FACTS_MAX_AGE_S = 24 * 3600.0  # an older nat-check is not used by the punch


def last_natcheck_facts(now: float | None = None) -> NatFacts | None:
    """What the punch may use of the last nat-check (its --json result; the rules:
    simulsyn_core._internal.client.facts_from_natcheck). None if there is none, it failed, or it
    is over a day old. The punch uses it only when the broker sees it at the same public
    address."""
    record = load_last_natcheck()
    if record is None:
        return None
    try:
        age = (time.time() if now is None else now) - float(record.get("time", 0))
    except (TypeError, ValueError):
        return None
    if not 0 <= age <= NATCHECK_FACTS_MAX_AGE_S:
        return None
    result = record.get("result")
    return facts_from_natcheck(result, age) if isinstance(result, dict) else None


def record_pcap(path: str | os.PathLike[str], argv: Sequence[str] | None = None) -> None:
    """Remember that the tool wrote the pcap at ``path`` (the report bundles it)."""
    entry = {"path": os.path.abspath(os.fspath(path)), "command": _command(argv),
             "time": time.time()}
    entries = [e for e in _read_index() if e.path != entry["path"]]
    lines = [json.dumps({"path": e.path, "command": list(e.command), "time": e.time})
             for e in entries]
    lines.append(json.dumps(entry))
    _write_atomically(state_dir() / PCAP_INDEX_FILE,
                      "\n".join(lines[-MAX_RECORDED_PCAPS:]) + "\n")


def _read_index() -> list[RecordedPcap]:
    try:
        text = (state_dir() / PCAP_INDEX_FILE).read_text(encoding="utf-8")
    except OSError:
        return []
    found: list[RecordedPcap] = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
            found.append(RecordedPcap(str(item["path"]), tuple(str(w) for w in item["command"]),
                                      float(item["time"])))
        except (ValueError, KeyError, TypeError):
            continue  # a damaged line: skip it, keep the rest
    return found


def recorded_pcaps() -> list[RecordedPcap]:
    """The pcaps the tool recorded, oldest first, that still exist."""
    return [e for e in _read_index() if os.path.isfile(e.path)]
