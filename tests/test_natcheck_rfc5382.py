"""RFC 5382's requirements (natcheck/rfc5382.py) decided without a network: on the
captures recorded in the lab (captures/natcheck/, made before --rfc5382: its slow probes
are absent there), and on REQ-4's timing rules with the broker's answer varied."""

from __future__ import annotations

from dataclasses import replace

import pytest

from synprobe.natcheck import protocol as P
from synprobe.natcheck.evidence import Evidence, decide
from synprobe.natcheck.rfc5382 import FAIL, NOT_MEASURED, PASS, assess, summary
from tests.natcheck_expected import RFC5382
from tests.test_natcheck_classify import PROFILES, load

# The rows the recordings can tell (no --rfc5382, no --timers, the hairpin SYN sent).
RECORDED_ROWS = ("REQ-1", "REQ-2", "REQ-3", "REQ-7", "REQ-8", "REQ-8a", "REQ-9")


def statuses(ev: Evidence) -> dict[str, str]:
    return {r.req: str(r.status) for r in assess(ev, decide(ev).findings)}


@pytest.mark.parametrize("profile", PROFILES)
def test_recorded_evidence_meets_the_hand_written_table(profile: str) -> None:
    _, ev = load(profile)
    got = statuses(ev)
    assert {k: got[k] for k in RECORDED_ROWS} == {k: RFC5382[profile][k] for k in RECORDED_ROWS}
    # without --rfc5382: REQ-10's probe did not run; REQ-4 fails only on an answer
    assert got["REQ-10"] == NOT_MEASURED
    expected_req4 = {"original": FAIL, "reject-rst": FAIL, "reject-icmp-port": FAIL,
                     "reject-icmp-admin": FAIL, "dmz": PASS}.get(profile, NOT_MEASURED)
    assert got["REQ-4"] == expected_req4


def _req4(ev: Evidence, result: P.Result, followed_port: int | None = 40000) -> tuple[str, str]:
    assert ev.raw is not None
    ev = replace(ev, rfc5382_asked=True,
                 raw=replace(ev.raw, broker=result, followed_port=followed_port))
    row = next(r for r in assess(ev, decide(ev).findings) if r.req == "REQ-4")
    return str(row.status), row.reason


WATCHED = 7000


@pytest.mark.parametrize("result, status, said", [
    # dropped silently, and the one our SYN followed too: 4a
    (P.Result("drop", 10, (), None, "drop", None, WATCHED), PASS, "dropped silently"),
    # ICMP port-unreachable only after 6 s, the followed one dropped: what REQ-4 asks
    (P.Result("icmp-port-unreachable", 10, (), 6200, "drop", None, WATCHED), PASS,
     "ICMP port-unreachable, as REQ-4 recommends"),
    # an RST after 6 s breaks no MUST, only the SHOULD
    (P.Result("rst", 10, (), 6500, "drop", None, WATCHED), PASS, "a SHOULD"),
    # ICMP at once: the timing is the violation
    (P.Result("icmp-port-unreachable", 10, (), 3, "icmp-port-unreachable", 2, WATCHED), FAIL,
     "after 3 ms"),
    (P.Result("icmp-port-unreachable", 10, (), 5999, "drop", None, WATCHED), FAIL,
     "after 5999 ms"),
    # late ICMP, but the SYN our own SYN followed was answered too
    (P.Result("icmp-port-unreachable", 10, (), 6100, "icmp-port-unreachable", 6100, WATCHED),
     FAIL, "must be dropped silently"),
    # no watch (an older broker): a drop within 1 s proves nothing
    (P.Result("drop", 10), NOT_MEASURED, "an older synprobe broker"),
    # an answer without its time (an older broker) came within the short window: a fail
    (P.Result("rst", 10), FAIL, "within the"),
])
def test_req4_timing_rules(result: P.Result, status: str, said: str) -> None:
    _, ev = load("home")
    got, reason = _req4(ev, result)
    assert got == status and said in reason, reason


def test_req4_followed_case_unknown_without_port_preservation() -> None:
    _, ev = load("home")
    got, reason = _req4(ev, P.Result("drop", 10, (), None, None, None, WATCHED), None)
    assert got == PASS and "followed-SYN case not measured" in reason


def test_verdict_sentence_names_the_failing_requirements() -> None:
    _, ev = load("original")
    rows = assess(ev, decide(ev).findings)
    failing = [r.req for r in rows if r.status == FAIL]
    assert failing == ["REQ-3", "REQ-4", "REQ-8"]
    assert summary(rows).startswith("RFC 5382: fails REQ-3, REQ-4, REQ-8 (")


