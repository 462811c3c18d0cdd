"""analyze on captures taken live by tcpdump in the NAT lab (not written by synprobe): each
scenario at the hosts, at a NAT's inside and public side, and on a NAT with -i any."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from synprobe import lab as labmod
from synprobe.analyze.command import analyze_file
from synprobe.analyze.ladder import draw, ladder_only
from tests.make_captures import SCENARIOS, Recording, record
from tests.test_analyze import README_DRAWINGS

pytestmark = pytest.mark.lab


TRIES = 3


def _record(make_lab: Callable[..., labmod.Lab], name: str, tmp_path: Path) -> Recording:
    """Record the scenario in a fresh lab. Its processes act at set moments; one that acted
    late (a loaded machine) means the scenario did not happen: recorded again, and after
    TRIES a failure that says so, never an analyze result compared with the wrong opening."""
    scenario = SCENARIOS[name]
    problems: list[str] = []
    for attempt in range(TRIES):
        lab = make_lab(scenario.profile_a, scenario.profile_b)
        out = tmp_path / f"try{attempt}"
        out.mkdir()
        rec = record(lab, scenario, out)
        problems = rec.timing_problems()
        if not problems:
            return rec
    pytest.fail(f"scenario {name} did not happen as planned in {TRIES} tries (timing, not "
                f"analyze): {'; '.join(problems)}", pytrace=False)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_live_capture_at_every_point_is_classified(make_lab: Callable[..., labmod.Lab],
                                                   tmp_path: Path, name: str) -> None:
    rec = _record(make_lab, name, tmp_path)
    scenario = rec.scenario
    got = {}
    for point, path in rec.files.items():
        result = analyze_file(str(path))
        assert result.problem is None, (point, result.problem, rec.peers)
        got[point] = [a.kind for a in result.attempts]
    assert got == {p: [kind] for p, kind in scenario.expect.items()}, rec.peers
    if scenario.readme is not None:
        (attempt,) = analyze_file(str(rec.files[scenario.reference])).attempts
        assert ladder_only(draw(attempt)) == README_DRAWINGS[scenario.readme]
    # The NAT's -i any capture holds the inside and the outside: one connection, two views.
    (on_nat,) = analyze_file(str(rec.files["ga-any"])).attempts
    assert on_nat.vantage_point == "several" and len(on_nat.views) == 2


def test_captures_of_both_hosts_merged_are_one_connection(
        make_lab: Callable[..., labmod.Lab], tmp_path: Path) -> None:
    """The hosts see different addresses (each NAT translates its own side): matched by
    ports and ISN, each packet drawn once."""
    if shutil.which("mergecap") is None:
        pytest.fail("mergecap (Debian: wireshark-common, with tshark) is needed")
    rec = _record(make_lab, "simultaneous-open", tmp_path)
    merged = tmp_path / "both-hosts.pcap"
    subprocess.run(["mergecap", "-F", "pcap", "-w", str(merged), str(rec.files["ha"]),
                    str(rec.files["hb"])], check=True, timeout=30)
    (attempt,) = analyze_file(str(merged)).attempts
    assert attempt.kind == "simultaneous-open" and attempt.established
    assert set(attempt.views) == {("10.1.0.2:40100", "203.0.113.2:40100"),
                                  ("198.51.100.2:40100", "10.2.0.2:40100")}
    # Seen at two hosts, the crossing SYN+ACKs' order is a matter of microseconds: the
    # same states, and the same arrows between each two state lines.
    assert steps_of(ladder_only(draw(attempt))) == steps_of(README_DRAWINGS["simultaneous-open"])


def steps_of(ladder: str) -> list[tuple[str, ...]]:
    """A ladder as its state lines, each followed by the sorted lines drawn before the next."""
    steps: list[tuple[str, ...]] = []
    between: list[str] = []
    for line in ladder.splitlines():
        if "|" in line:
            between.append(line)
        else:
            steps.append(tuple(sorted(between)))
            steps.append((line,))
            between = []
    return steps
