"""The broker's relay through the NAT lab (issue: a relay when no direct path exists, and
the move to a direct path when one opens).

- random x random (no punch can work: the broker says so at pairing) and syn-drop-all x
  syn-drop-all (every inbound SYN dropped, replies too: the punch fails) chat through the
  relay: a message each way, exit 0, ``path: relay``;
- home x home whose first punch is made to fail (host A's NAT drops A's SYNs towards B
  for the first seconds, a rule the test adds and removes) starts on the relay and moves
  to a direct connection mid-chat: every line of a numbered stream, both ways, delivered
  once and in order; ``path: direct`` and ``upgraded_after_s`` in the JSON.
"""

from __future__ import annotations

import threading
import time

import pytest

from synprobe import lab as labmod

pytestmark = pytest.mark.lab

MSGS = ("hello from A\n", "hello from B\n")
# random x random: refused at pairing, relayed at once; syn-drop-all: the punch's 6 s
# (session.RELAY_AFTER_S), then the relay.
TIMEOUT_S = 20.0


def _diag(lab: labmod.Lab, run_a: labmod.PeerRun, run_b: labmod.PeerRun) -> str:
    return (f"A rc={run_a.returncode} stdout={run_a.stdout[-3000:]!r}\n"
            f"stderr={run_a.stderr[-6000:]!r}\nB rc={run_b.returncode} "
            f"stdout={run_b.stdout[-3000:]!r}\nstderr={run_b.stderr[-6000:]!r}\n"
            f"conntrack A:\n{lab.conntrack('a')[-3000:]}\nconntrack B:\n"
            f"{lab.conntrack('b')[-3000:]}")


@pytest.mark.parametrize("profile", ["random", "syn-drop-all"])
def test_untraversable_pairs_chat_through_the_relay(make_lab, profile: str) -> None:
    lab = make_lab(profile, profile)
    labmod.start_broker(lab, ["--relay", "--syn-probe"])
    run_a, run_b = labmod.punch_pair(lab, "relayed", messages=MSGS, args=["-v"],
                                     timeout_s=TIMEOUT_S)
    diag = _diag(lab, run_a, run_b)
    for run, theirs in ((run_a, MSGS[1]), (run_b, MSGS[0])):
        assert run.returncode == 0 and run.report is not None, diag
        assert run.report["established"] is True and run.report["path"] == "relay", diag
        assert run.report["upgraded_after_s"] is None, diag
        assert run.chat_lines == [theirs.strip()], diag
        # A session name is all the secret there is: the broker knows it, and says so.
        assert "the broker knows the session name" in run.stderr, diag
        if profile == "random":  # known at pairing: no punch at all
            assert run.report["strategy"] == "relay", diag
            assert "untraversable" in str(run.report["strategy_reason"]) or \
                "port" in str(run.report["strategy_reason"]), diag
        else:  # the punch ran and failed first
            assert "the chat goes through the broker's relay" in run.stderr, diag


BLOCK_S = 9.0  # A's SYNs towards B are dropped at A's NAT this long from the start
STREAM = 150
EVERY_S = 0.1  # 15 s of lines per side: the move comes in the middle


def test_a_failed_punch_starts_on_the_relay_and_moves_to_direct(make_lab) -> None:
    lab = make_lab("home", "home")
    labmod.start_broker(lab, ["--relay"])
    peer_ip = lab.side("b").public
    rule = ["-p", "tcp", "--syn", "-s", lab.side("a").host, "-d", peer_ip, "-j", "DROP"]
    added = lab.run("ga", ["iptables", "-I", "FORWARD", *rule])
    assert added.returncode == 0, added.stderr
    lifted = threading.Event()

    def lift() -> None:
        if not lifted.wait(BLOCK_S):
            lab.run("ga", ["iptables", "-D", "FORWARD", *rule])

    timer = threading.Thread(target=lift, daemon=True)
    timer.start()
    try:
        streams = ([f"A {i:03d}" for i in range(STREAM)], [f"B {i:03d}" for i in range(STREAM)])
        run_a, run_b = labmod.punch_pair(lab, "moving", args=["-v"], timeout_s=TIMEOUT_S,
                                         streams=streams, every_s=EVERY_S)
    finally:
        timer.join(BLOCK_S + 5)
        lifted.set()
    diag = _diag(lab, run_a, run_b)
    for run, theirs in ((run_a, streams[1]), (run_b, streams[0])):
        assert run.returncode == 0 and run.report is not None, diag
        assert run.chat_lines == list(theirs), diag  # each once, in order
        assert run.report["path"] == "direct", diag
        # local and peer are the direct connection's now, not the relay's.
        peer_public = lab.side("b" if run is run_a else "a").public
        assert str(run.report["peer"]).startswith(f"{peer_public}:"), diag
        upgraded = run.report["upgraded_after_s"]
        assert isinstance(upgraded, float) and 0 < upgraded < STREAM * EVERY_S, diag
        assert "the chat goes through the broker's relay" in run.stderr, diag
        assert "moved to the direct connection" in run.stderr, diag
        assert "the peer moved" in run.stderr, diag
        phases = [p["phase"] for p in run.report["phases"]]  # type: ignore[union-attr,index]
        assert "relay" in phases and "upgraded" in phases, diag
    # Both moved mid-stream: some lines went over the relay, the rest direct.
    for run in (run_a, run_b):
        moved = [line for line in run.stderr.splitlines() if "moved to the direct" in line]
        at = int(moved[0].split("from #")[1].split()[0])
        assert 0 < at < STREAM, diag
    assert time.monotonic() > 0
