"""Every nat-check classifier as a pure function: on the captures recorded in the lab
(captures/natcheck/, see tests/natcheck_record.py) against the hand-written expectations
of natcheck_expected.py, and on packets built with scapy and rebuilt from bytes. No
network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, IPerror, TCPerror
from scapy.layers.l2 import Ether

from simulsyn_core._internal.endpoint import Endpoint
from synprobe import lab as labmod
from synprobe.natcheck import (
    filtering,
    hairpin,
    hops,
    host_stack,
    mapping,
    reply_syn,
    timers,
    unsolicited,
)
from synprobe.natcheck import protocol as P
from synprobe.natcheck.evidence import Evidence, decide
from synprobe.natcheck.recommend import recommend, verdict
from synprobe.natcheck.report import (
    Behaviour,
    Findings,
    NatCheckReport,
    Outcome,
    PortAllocation,
    StackKind,
    StackReaction,
)
from synprobe.packets.reader import read_pcap
from synprobe.packets.seen import Seen, parse_frame, seen_from_pcap
from tests import schemas
from tests.natcheck_expected import EXPECTED, expected_path, mismatches

CAPTURES = Path(__file__).resolve().parent.parent / "captures" / "natcheck"
PROFILES = ["home", "original", "reject-icmp-port", "reject-icmp-admin", "random",
            "syn-drop-all", "dmz", "firewall", "carrier", "reject-rst"]
BROKER = ("192.0.2.10", "192.0.2.11")
PROBE_PORT = 8088


def load(profile: str) -> tuple[dict[str, Any], Evidence]:
    """The recording's record (side, exit code) and its evidence, with the capture read
    back from the client's pcap."""
    record = json.loads((CAPTURES / f"{profile}-evidence.json").read_text())
    data = (CAPTURES / f"{profile}-client.pcap").read_bytes()
    seen = seen_from_pcap(data, [record["evidence"]["host_ip"]])
    return record, Evidence.from_json(record["evidence"], seen)


# --- on the recorded captures: the decision meets the hand-written expectations -----------

@pytest.mark.parametrize("profile", PROFILES)
def test_decide_on_the_recorded_evidence_meets_expected(profile: str) -> None:
    record, evidence = load(profile)
    assert record["exit_code"] == 0 and record["profile"] == profile
    decision = decide(evidence)
    f = decision.findings
    report = NatCheckReport("", f, recommend(f), verdict(f), 0.0, path=decision.path)
    data = schemas.loads("nat-check", json.dumps(report.to_json()))  # as nat-check --json prints it
    assert mismatches(profile, data) == [], data["reasons"]
    for key, value in EXPECTED[profile].items():
        if value is None:
            assert f.reason(key), f"{key} is null without a reason"
    public_ip = labmod.side_addresses(record["side"], labmod.PROFILES[profile]).public
    assert f.public and all(p.startswith(public_ip + ":") for p in f.public)
    assert list(decision.path) == expected_path(record["side"], profile)
    assert f.reason("unsolicited_syn").startswith(UNSOLICITED_SAYS[f.unsolicited_syn])
    if profile in HOPS_NOT_TOLD:  # the rule for when hops are measured
        assert f.reason("hops").startswith(HOPS_NOT_TOLD[profile])


HOPS_NOT_TOLD = {"random": "the NAT does not preserve ports",
                 "syn-drop-all": "reply SYNs do not pass, so no TTL opens a hole",
                 "dmz": "any SYN reaches the host: no hole is needed"}


# How unsolicited_syn's reason begins for each value (the broker's answer, or the SYN
# reaching the host).
UNSOLICITED_SAYS = {
    "drop": "no answer came back to the server's SYN to ",
    "rst": "a TCP RST came back to the server's SYN to ",
    "icmp-port-unreachable": "an ICMP error (icmp-port-unreachable) came back to the server's",
    "icmp-admin-prohibited": "an ICMP error (icmp-admin-prohibited) came back to the server's",
    "pass": "the SYN reached this host: the NAT forwards unsolicited SYNs here",
}


def test_the_recorded_host_stack_outcomes_are_what_linux_does() -> None:
    # recorded, not made up: an RST and an ICMP port-unreachable refuse the connect(), a
    # time-exceeded makes it unreachable (tcp_v4_err)
    for profile in PROFILES:
        _, evidence = load(profile)
        assert evidence.raw is not None
        ends = {o.kind: o.outcome for o in evidence.raw.stack}
        assert ends == {"rst": "ECONNREFUSED", "icmp": "ECONNREFUSED",
                        "ttl_exceeded": "EHOSTUNREACH"}, profile


