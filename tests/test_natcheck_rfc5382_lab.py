"""nat-check --rfc5382 in the NAT lab: every profile's requirement table equals the one
written by hand from its rules (tests/natcheck_expected.py, RFC5382).

Each pair of profiles gets its own lab, and both sides check at once (REQ-4's watch is
7 s of waiting, not of CPU); the pairs spread over the xdist workers. Every JSON printed
is checked against docs/schema/natcheck.schema.json.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from synprobe import lab as labmod
from synprobe.natcheck import protocol as P
from synprobe.packets.seen import seen_from_pcap
from tests import schemas
from tests.helpers import communicate_within
from tests.natcheck_expected import (
    ANSWERS_AT_ONCE,
    ANSWERS_LATE,
    RFC5382,
    RFC5382_EXTRA,
    SERVER,
)

pytestmark = pytest.mark.lab

CHECK_TIMEOUT_S = 40.0  # REQ-4's 7 s watch, syn-sent-5s's 8 s timers, a cold scapy import
PAIRS = [("home", "original"), ("home-nft", "reject-rst"),
         ("reject-icmp-port", "reject-icmp-admin"), ("random", "syn-drop-all"),
         ("syn-sent-5s", "firewall"), ("dmz", "carrier"), ("rfc5382", "late-icmp")]


def test_every_profile_has_a_hand_written_table() -> None:
    assert {p for pair in PAIRS for p in pair} == set(RFC5382) == set(labmod.PROFILES)
    rows = RFC5382.values()
    # the demands: someone fails each of these, and one profile passes them all
    for req in ("REQ-1", "REQ-3", "REQ-4", "REQ-8"):
        assert any(t[req] == "fail" for t in rows), req
    assert any(all(t[r] == "pass" for r in ("REQ-1", "REQ-3", "REQ-4", "REQ-8", "REQ-8a"))
               for t in rows)


def _run_checks(lab: labmod.Lab, tmp: Path) -> dict[str, dict[str, Any]]:
    """Both sides' nat-check --rfc5382 --json at once; their output, pcap and rules."""
    labmod.start_broker(lab, extra=["--probe", "-q"])
    procs = {}
    for side, profile in (("a", lab.profile_a), ("b", lab.profile_b)):
        argv = [*labmod.SYNPROBE, "nat-check", "--server", SERVER, "--json", "--rfc5382",
                "--port-samples", "0", "--pcap", str(tmp / f"{side}.pcap"),
                *RFC5382_EXTRA.get(profile, [])]
        env = {**os.environ, "SYNPROBE_STATE_DIR": str(tmp / f"state-{side}")}
        procs[side] = lab.popen("h" + side, argv, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    runs = {}
    for side, proc in procs.items():
        out, err = communicate_within(proc, CHECK_TIMEOUT_S)
        rules = lab.run("h" + side, ["iptables", "-S"], check=True).stdout
        runs[side] = {"rc": proc.returncode, "stderr": err.decode(errors="replace"),
                      "json": schemas.loads("nat-check", out) if out.strip() else None,
                      "pcap": tmp / f"{side}.pcap",
                      "rules_left": [r for r in rules.splitlines() if "synprobe-natcheck" in r]}
    return runs


@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_rfc5382_table_equals_the_hand_written_one(
        make_lab: Callable[..., labmod.Lab], tmp_path: Path, pair: tuple[str, str]) -> None:
    lab = make_lab(*pair)
    runs = _run_checks(lab, tmp_path)
    for side, profile in zip("ab", pair, strict=True):
        run = runs[side]
        assert run["rc"] == 0 and run["json"] is not None, run["stderr"]
        report = run["json"]
        rfc = report["rfc5382"]
        got = {r["req"]: r["status"] for r in rfc["requirements"]}
        reasons = {r["req"]: r["reason"] for r in rfc["requirements"]}
        assert got == RFC5382[profile], f"{profile}: {reasons}"
        assert rfc["asked"] is True
        assert rfc["failed"] == [r for r, s in RFC5382[profile].items() if s == "fail"]
        for req in rfc["failed"]:  # the verdict cites every failing REQ
            assert req in report["verdict"], report["verdict"]
        assert run["rules_left"] == [], "nat-check left firewall rules on the host"
        _check_req4_timing(profile, report)
        if "--no-hairpin" in RFC5382_EXTRA.get(profile, []):
            _check_no_hairpin(report, run["pcap"])


def _check_req4_timing(profile: str, report: dict[str, Any]) -> None:
    """REQ-4 is about when the answer comes: at once is a violation, none is 4a."""
    after = report["unsolicited_syn_after_ms"]
    req4 = next(r for r in report["rfc5382"]["requirements"] if r["req"] == "REQ-4")
    if profile in ANSWERS_AT_ONCE:
        assert report["unsolicited_syn"] == ANSWERS_AT_ONCE[profile]
        assert after is not None and 0 <= after < P.REQ4_SILENCE_S * 1000, after
        assert f"after {after} ms" in req4["reason"], req4
    elif profile in ANSWERS_LATE:
        answer, hold_ms = ANSWERS_LATE[profile]
        assert report["unsolicited_syn"] == answer  # seen in the 7 s watch
        assert after is not None and hold_ms <= after < hold_ms + 700, after
        assert "dropped silently" in req4["reason"], req4  # the followed SYN
    elif profile != "firewall":
        assert after is None, after  # dropped (or forwarded to the host): no answer
        assert "watched 7000 ms" in " ".join(req4["evidence"]), req4


def _check_no_hairpin(report: dict[str, Any], pcap: Path) -> None:
    """--no-hairpin: not one SYN to our own public endpoint, and the rows say why."""
    seen = seen_from_pcap(pcap.read_bytes())
    assert seen and not any(s.is_syn and s.seq == P.Seq.HAIRPIN for s in seen)
    assert report["hairpin"] is None and "--no-hairpin" in report["reasons"]["hairpin"]
    assert report["probes"]["hairpin_port"] is None
