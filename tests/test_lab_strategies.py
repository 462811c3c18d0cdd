"""The strategies through the lab: what auto chooses from what the broker knows of both
NATs (its --syn-probe, or the peers' last nat-check), each strategy forced, the
no-broker order (--first/--second, --ttl), and the pairs refused at once.

What each profile's NAT does to an unsolicited SYN is written here by hand from its
rules (synprobe/lab/profiles.py), never from the code under test.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time

import pytest

from synprobe import lab as labmod
from tests import schemas
from tests.helpers import communicate_within
from tests.test_lab_punch import (
    ENDING_S,
    FAR_BROKER,
    FAR_BROKER_PAIRS,
    REFUSED_WITHIN_S,
    TIMEOUT_S,
    expectation,
)

pytestmark = pytest.mark.lab

# The NAT (or the host behind a DMZ NAT) answers an unsolicited SYN: RST or ICMP.
ANSWERS = {"original", "reject-rst", "reject-icmp-port", "reject-icmp-admin", "dmz"}
# Every other profile drops it silently (home, home-nft, syn-sent-5s, firewall, carrier,
# syn-drop-all, random).
PAIRS = [(a, b, first) for a, b in itertools.product(labmod.PUNCH_PROFILES, repeat=2)
         for first in ("a", "b")]
MSGS = ("hello from A\n", "hello from B\n")


def auto_choice(a: str, b: str) -> tuple[str, str | None]:
    """(strategy, the side with role second or None) a --syn-probe broker must choose."""
    rejects = [p in ANSWERS for p in (a, b)]
    if "random" in (a, b):
        # Birthday. The random NAT drops the unsolicited SYN of the probe: where the other
        # NAT answers, the guesses go first (they die silently at the random NAT) and the
        # random side's SYNs cross; else the random side's SYNs go first (dropped silently
        # at the other NAT) and the guesses cross.
        easy = "b" if a == "random" else "a"
        return "birthday", easy if any(rejects) else ("a" if easy == "b" else "b")
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
                   what: str, timeout_s: float = TIMEOUT_S) -> None:
    diag = _diag(lab, run_a, run_b, what)
    assert max(run_a.elapsed_s, run_b.elapsed_s) < timeout_s + ENDING_S, diag
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
    check_auto(make_lab(profile_a, profile_b), profile_a, profile_b, first)


@pytest.mark.parametrize("profile_a, profile_b, first", FAR_BROKER_PAIRS,
                         ids=[f"{a}-{b}-{f}first" for a, b, f in FAR_BROKER_PAIRS])
def test_auto_with_a_syn_probing_broker_far_away(make_lab, profile_a: str, profile_b: str,
                                                 first: str) -> None:
    """The same with the broker 50 +- 10 ms away and the peers 0.5 ms from the router,
    for the pairs with a NAT that answers an early SYN (order and prime)."""
    check_auto(make_lab(profile_a, profile_b, FAR_BROKER), profile_a, profile_b, first,
               TIMEOUT_S + 2 * FAR_BROKER.broker)


def check_auto(lab: labmod.Lab, profile_a: str, profile_b: str, first: str,
               timeout_s: float = TIMEOUT_S) -> None:
    labmod.start_broker(lab, ["--syn-probe"])
    run_a, run_b = labmod.punch_pair(lab, "auto", messages=MSGS, first=first,
                                     timeout_s=timeout_s, stagger_s=0.2)
    kind, why = expectation(profile_a, profile_b)
    diag = _diag(lab, run_a, run_b, f"expected {kind} ({why})")
    if kind == "refused":
        for run in (run_a, run_b):
            assert run.returncode == 5 and run.report is not None, diag
            assert run.report["error"].startswith("untraversable: "), diag
            assert run.elapsed_s < REFUSED_WITHIN_S + (timeout_s - TIMEOUT_S), diag
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
    assert_chatted(lab, run_a, run_b, f"expected {kind} ({why}) with {strategy}", timeout_s)


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


NATCHECKED = [("syn-drop-all", "syn-drop-all"), ("syn-drop-all", "original"),
              ("original", "original")]


@pytest.mark.parametrize("profile_a, profile_b", NATCHECKED,
                         ids=[f"{a}-{b}" for a, b in NATCHECKED])
def test_the_last_nat_check_informs_the_choice(make_lab, tmp_path, profile_a: str,
                                               profile_b: str) -> None:
    """Each host runs a real nat-check first (its own state directory); the punch tells the
    broker what it found. Both NATs dropping reply SYNs: refused within 2 s, exit 5. One:
    order, its side sending the crossing SYN (role first). Both rejecting: prime."""
    lab = make_lab(profile_a, profile_b)
    labmod.start_broker(lab, ["--probe", "-q"])
    server = f"{labmod.BROKER_IPS[0]}:{labmod.BROKER_PORT}"
    envs: dict[str, dict[str, str]] = {}
    for side in "ab":
        envs[side] = {"SYNPROBE_STATE_DIR": str(tmp_path / side)}
        check = lab.run("h" + side, [*labmod.SYNPROBE, "nat-check", "--server", server,
                                     "--json"], timeout=60, env={**os.environ, **envs[side]})
        assert (tmp_path / side / "natcheck-last.json").is_file(), check.stderr
        assert schemas.loads("nat-check", check.stdout)["error"] is None, check.stdout
    run_a, run_b = labmod.punch_pair(lab, "informed", messages=MSGS, timeout_s=TIMEOUT_S,
                                     stagger_s=0.2, args=["-v"], side_env=envs)
    diag = _diag(lab, run_a, run_b, "after nat-check")
    for run in (run_a, run_b):
        assert "telling the broker what the last nat-check" in run.stderr, diag
    if profile_a == profile_b == "syn-drop-all":
        for run in (run_a, run_b):
            assert run.returncode == 5 and run.report is not None, diag
            assert run.report["error"].startswith("untraversable: both NATs drop a SYN even "
                                                  "when it is the reply"), diag
            assert run.elapsed_s < REFUSED_WITHIN_S, diag
        return
    assert_chatted(lab, run_a, run_b, "after nat-check")
    reports = [run_a.report or {}, run_b.report or {}]
    if "syn-drop-all" in (profile_a, profile_b):
        assert [r["strategy"] for r in reports] == ["order", "order"], diag
        # the side whose NAT drops reply SYNs sends the crossing SYN
        assert [r["role"] for r in reports] == ["first" if p == "syn-drop-all" else "second"
                                                for p in (profile_a, profile_b)], diag
    else:
        # the measure towards the peer answered, so its TTL is used (nat-check's stands in
        # only when no hop answers: it was measured towards the server, not the peer)
        assert [(r["strategy"], r["ttl"], r["ttl_source"]) for r in reports] == [
            ("prime", 2, "measured")] * 2, diag


def _direct(lab: labmod.Lab, node: str, peer: str, port: int, message: str,
            extra: list[str]) -> subprocess.Popen[bytes]:
    proc = lab.popen(node, [*labmod.SYNPROBE, "punch", "--peer", peer, "--local-port",
                            str(port), "--json", "--timeout", "6", *extra],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(message.encode())
    proc.stdin.close()
    proc.stdin = None  # written and closed: communicate() must not touch it
    return proc


DIRECT = [("reject-icmp-port", "home", []), ("original", "reject-rst", ["--ttl", "2"]),
          ("reject-icmp-admin", "reject-icmp-port", ["--ttl", "2"])]


@pytest.mark.parametrize("profile_a, profile_b, ttl", DIRECT,
                         ids=[f"{a}-{b}{'-ttl' if t else ''}" for a, b, t in DIRECT])
def test_order_without_a_broker(make_lab, profile_a: str, profile_b: str,
                                ttl: list[str]) -> None:
    """--peer with --second on A (started first: its NAT answers unsolicited SYNs) and
    --first on B; with --ttl both hole first, so both NATs may answer."""
    lab = make_lab(profile_a, profile_b)
    pa, pb = 41001, 41002
    a_public = f"{lab.side('a').public}:{pa}"
    b_public = f"{lab.side('b').public}:{pb}"
    second = _direct(lab, "ha", b_public, pa, MSGS[0], ["--second", *ttl])
    time.sleep(0.2)
    first = _direct(lab, "hb", a_public, pb, MSGS[1], ["--first", *ttl])
    outs = []
    for proc in (second, first):
        out, err = communicate_within(proc, 20)
        outs.append((proc.returncode, out.decode(), err.decode()))
    diag = f"{outs}\nconntrack A:\n{lab.conntrack('a')}\nconntrack B:\n{lab.conntrack('b')}"
    for (rc, out, _), peer_msg in zip(outs, (MSGS[1], MSGS[0]), strict=True):
        assert rc == 0, diag
        report = schemas.loads("punch", out.splitlines()[0])
        assert report["mode"] == "direct" and report["established"], diag
        assert report["strategy"] == ("prime" if ttl else "order"), diag
        assert out.splitlines()[1:] == [peer_msg.strip()], diag
