"""Punch between every pair of NAT profiles, in both orders of start, through the lab.

Each pair's outcome is asserted: connected with a chat message each way, or a clear
failure (exit 5 with a JSON error, or 9 when the other side saw the connection break)
inside the timeout. Which pairs must connect today, which must fail, and which may go
either way (and why) is stated in ``expectation()``; the adaptive strategy of a later
issue is meant to move pairs from "either" to "connect".
"""

from __future__ import annotations

import itertools

import pytest

from synprobe import lab as labmod

TIMEOUT_S = 3.0
ENDING_S = 1.5  # after connected or given up: a chat line each way, the FINs, exiting
# NATs that drop an unsolicited SYN silently, pass a SYN that replies to ours, and keep
# the external port: with these the SYNs need not even cross.
CLEAN = {"home", "home-nft", "syn-sent-5s", "firewall", "carrier"}
RST = {"original", "reject-rst"}
ICMP = {"reject-icmp-port", "reject-icmp-admin"}


def expectation(a: str, b: str) -> tuple[str, str]:
    """("connect" | "fail" | "either", why) for host A behind a and host B behind b."""
    pair = {a, b}
    if "random" in pair:
        return "fail", ("MASQUERADE --random-fully gives the punch another external port than "
                        "the one the broker saw, so the peer aims at a port with no mapping")
    if a == b == "syn-drop-all":
        return "fail", "both NATs drop every inbound SYN, replies to their own SYNs included"
    if pair <= CLEAN | {"syn-drop-all"}:
        return "connect", ("unsolicited SYNs die silently; a SYN that answers ours passes "
                           "(syn-drop-all: its host's SYN reaches the other side, whose SYN-SENT "
                           "socket answers SYN+ACK, which is not a bare SYN and passes)")
    if pair & ICMP:
        return "either", ("a SYN that comes early is rejected with ICMP: the connect aborts, "
                          "and the rejecting NAT keeps a SYN_SENT conntrack entry for it, so "
                          "its host's own SYN to that peer is mapped to another port (a NAT "
                          "tuple clash) and misses; needs the adaptive strategy")
    if "dmz" in pair:
        return "either", ("the DMZ host gets every unsolicited SYN: before its own connect() "
                          "its kernel answers an early SYN with RST, which aborts the peer's "
                          "attempt and closes the peer NAT's conntrack entry; paced retries "
                          "must then meet")
    return "either", ("a SYN that comes early is answered with RST: the connect aborts and "
                      "only a paced retry that meets the peer's SYN-SENT window connects")


PAIRS = [(a, b, first) for a, b in itertools.product(labmod.PROFILES, repeat=2)
         for first in ("a", "b")]


def test_every_profile_pair_has_an_expectation_with_a_reason() -> None:
    kinds = {expectation(a, b)[0] for a, b, _ in PAIRS}
    assert kinds == {"connect", "fail", "either"}
    assert all(expectation(a, b)[1] for a, b, _ in PAIRS)
    must = [(a, b) for a, b, _ in PAIRS if expectation(a, b)[0] == "connect"]
    assert ("home", "home") in must and ("firewall", "syn-drop-all") in must


@pytest.mark.lab
@pytest.mark.parametrize("profile_a, profile_b, first", PAIRS,
                         ids=[f"{a}-{b}-{f}first" for a, b, f in PAIRS])
def test_punch_pair(make_lab, profile_a: str, profile_b: str, first: str) -> None:
    kind, why = expectation(profile_a, profile_b)
    lab = make_lab(profile_a, profile_b)
    labmod.start_broker(lab)
    msgs = (f"hello from A behind {profile_a} é\n", f"hello from B behind {profile_b}\n")
    run_a, run_b = labmod.punch_pair(lab, "pair", messages=msgs, first=first,
                                     timeout_s=TIMEOUT_S, stagger_s=0.2)
    diag = (f"expected {kind} ({why})\nA rc={run_a.returncode} stdout={run_a.stdout!r}\n"
            f"stderr={run_a.stderr!r}\nB rc={run_b.returncode} stdout={run_b.stdout!r}\n"
            f"stderr={run_b.stderr!r}\nconntrack A:\n{lab.conntrack('a')}")
    # Bounded: each gave its answer within the timeout, plus its chat and exit (timed from
    # the moment it ran, its imports done: punch_pair starts both before either runs).
    assert max(run_a.elapsed_s, run_b.elapsed_s) < TIMEOUT_S + ENDING_S, diag
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
