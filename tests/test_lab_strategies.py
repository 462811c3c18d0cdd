"""The strategies through the lab: what auto chooses from what the broker knows of both
NATs (its --syn-probe, or the peers' last nat-check), each strategy forced, the
no-broker order (--first/--second, --ttl), and the pairs refused at once.

What each profile's NAT does to an unsolicited SYN is written here by hand from its
rules (synprobe/lab/profiles.py), never from the code under test.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess

import pytest

from synprobe import lab as labmod
from tests.test_lab_punch import ENDING_S, REFUSED_WITHIN_S, TIMEOUT_S, expectation

pytestmark = pytest.mark.lab

# The NAT (or the host behind a DMZ NAT) answers an unsolicited SYN: RST or ICMP.
ANSWERS = {"original", "reject-rst", "reject-icmp-port", "reject-icmp-admin", "dmz"}
# Every other profile drops it silently (home, home-nft, syn-sent-5s, firewall, carrier,
# syn-drop-all, random).
PAIRS = [(a, b, first) for a, b in itertools.product(labmod.PROFILES, repeat=2)
         for first in ("a", "b")]
MSGS = ("hello from A\n", "hello from B\n")


def auto_choice(a: str, b: str) -> tuple[str, str | None]:
    """(strategy, the side with role second or None) a --syn-probe broker must choose."""
    rejects = [p in ANSWERS for p in (a, b)]
    if not any(rejects):
        return "sync", None  # an early SYN is dropped silently on both sides: no harm
    if all(rejects):
        return "prime", None  # neither may meet an early SYN: both hole first
    return "order", "a" if rejects[0] else "b"  # the answering side sends first


def _diag(lab: labmod.Lab, run_a: labmod.PeerRun, run_b: labmod.PeerRun, what: str) -> str:
    return (f"{what}\nA rc={run_a.returncode} stdout={run_a.stdout!r}\nstderr={run_a.stderr!r}"
            f"\nB rc={run_b.returncode} stdout={run_b.stdout!r}\nstderr={run_b.stderr!r}"
            f"\nconntrack A:\n{lab.conntrack('a')}\nconntrack B:\n{lab.conntrack('b')}")


def assert_chatted(lab: labmod.Lab, run_a: labmod.PeerRun, run_b: labmod.PeerRun,
                   what: str) -> None:
    diag = _diag(lab, run_a, run_b, what)
    assert max(run_a.elapsed_s, run_b.elapsed_s) < TIMEOUT_S + ENDING_S, diag
    for run, peer_msg in ((run_a, MSGS[1]), (run_b, MSGS[0])):
        assert run.returncode == 0 and run.report is not None, diag
        assert run.report["established"] is True and run.report["error"] is None, diag
        assert run.chat_lines == [peer_msg.strip()], diag


@pytest.mark.parametrize("profile_a, profile_b, first", PAIRS,
                         ids=[f"{a}-{b}-{f}first" for a, b, f in PAIRS])
def test_auto_with_a_syn_probing_broker(make_lab, profile_a: str, profile_b: str,
                                        first: str) -> None:
    """The broker probes each registering client's NAT with one SYN and chooses; every
    pair that can be traversed connects, whatever the choice."""
    lab = make_lab(profile_a, profile_b)
    labmod.start_broker(lab, ["--syn-probe"])
    run_a, run_b = labmod.punch_pair(lab, "auto", messages=MSGS, first=first,
                                     timeout_s=TIMEOUT_S, stagger_s=0.2)
    kind, why = expectation(profile_a, profile_b)
    diag = _diag(lab, run_a, run_b, f"expected {kind} ({why})")
    if kind == "refused":
        for run in (run_a, run_b):
            assert run.returncode == 5 and run.report is not None, diag
            assert run.report["error"].startswith("untraversable: "), diag
            assert run.elapsed_s < REFUSED_WITHIN_S, diag
        return
    strategy, second = auto_choice(profile_a, profile_b)
    for side, run in (("a", run_a), ("b", run_b)):
        assert run.report is not None and run.report["strategy"] == strategy, diag
        assert run.report["strategy_reason"], diag
        if second is not None:
            assert run.report["role"] == ("second" if side == second else "first"), diag
    if kind == "fail":
        assert (run_a.returncode, run_b.returncode) == (5, 5), diag
        return
    assert_chatted(lab, run_a, run_b, f"expected {kind} ({why}) with {strategy}")


FORCED = [("order", "reject-icmp-port", "home"), ("order", "home", "original"),
          ("order", "dmz", "syn-sent-5s"), ("sync", "home", "firewall"),
          ("sync", "carrier", "home-nft"), ("prime", "home", "home")]


@pytest.mark.parametrize("strategy, profile_a, profile_b", FORCED,
                         ids=[f"{s}-{a}-{b}" for s, a, b in FORCED])
@pytest.mark.parametrize("first", ["a", "b"])
def test_forced_strategy(make_lab, strategy: str, profile_a: str, profile_b: str,
                         first: str) -> None:
    """--strategy on both sides runs that strategy (the broker knows the NATs here: with
    order, the side whose NAT answers sends first)."""
    lab = make_lab(profile_a, profile_b)
    labmod.start_broker(lab, ["--syn-probe"])
    run_a, run_b = labmod.punch_pair(lab, "forced", messages=MSGS, first=first,
                                     timeout_s=TIMEOUT_S, stagger_s=0.2,
                                     args=["--strategy", strategy])
    diag = _diag(lab, run_a, run_b, f"--strategy {strategy}")
    for run in (run_a, run_b):
        assert run.report is not None and run.report["strategy"] == strategy, diag
    assert_chatted(lab, run_a, run_b, f"--strategy {strategy}")
