"""Punch between every pair of NAT profiles, in both orders of start, through the lab.

Each pair's outcome is asserted: connected with a chat message each way, or a clear
failure (exit 5 with a JSON error) inside the timeout. With the default strategy (auto:
prime through a synprobe broker) there is no "either": every pair connects except those
that no punch can traverse, stated with the reason in ``expectation()``.
"""

from __future__ import annotations

import itertools

import pytest

from synprobe import lab as labmod

TIMEOUT_S = 4.0
# Birthday pairs without facts (TTL-limited sockets first, held until the guesses are out):
# a match whose first SYN+ACK died is resent on the SYN's timer, 3 s after the SYN at
# worst, then the path check and the PAKE.
BIRTHDAY_TIMEOUT_S = 7.0
ENDING_S = 1.5  # after connected or given up: a chat line each way, the FINs, exiting


REFUSED_WITHIN_S = 2.0  # an untraversable pair is told so within this


def expectation(a: str, b: str) -> tuple[str, str]:
    """("connect" | "refused" | "fail", why) for host A behind a and host B behind b."""
    pair = {a, b}
    if a == b == "random":
        return "refused", ("MASQUERADE --random-fully on both sides gives each destination "
                           "another public port: the broker sees two ports through its two "
                           "addresses from each, and refuses the pair at once (neither side "
                           "has a port the other can aim at)")
    if "random" in pair:
        return "connect", ("birthday: the random side opens 700 sockets (its NAT gives each "
                           "a random port), the other sends 700 guesses of those ports from "
                           "its one port; Linux's hot band guessed first, p > 0.999999")
    if a == b == "syn-drop-all":
        return "fail", "both NATs drop every inbound SYN, replies to their own SYNs included"
    return "connect", ("both sides prime: each opens its own NAT's hole with a TTL-limited SYN "
                       "whose socket stays in SYN-SENT; only then does a full SYN leave, so "
                       "none meets a NAT (RST, ICMP, DMZ host) before its own host's hole "
                       "(syn-drop-all: the other side's SYN+ACK, not a bare SYN, passes)")


PAIRS = [(a, b, first) for a, b in itertools.product(labmod.PUNCH_PROFILES, repeat=2)
         for first in ("a", "b")]
# Link delay setting (b) of the adaptive-punch issue: the broker 50 +- 10 ms away, the
# peers 0.5 ms from the router (a LAN, a campus): the RTT to the broker dwarfs the peers'.
FAR_BROKER = labmod.LinkDelays(a=0.0005, b=0.0005, broker=0.05, jitter_s=0.01)
HARD = {"original", "reject-rst", "reject-icmp-port", "reject-icmp-admin", "dmz"}
FAR_BROKER_PAIRS = [(a, b, first) for a, b, first in PAIRS
                    if {a, b} & HARD and expectation(a, b)[0] == "connect"]


def test_every_profile_pair_has_an_expectation_with_a_reason() -> None:
    kinds = {expectation(a, b)[0] for a, b, _ in PAIRS}
    assert kinds == {"connect", "refused", "fail"}
    assert all(expectation(a, b)[1] for a, b, _ in PAIRS)
    must = [(a, b) for a, b, _ in PAIRS if expectation(a, b)[0] == "connect"]
    assert ("home", "home") in must and ("firewall", "syn-drop-all") in must


@pytest.mark.lab
@pytest.mark.parametrize("profile_a, profile_b, first", PAIRS,
                         ids=[f"{a}-{b}-{f}first" for a, b, f in PAIRS])
def test_punch_pair(make_lab, profile_a: str, profile_b: str, first: str) -> None:
    check_pair(make_lab(profile_a, profile_b), profile_a, profile_b, first)


@pytest.mark.lab
@pytest.mark.parametrize("profile_a, profile_b, first", FAR_BROKER_PAIRS,
                         ids=[f"{a}-{b}-{f}first" for a, b, f in FAR_BROKER_PAIRS])
def test_punch_pair_far_broker(make_lab, profile_a: str, profile_b: str, first: str) -> None:
    check_pair(make_lab(profile_a, profile_b, FAR_BROKER), profile_a, profile_b, first)


def check_pair(lab: labmod.Lab, profile_a: str, profile_b: str, first: str) -> None:
    kind, why = expectation(profile_a, profile_b)
    labmod.start_broker(lab)
    msgs = (f"hello from A behind {profile_a} é\n", f"hello from B behind {profile_b}\n")
    timeout_s = BIRTHDAY_TIMEOUT_S if "random" in (profile_a, profile_b) else TIMEOUT_S
    run_a, run_b = labmod.punch_pair(lab, "pair", messages=msgs, first=first,
                                     timeout_s=timeout_s, stagger_s=0.2)
    diag = (f"expected {kind} ({why})\nA rc={run_a.returncode} stdout={run_a.stdout!r}\n"
            f"stderr={run_a.stderr!r}\nB rc={run_b.returncode} stdout={run_b.stdout!r}\n"
            f"stderr={run_b.stderr!r}\nconntrack A:\n{lab.conntrack('a')}")
    # Bounded: each gave its answer within the timeout, plus its chat and exit (timed from
    # the moment it ran, its imports done: punch_pair starts both before either runs).
    assert max(run_a.elapsed_s, run_b.elapsed_s) < timeout_s + ENDING_S, diag
    if kind == "refused":
        for run in (run_a, run_b):
            assert run.returncode == 5 and run.report is not None, diag
            assert run.report["error"].startswith("untraversable: "), diag
            assert "port-randomising" in run.report["error"], diag
            # told at pairing (the later side's registration, 0.2 s after the first's
            # start), not after --timeout
            assert run.elapsed_s < REFUSED_WITHIN_S, diag
        return
    # Without --syn-probe the broker knows nothing of the NATs: prime, or birthday when
    # exactly one randomises its ports.
    strategy = "birthday" if "random" in (profile_a, profile_b) else "prime"
    for run in (run_a, run_b):
        assert run.report is not None and run.report["strategy"] == strategy, diag
    for run, peer_msg in ((run_a, msgs[1]), (run_b, msgs[0])):
        report = run.report
        assert report is not None, diag
        assert "Traceback" not in run.stderr, diag
        if run.returncode == 0:
            assert report["established"] is True and report["error"] is None, diag
            assert run.chat_lines == [peer_msg.strip()], diag
        else:
            assert run.returncode in (5, 9), diag
            if run.returncode == 5:
                assert report["established"] is False, diag
                assert report["error"].startswith("punch to "), diag
    connected = run_a.returncode == 0 and run_b.returncode == 0
    if kind == "connect":
        assert connected, diag
        side = lab.side("b")
        assert run_a.report and run_a.report["peer"].startswith(side.public + ":"), diag
    elif kind == "fail":
        assert (run_a.returncode, run_b.returncode) == (5, 5), diag
