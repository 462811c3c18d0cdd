"""IPv6 through the lab: the RFC 6092 home gateway (drop), reject with a TCP reset,
reject with ICMPv6 admin-prohibited, NPTv6 and no firewall, every pair both ways, the
broker with and without --syn-probe; a dual-stack broker pairing an IPv6 pair and an IPv4
pair at the same time.

What each profile does is written here from its ip6tables rules (profiles.py), not from
the code under test: none drops a reply-direction SYN or randomises anything, so every
pair can be traversed, and must connect (a message each way). With nothing known (no
--syn-probe for a client that never ran nat-check) the broker chooses prime, whose
hop-limited SYNs open both firewalls' holes before a full SYN crosses.
"""

from __future__ import annotations

import itertools
import threading

import pytest

from synprobe import lab as labmod

pytestmark = pytest.mark.lab

BROKER6 = f"[{labmod.BROKER_IPS6[0]}]:{labmod.BROKER_PORT}"
BROKER4 = f"{labmod.BROKER_IPS[0]}:{labmod.BROKER_PORT}"
MSGS = ("hello from A\n", "hello from B\n")
TIMEOUT_S = 10.0
PAIRS = list(itertools.product(labmod.PROFILES6, repeat=2))
ANSWERS = {"reject6-rst", "reject6-admin", "open6"}  # an unsolicited SYN is answered


def _diag(lab: labmod.Lab, runs: tuple[labmod.PeerRun, ...]) -> str:
    return "\n".join(f"{r.side} rc={r.returncode} stdout={r.stdout!r}\nstderr={r.stderr!r}"
                     for r in runs) + f"\nconntrack A:\n{lab.conntrack('a')}"


def assert_chatted(lab: labmod.Lab, run_a: labmod.PeerRun, run_b: labmod.PeerRun,
                   family6: bool = True) -> None:
    diag = _diag(lab, (run_a, run_b))
    for run, theirs, peer_side in ((run_a, MSGS[1], "b"), (run_b, MSGS[0], "a")):
        assert run.returncode == 0 and run.report is not None, diag
        assert run.report["established"] is True and run.report["path"] == "direct", diag
        assert run.chat_lines == [theirs.strip()], diag
        peer = str(run.report["peer"])
        if family6:  # the peer's public IPv6 endpoint (its NPTv6 mapping where it has one)
            assert peer.startswith(f"[{lab.side6(peer_side).public}]:"), diag
        else:
            assert peer.startswith(f"{lab.side(peer_side).public}:"), diag


@pytest.mark.parametrize("probe", [False, True], ids=["no-probe", "syn-probe"])
@pytest.mark.parametrize("profile_a, profile_b", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_every_ipv6_pair_connects(make_lab, profile_a: str, profile_b: str,
                                  probe: bool) -> None:
    lab = make_lab("home", "home", v6=(profile_a, profile_b))
    labmod.start_broker(lab, ["--syn-probe"] if probe else [])
    run_a, run_b = labmod.punch_pair(lab, "v6", messages=MSGS, timeout_s=TIMEOUT_S,
                                     broker=BROKER6, args=["-v"])
    assert_chatted(lab, run_a, run_b)
    if not probe:
        for run in (run_a, run_b):
            assert run.report is not None and run.report["strategy"] == "prime"
            assert "IPv6: hop limit 2" in run.stderr
    else:
        answered = [p in ANSWERS for p in (profile_a, profile_b)]
        expected = ("prime" if all(answered) else "order" if any(answered) else "sync")
        for run in (run_a, run_b):
            assert run.report is not None and run.report["strategy"] == expected, \
                _diag(lab, (run_a, run_b))


def test_a_dual_stack_broker_pairs_an_ipv6_and_an_ipv4_pair_at_once(make_lab) -> None:
    """The same two hosts, two sessions at once: one over the broker's IPv6 address, one
    over its IPv4 address. Each pair is told the other's endpoint of its own family."""
    lab = make_lab("home", "home", v6=("rfc6092", "rfc6092"))
    labmod.start_broker(lab)
    results: dict[str, tuple[labmod.PeerRun, labmod.PeerRun]] = {}

    def run(name: str, broker: str) -> None:
        results[name] = labmod.punch_pair(lab, name, messages=MSGS, timeout_s=TIMEOUT_S,
                                          broker=broker)

    threads = [threading.Thread(target=run, args=("over6", BROKER6)),
               threading.Thread(target=run, args=("over4", BROKER4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S + 30)
    assert set(results) == {"over6", "over4"}
    assert_chatted(lab, *results["over6"], family6=True)
    assert_chatted(lab, *results["over4"], family6=False)


def test_punch_pcap_captures_ipv6(make_lab, tmp_path) -> None:
    """--pcap over IPv6: the broker connection, the primed SYN that died on the way (its
    ICMPv6 time-exceeded too) and the punched connection, all in the capture."""
    from synprobe.analyze.command import analyze_file

    lab = make_lab("home", "home", v6=("rfc6092", "rfc6092"))
    labmod.start_broker(lab)
    pcaps = {side: tmp_path / f"{side}.pcapng" for side in "ab"}
    run_a, run_b = labmod.punch_pair(lab, "cap6", messages=MSGS, timeout_s=TIMEOUT_S,
                                     broker=BROKER6, args=["-v"],
                                     side_args={s: ["--pcap", str(p)] for s, p in pcaps.items()})
    assert_chatted(lab, run_a, run_b)
    for side, pcap in pcaps.items():
        attempts = analyze_file(str(pcap)).attempts
        host = lab.side6(side).host
        broker, *punches = attempts
        assert broker.endpoints[0].startswith(f"[{host}]:"), broker
        assert broker.endpoints[1] == BROKER6 and broker.kind == "three-way", broker
        assert punches and punches[-1].established, punches
        assert punches[-1].endpoints[1].startswith("[2001:db8:"), punches[-1]


def test_relay_only_over_ipv6(make_lab) -> None:
    """`--relay only` between two IPv6 hosts: PEER's relay_at is the broker's IPv6
    address (the one the client reached), and the chat goes through it."""
    lab = make_lab("home", "home", v6=("rfc6092", "nptv6"))
    labmod.start_broker(lab, ["--relay"])
    run_a, run_b = labmod.punch_pair(lab, "relay6", messages=MSGS, timeout_s=TIMEOUT_S,
                                     broker=BROKER6, args=["-v", "--relay", "only"])
    diag = _diag(lab, (run_a, run_b))
    for run, theirs in ((run_a, MSGS[1]), (run_b, MSGS[0])):
        assert run.returncode == 0 and run.report is not None, diag
        assert run.report["path"] == "relay" and run.report["strategy"] == "relay", diag
        assert run.chat_lines == [theirs.strip()], diag
        assert (f"through the broker's relay [{labmod.BROKER_IPS6[0]}]:{labmod.BROKER_PORT}"
                in run.stderr), diag