@pytest.mark.parametrize("profile", PROFILES)
def test_unsolicited_classifier_on_the_brokers_captures(profile: str) -> None:
    record, evidence = load(profile)
    data = (CAPTURES / f"{profile}-broker.pcap").read_bytes()
    seen = seen_from_pcap(data, BROKER)
    assert evidence.raw is not None
    public_ip = labmod.side_addresses(record["side"], labmod.PROFILES[profile]).public
    probe = unsolicited.UnsolicitedProbe(BROKER[0], PROBE_PORT, public_ip,
                                         evidence.raw.unsolicited_port, P.Seq.UNSOLICITED)
    assert any(s.is_syn and s.src == BROKER[0] and s.dport == probe.client_port
               and s.seq == P.Seq.UNSOLICITED for s in seen), "the probe is not in the capture"
    expected = EXPECTED[profile]["unsolicited_syn"]
    # "pass" is the client's finding (the SYN reached it); the broker saw no answer
    assert unsolicited.classify(probe, seen) == ("drop" if expected == "pass" else expected)


def test_recorded_pcaps_are_classic_ethernet_pcaps() -> None:
    for profile in PROFILES:
        linktype, frames = read_pcap((CAPTURES / f"{profile}-client.pcap").read_bytes())
        assert linktype == 1 and sum(1 for _ in frames) > 20


def test_evidence_comes_back_from_its_json() -> None:
    for profile in PROFILES:
        record, evidence = load(profile)
        assert evidence.to_json() == record["evidence"]
        assert Evidence.from_json(evidence.to_json(), evidence.raw.seen if evidence.raw
                                  else ()) == evidence


# --- on packets built with scapy and rebuilt from bytes -----------------------------------

CLIENT_PUBLIC = "198.51.100.2"


def frame(pkt: Any, outgoing: bool = False) -> Seen:
    # Explicit MACs: a bare Ether() would make scapy ARP for the destination.
    raw = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / pkt)
    seen = parse_frame(Ether(raw).build(), t=1.0, outgoing=outgoing)
    assert seen is not None
    return seen


UNSOL = unsolicited.UnsolicitedProbe(BROKER[0], PROBE_PORT, CLIENT_PUBLIC, 40000, P.Seq.UNSOLICITED)
QUOTE = IPerror(src=BROKER[0], dst=CLIENT_PUBLIC) / TCPerror(sport=PROBE_PORT, dport=40000)


@pytest.mark.parametrize(("answer", "expected"), [
    (None, "drop"),
    (IP(src=CLIENT_PUBLIC, dst=BROKER[0]) / TCP(sport=40000, dport=PROBE_PORT, flags="RA"),
     "rst"),
    (IP(src=CLIENT_PUBLIC, dst=BROKER[0]) / ICMP(type=3, code=3) / QUOTE,
     "icmp-port-unreachable"),
    (IP(src="198.51.100.1", dst=BROKER[0]) / ICMP(type=3, code=13) / QUOTE,
     "icmp-admin-prohibited"),
    (IP(src=CLIENT_PUBLIC, dst=BROKER[0]) / ICMP(type=3, code=1) / QUOTE, "icmp-3-1"),
    (IP(src=CLIENT_PUBLIC, dst=BROKER[0]) / TCP(sport=40000, dport=PROBE_PORT, flags="SA"),
     "syn-ack"),
])
def test_unsolicited_classify(answer: Any, expected: str) -> None:
    seen = [frame(answer)] if answer is not None else []
    # a RST for another probe is no answer to ours
    seen.append(frame(IP(src=CLIENT_PUBLIC, dst=BROKER[0]) / TCP(sport=40001, dport=PROBE_PORT,
                                                                 flags="R")))
    assert unsolicited.classify(UNSOL, seen) == expected


def _syn_in(src: str, dport: int, sport: int = PROBE_PORT) -> Seen:
    return frame(IP(src=src, dst="10.1.0.2") / TCP(sport=sport, dport=dport, flags="S"))