def test_table_and_verbose_evidence_show_every_requirement() -> None:
    from synprobe.natcheck.recommend import recommend, verdict
    from synprobe.natcheck.render import evidence_lines, table
    from synprobe.natcheck.report import NatCheckReport

    _, ev = load("original")
    f = decide(ev).findings
    rows = assess(ev, f)
    report = NatCheckReport("192.0.2.10:8086", f, recommend(f), verdict(f), 1.0,
                            evidence=ev, rfc5382=rows, rfc5382_asked=True)
    text = table(report)
    assert "RFC 5382" in text and all(r.req in text for r in rows)
    lines = evidence_lines(report)
    # REQ-8's packets: our hairpin SYN out, the NAT's own RST back
    assert any(line.startswith("  REQ-8 evidence: ") and " out SYN " in line for line in lines)
    assert any(line.startswith("  REQ-8 evidence: ") and " in RST " in line for line in lines)
    assert "RFC 5382" not in table(NatCheckReport("s", f, recommend(f), verdict(f), 1.0,
                                                  evidence=ev, rfc5382=rows))


# --- the late-icmp profile's helper (lab/holdsyn.py), without a socket --------------------

def test_holdsyn_messages_and_parsing() -> None:
    import socket
    import struct

    from synprobe.lab import holdsyn as H

    bind, params = H.bind_messages(5382)
    for msg in (bind, params):
        length, kind, flags = struct.unpack_from("=IHH", msg)
        assert length == len(msg) and length % 4 == 0
        assert kind == (H.NFNL_SUBSYS_QUEUE << 8) | H.NFQNL_MSG_CONFIG
        assert flags == H.NLM_F_REQUEST | H.NLM_F_ACK
        assert struct.unpack_from("!H", msg, 18)[0] == 5382  # nfgenmsg res_id: the queue
    assert H.attributes(bind[16:])[H.NFQA_CFG_CMD] == struct.pack("!BxH", 1, socket.AF_INET)
    v = H.verdict(5382, 77, H.NF_REPEAT, 0x5382)
    attrs = H.attributes(v[16:])
    assert attrs[H.NFQA_VERDICT_HDR] == struct.pack("!II", H.NF_REPEAT, 77)
    assert attrs[H.NFQA_MARK] == struct.pack("!I", 0x5382)
    assert H.NFQA_MARK not in H.attributes(H.verdict(5382, 77, H.NF_DROP)[16:])
    # a queued SYN as the kernel sends it: packet header, then the payload's first bytes
    ip = bytes([0x45, 0, 0, 44, 0, 0, 0, 0, 64, 6, 0, 0]) + socket.inet_aton(
        "192.0.2.10") + socket.inet_aton("198.51.100.2")
    body = (struct.pack("!BBH", 0, 0, 5382)
            + H._attr(H.NFQA_PACKET_HDR, struct.pack("!IHB", 9, 0x0800, 1))
            + H._attr(H.NFQA_PAYLOAD, ip + struct.pack("!HH", 8088, 40001)))
    datagram = struct.pack("=IHHII", 16 + len(body), H.NFNL_SUBSYS_QUEUE << 8, 0, 0, 0) + body
    [(kind, got)] = list(H.split(datagram))
    assert H.packet(got) == (9, ("192.0.2.10", 8088, "198.51.100.2", 40001))


CONNTRACK_LINE = ("ipv4     2 tcp      6 117 SYN_SENT src=10.1.0.2 dst=192.0.2.10 "
                  "sport=40001 dport=8088 [UNREPLIED] src=192.0.2.10 dst=198.51.100.2 "
                  "sport=8088 dport=40001 mark=0 zone=0 use=2\n")


def test_holdsyn_drops_a_syn_the_host_answered_meanwhile_else_rejects() -> None:
    from synprobe.lab import holdsyn as H

    held = H.Held(9, ("192.0.2.10", 8088, "198.51.100.2", 40001), 0.0)
    assert H.decide(held, CONNTRACK_LINE, 0x5382) == (H.NF_DROP, None)  # REQ-4's 2nd case
    other = H.Held(10, ("192.0.2.10", 8088, "198.51.100.2", 40002), 0.0)
    assert H.decide(other, CONNTRACK_LINE, 0x5382) == (H.NF_REPEAT, 0x5382)
    assert H.decide(held, "", 0x5382) == (H.NF_REPEAT, 0x5382)


def test_evidence_of_the_rfc5382_probes_comes_back_from_its_json() -> None:
    from synprobe.natcheck.evidence import probes_of

    _, ev = load("home")
    assert ev.raw is not None
    ev = replace(ev, rfc5382_asked=True, raw=replace(
        ev.raw, hairpin_sent=False, followed_port=40001, icmp_keep_port=40002,
        broker=P.Result("drop", 10, (), None, "drop", None, WATCHED)))
    again = Evidence.from_json(ev.to_json(), ev.raw.seen)
    assert again == ev
    assert again.to_json() == ev.to_json()
    probes = probes_of(ev)
    assert (probes["followed_port"], probes["icmp_keep_port"], probes["hairpin_port"]) == (
        40001, 40002, None)
