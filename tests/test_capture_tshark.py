"""Every capture the project ships or writes opens in tshark (exit 0). The files written at
run time are checked where they are made: punch --pcap in test_capture.py and
test_capture_lab.py, the report's copies in test_report.py, nat-check --pcap in
test_natcheck_lab.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_capture import _tshark

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
SHIPPED = sorted(p for p in CAPTURES.rglob("*") if p.suffix in (".pcap", ".pcapng"))


def test_captures_are_shipped() -> None:
    assert len([p for p in SHIPPED if p.parent == CAPTURES]) >= 7


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CAPTURES)))
def test_shipped_capture_opens_in_tshark(path: Path) -> None:
    lines = _tshark(path).stdout.splitlines()
    assert lines, f"tshark shows no packet in {path}"
