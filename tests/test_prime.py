"""The prime strategy's pure parts: the broker's exchange (SessionTable) and the TTL rule."""

from __future__ import annotations

from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.prime import (
    ICMP_DEST_UNREACH,
    ICMP_TIME_EXCEEDED,
    HopAnswer,
    choose_ttl,
    past_our_nats,
)
from simulsyn_core._internal.rendezvous import PRIME_WAIT_MAX_S, SessionTable
from simulsyn_core._internal.wire import parse_line

A = Endpoint("198.51.100.2", 40001)
B = Endpoint("203.0.113.2", 40002)
PRIME = frozenset({"prime"})


def lines(replies: list) -> list[tuple[str, str, dict[str, str], bool]]:
    out = []
    for r in replies:
        msg = parse_line(r.data.rstrip(b"\n")) if r.data else None
        out.append((r.conn, msg.verb if msg else "", msg.fields if msg else {}, r.close))
    return out


def paired(a: frozenset[str] = PRIME, b: frozenset[str] = PRIME) -> tuple[SessionTable, list]:
    table = SessionTable()
    table.register("a", "s", A, None, 0.0, a)
    return table, lines(table.register("b", "s", B, None, 0.1, b))


def test_both_offering_prime_are_told_and_kept_open() -> None:
    table, told = paired()
    assert [(c, v, f["strategy"], close) for c, v, f, close in told] == [
        ("a", "PEER", "prime", False), ("b", "PEER", "prime", False)]
    assert table.priming("a") and table.priming("b")


def test_one_side_without_prime_gets_the_plain_answer() -> None:
    for a, b in ((PRIME, frozenset()), (frozenset(), PRIME)):
        table, told = paired(a, b)
        assert [(v, "strategy" in f, close) for _, v, f, close in told] == [
            ("PEER", False, True), ("PEER", False, True)]
        assert not table.priming("a") and not table.priming("b")


def test_go_to_both_once_both_primed_and_only_then() -> None:
    table, _ = paired()
    assert table.step("b", "PRIMED") == []
    assert table.step("b", "PRIMED") != []  # said twice: out of order, both told
    table, _ = paired()
    assert table.step("a", "PRIMED") == []
    go = lines(table.step("b", "PRIMED"))
    assert [(c, v, close) for c, v, _, close in go] == [("a", "GO", True), ("b", "GO", True)]
    assert not table.priming("a") and not table.priming("b")


def test_a_side_that_leaves_or_stalls_releases_the_other() -> None:
    table, _ = paired()
    table.step("a", "PRIMED")
    gone = lines(table.disconnect("a"))
    assert [(c, v, f["code"]) for c, v, f, _ in gone] == [("b", "ERROR", "peer-gone")]
    table, _ = paired()
    assert table.expire(PRIME_WAIT_MAX_S) == []
    stale = lines(table.expire(PRIME_WAIT_MAX_S + 1))
    assert sorted((c, f["code"]) for c, _, f, _ in stale) == [("a", "timeout"), ("b", "timeout")]


def test_primed_outside_a_pair_is_refused() -> None:
    table = SessionTable()
    (refusal,) = lines(table.step("x", "PRIMED"))
    assert refusal[1:3] == ("ERROR", {"code": "bad-request",
                                      "message": "PRIMED_outside_a_primed_pair"})


def hops(*offenders: str, peer: str = "", peer_answers: bool = False) -> list[HopAnswer]:
    out = [HopAnswer(i, o, ICMP_TIME_EXCEEDED, 0, 0.0001 * i)
           for i, o in enumerate(offenders, start=1)]
    if peer_answers:
        out.append(HopAnswer(len(offenders) + 1, peer, ICMP_DEST_UNREACH, 3, 0.001))
    return out


def test_ttl_passes_our_nats_and_stops_short_of_the_peer() -> None:
    # The lab's paths (host A's view): a home NAT, a carrier behind it, a public host
    # behind a stateful firewall.
    assert choose_ttl(hops("10.1.0.1", "198.51.100.1"), "203.0.113.2")[0] == 2
    assert choose_ttl(hops("10.1.0.1", "100.64.1.1", "198.51.100.1"), "203.0.113.2")[0] == 3
    assert choose_ttl(hops("198.51.100.129", "198.51.100.1"), "203.0.113.2")[0] == 2
    # The peer a public host behind its own firewall: TTL 3 would die *at* that firewall.
    ttl, _ = choose_ttl(hops("10.1.0.1", "198.51.100.1", "203.0.113.129"), "203.0.113.130")
    assert ttl == 2
    # The peer's NAT answering for its address does not count as a router.
    answers = hops("10.1.0.1", "198.51.100.1", peer="203.0.113.2", peer_answers=True)
    assert choose_ttl(answers, "203.0.113.2")[0] == 2


def test_no_ttl_when_no_router_separates_the_nats() -> None:
    # The peer's own address answers at TTL 2: any SYN that leaves our NAT reaches it.
    ttl, why = choose_ttl(hops("10.1.0.1", peer="10.2.0.2", peer_answers=True), "10.2.0.2")
    assert ttl is None and "no router between" in why and "TTL 2" in why
    ttl, why = choose_ttl([], "203.0.113.2")
    assert ttl is None and "no router answered" in why


def test_silent_hops_after_our_nat_are_no_evidence_of_a_near_peer() -> None:
    # A router that rate-limits its ICMP, a peer NAT that drops UDP: only hop 1 answered.
    ttl, why = choose_ttl(hops("10.2.0.1"), "198.51.100.2")
    assert ttl == 2 and "silent" in why
    # A silent hop 1 (a home router that sends no time-exceeded) before a carrier NAT's
    # inside hop: the SYN must still pass both, up to the first outside hop.
    gap = [HopAnswer(2, "100.64.0.1", ICMP_TIME_EXCEEDED, 0),
           HopAnswer(3, "192.0.2.1", ICMP_TIME_EXCEEDED, 0),
           HopAnswer(4, "192.0.2.9", ICMP_TIME_EXCEEDED, 0)]
    assert choose_ttl(gap, "203.0.113.2")[0] == 3


def test_the_measure_waits_until_past_our_nats() -> None:
    # Only the LAN gateway so far: the next hop may be a slow link away, keep waiting.
    assert not past_our_nats(hops("10.1.0.1"), "203.0.113.2")
    assert past_our_nats(hops("10.1.0.1", "198.51.100.1"), "203.0.113.2")
    assert not past_our_nats(hops("10.1.0.1", "100.64.1.1"), "203.0.113.2")
    assert past_our_nats(hops("10.1.0.1", "100.64.1.1", "198.51.100.1"), "203.0.113.2")
    # A public host: its first hop may be its firewall, so hop 2 is needed too.
    assert not past_our_nats(hops("198.51.100.129"), "203.0.113.2")
    assert past_our_nats(hops("198.51.100.129", "198.51.100.1"), "203.0.113.2")
    # The peer's own address answering ends it.
    assert past_our_nats([HopAnswer(2, "203.0.113.2", ICMP_DEST_UNREACH, 3)], "203.0.113.2")