@pytest.mark.parametrize(("arrived", "other", "expected"), [
    ([BROKER[0], BROKER[1]], BROKER[1], Behaviour.EI),
    ([BROKER[0]], BROKER[1], Behaviour.AD),
    ([], BROKER[1], Behaviour.APD),
    ([], None, Behaviour.APD),
    ([BROKER[0]], None, None),
])
def test_filtering_classify(arrived: list[str], other: str | None, expected: str | None
                            ) -> None:
    seen = [_syn_in(src, 5000) for src in arrived] + [_syn_in(BROKER[1], 5001)]
    value, reason = filtering.classify(seen, 5000, BROKER[0], other, PROBE_PORT)
    assert value == expected and reason


def test_reply_syn_classify() -> None:
    probe = reply_syn.ReplySynProbe("10.1.0.2", 5000, BROKER[0], PROBE_PORT)
    ours = frame(IP(src="10.1.0.2", dst=BROKER[0]) / TCP(sport=5000, dport=PROBE_PORT,
                                                         flags="S", seq=P.Seq.REPLY), True)
    assert reply_syn.classify(probe, [])[0] is None
    assert reply_syn.classify(probe, [ours])[0] == "blocked"
    assert reply_syn.classify(probe, [ours, _syn_in(BROKER[0], 5000)])[0] == "pass"


def _time_exceeded(router: str, sport: int) -> Seen:
    return frame(IP(src=router, dst="10.1.0.2") / ICMP(type=11, code=0)
                 / IPerror(src="10.1.0.2", dst=BROKER[0], ttl=0)
                 / TCPerror(sport=sport, dport=PROBE_PORT))


def test_hops_behind_a_carrier_nat_and_the_path() -> None:
    probe = hops.HopsProbe("10.1.0.2", BROKER[0], PROBE_PORT, (6001, 6002, 6003))
    # TTL 1 and 2 die inside the two NATs; only the SYN with TTL 3 opened every hole
    seen = [_time_exceeded("10.1.0.1", 6001), _time_exceeded("100.64.0.1", 6002),
            _syn_in(BROKER[0], 6003)]
    assert hops.classify(probe, seen)[0] == 2
    assert hops.path(probe, seen) == ["10.1.0.1", "100.64.0.1", None]
    assert hops.classify(probe, [_syn_in(BROKER[0], 6002), _syn_in(BROKER[0], 6003)])[0] == 1
    assert hops.classify(probe, [])[0] is None
    assert hops.classify(probe, [_syn_in(BROKER[0], 6002)])[0] is None  # 3 closed: odd


def test_hairpin_classify() -> None:
    probe = hairpin.HairpinProbe("10.1.0.2", 7000, Endpoint(CLIENT_PUBLIC, 5000), 5000)
    ours = frame(IP(src="10.1.0.2", dst=CLIENT_PUBLIC) / TCP(sport=7000, dport=5000, flags="S",
                                                             seq=P.Seq.HAIRPIN), True)
    back = frame(IP(src="10.1.0.1", dst="10.1.0.2") / TCP(sport=7000, dport=5000, flags="S",
                                                          seq=P.Seq.HAIRPIN))
    rst = frame(IP(src=CLIENT_PUBLIC, dst="10.1.0.2") / TCP(sport=5000, dport=7000, flags="RA"))
    assert hairpin.classify(probe, [ours, back])[0] is True
    value, reason = hairpin.classify(probe, [ours, rst])
    assert value is False and "RST" in reason
    assert hairpin.classify(probe, [])[0] is None


def test_host_stack_classify_aborts_retries_and_unanswered() -> None:
    rst = frame(IP(src=BROKER[0], dst="10.1.0.2") / TCP(sport=8090, dport=9001, flags="RA"))
    te = _time_exceeded("10.1.0.1", 9003)
    outcomes = [host_stack.StackOutcome("rst", 9001, "ECONNREFUSED", 0.001),
                host_stack.StackOutcome("icmp", 9002, "pending", 0.5),
                host_stack.StackOutcome("ttl_exceeded", 9003, "pending", 0.5)]
    value, reason = host_stack.classify(outcomes, [rst, te])
    assert value == {"rst": "aborts", "ttl_exceeded": "retries"}
    assert "icmp: no answer came back" in reason


def test_timers_classify_and_waits() -> None:
    probe = timers.TimersProbe("10.1.0.2", BROKER[0], PROBE_PORT, (7001, 7002, 7003, 7004),
                               (1.0, 2.0, 4.0, 6.0))
    seen = [_syn_in(BROKER[0], p) for p in (7001, 7002, 7003)]
    assert timers.classify(probe, seen) == (4.0, "open after 4 s, closed after 6 s")
    assert timers.classify(probe, seen + [_syn_in(BROKER[0], 7004)])[0] == 6.0
    assert timers.classify(probe, [])[0] is None
    assert timers.classify(probe, [_syn_in(BROKER[0], 7003)])[0] is None  # out of order
    assert timers.waits_for(8) == [1.0, 2.0, 4.0, 6.0, 8.0]
    long = timers.waits_for(150)
    assert len(long) <= P.MAX_TIMERS and long[0] == 1.0 and long[-1] == 150.0


def _obs(local: int, server: tuple[str, int], public: int, ip: str = CLIENT_PUBLIC
         ) -> mapping.Observation:
    return mapping.Observation(Endpoint("10.1.0.2", local), Endpoint(*server),
                               Endpoint(ip, public))


S1, S1ALT, S2 = (BROKER[0], 8086), (BROKER[0], 8087), (BROKER[1], 8086)


@pytest.mark.parametrize(("publics", "fresh", "expected"), [
    ((5000, 5000, 5000), ((6000, 6000), (7000, 7000)),
     (Behaviour.EI, True, PortAllocation.PRESERVING)),
    ((5000, 5000, 5001), ((6000, 6000), (7000, 7000)),
     (Behaviour.AD, False, PortAllocation.PRESERVING)),
    ((30000, 30001, 30002), ((6000, 30003), (7000, 30004)),
     (Behaviour.APD, False, PortAllocation.SEQUENTIAL)),
    ((41234, 1234, 55555), ((6000, 20001), (7000, 9876)),
     (Behaviour.APD, False, PortAllocation.RANDOM)),
])
def test_mapping_classify(publics: tuple[int, int, int], fresh: tuple[tuple[int, int], ...],
                          expected: tuple[str, bool, str]) -> None:
    control = _obs(5000, S1, publics[0])
    same = [_obs(5000, S1ALT, publics[1]), _obs(5000, S2, publics[2])]
    fresh_obs = [_obs(local, S1, pub) for local, pub in fresh]
    result = mapping.classify(control, same, fresh_obs, ["10.1.0.2"])
    assert (result.mapping, result.port_preservation, result.port_allocation) == expected
    assert result.behind_nat


def test_mapping_classify_no_nat_and_one_address() -> None:
    own = "198.51.100.130"
    control = _obs(5000, S1, 5000, own)
    result = mapping.classify(control, [_obs(5000, S1ALT, 5000, own)],
                              [_obs(6000, S1, 6000, own), _obs(7000, S1, 7000, own)], [own])
    assert (result.behind_nat, result.mapping) == (False, "none")
    result = mapping.classify(_obs(5000, S1, 5000), [_obs(5000, S1ALT, 5000)], [],
                              ["10.1.0.2"])
    assert result.mapping is None and "one address" in dict(result.reasons)["mapping"]


def _findings(**kw: Any) -> Findings:
    base = dict(behind_nat=True, mapping=Behaviour.EI, port_preservation=True,
                port_allocation=PortAllocation.PRESERVING, filtering=Behaviour.APD,
                unsolicited_syn=Outcome.DROP, reply_syn=Outcome.PASS, hops=1,
                host_stack=dict.fromkeys(StackKind, StackReaction.ABORTS))
    return Findings(**{**base, **kw})


def test_recommendation_and_verdicts() -> None:
    rec = recommend(_findings(unsolicited_syn="rst"))
    assert (rec.order.value, rec.ttl_limited_first_syn.value, rec.ttl.value) == ("first", True, 2)
    assert rec.retries.value == 50 and "connect() aborts" in rec.retries.reason
    rec = recommend(_findings(syn_sent_lifetime_s=4.0))
    assert rec.timeout_s.value == 4.0 and rec.order.value == "either"
    assert verdict(_findings()).startswith("Punch-friendly NAT")
    assert verdict(_findings(reply_syn="blocked")).startswith("Blocking NAT")
    assert verdict(_findings(mapping=Behaviour.APD, port_preservation=False,
                             port_allocation="random")).startswith("Hard NAT")
    assert verdict(_findings(unsolicited_syn="icmp-port-unreachable")).startswith("Punchable")
    assert verdict(_findings(behind_nat=False, mapping="none")).startswith("No NAT")
    assert verdict(_findings(filtering=Behaviour.EI, unsolicited_syn="pass")).startswith("Open")
    assert verdict(_findings(reply_syn=None)).startswith("Incomplete check")
