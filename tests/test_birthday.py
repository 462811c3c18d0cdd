"""Birthday punching as pure code: the chance, the guesses, the wire fields, the plan the
broker makes for each combination of what it knows, and the sockets on loopback."""

from __future__ import annotations

import math
import random
import socket
import subprocess
import sys

import pytest

from simulsyn_core._internal import birthday as bday
from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.rendezvous import Facts, SessionTable, plan_pair
from simulsyn_core._internal.spray import Pool
from simulsyn_core._internal.wire import parse_line

ALL = frozenset({"prime", "order", "sync", "birthday"})
A = Endpoint("198.51.100.2", 40000)
B = Endpoint("203.0.113.2", 41000)


def test_the_uniform_chance_is_the_formula() -> None:
    assert bday.p_uniform(450, 450, 64512) == pytest.approx(
        1 - (1 - 450 / 64512) ** 450, rel=1e-12)
    # ~ 1 - exp(-N M / R), a little above it (distinct guesses)
    assert bday.p_uniform(450, 450, 64512) >= 1 - math.exp(-450 * 450 / 64512)
    assert bday.p_uniform(256, 64512, 64512) == 1.0
    assert bday.p_uniform(1, 1, 64512) == pytest.approx(1 / 64512)


def test_linux_weights_follow_the_u16_modulo() -> None:
    assert bday.linux_weights((1024, 65535)) == (1024, 2, 1)
    assert bday.linux_weights((20000, 29999)) == (5536, 7, 6)
    assert bday.linux_weights((1, 65536 - 1)) == (1, 2, 1)
    # brute force on a small range: the draws land as the weights say
    lo, hi = 1000, 1009
    counts = [0] * 10
    for off in range(65536):
        counts[(lo + off % 10) - lo] += 1
    hot, w_hot, w_cold = bday.linux_weights((lo, hi))
    assert counts == [w_hot] * hot + [w_cold] * (10 - hot)


def test_the_hot_band_doubles_each_guess_against_linux() -> None:
    uniform = bday.p_uniform(450, 450, 64512)
    weighted = bday.p_weighted(450, 450, (1024, 65535))
    assert weighted == pytest.approx(1 - (1 - 900 / 65536) ** 450)
    assert weighted > 0.99 > 0.95 < uniform < weighted
    # past the band, each further guess counts once
    assert bday.p_weighted(1, 1024 + 10, (1024, 65535)) == pytest.approx((2048 + 10) / 65536)


def test_guesses_are_distinct_in_range_and_take_the_hot_band_first() -> None:
    rng = random.Random(3)
    ports = bday.guess_ports(1500, (1024, 65535), rng)
    assert len(ports) == len(set(ports)) == 1500
    assert all(1024 <= p <= 65535 for p in ports)
    assert set(ports[:1024]) == set(range(1024, 2048))
    assert all(p >= 2048 for p in ports[1024:])
    assert ports[:20] != sorted(ports[:20])  # shuffled, not a sweep
    small = bday.guess_ports(50, (20000, 20009), rng)
    assert sorted(small) == list(range(20000, 20010))  # at most the whole range


def test_offer_and_plan_travel_in_messages_and_bad_values_are_ignored() -> None:
    offer = bday.Offer(sockets=300, port_range=(20000, 29999), port_hot=(20000, 20535))
    fields = {k: v for k, v in offer.fields().items() if v is not None}
    assert fields == {"sockets": "300", "port_range": "20000-29999", "port_hot": "20000-20535"}
    assert bday.Offer.parse(fields.get) == offer
    bad = {"sockets": "0", "guesses": "99999999", "port_range": "5-1", "port_hot": "x-y"}
    assert bday.Offer.parse(bad.get) == bday.Offer()
    plan = bday.Plan(450, 300, (1024, 65535), None, bday.ORDER_GUESSES_FIRST, False)
    got = {k: v for k, v in plan.fields("guesses").items() if v is not None}
    assert bday.Plan.parse(got.get) == ("guesses", plan)
    del got["order"]
    assert bday.Plan.parse(got.get) is None  # not a whole plan


# (random NAT's (unsolicited, reply_syn), easy NAT's) -> (order, TTL-limited)
PLANS = [
    ((None, None), (None, None), bday.ORDER_SOCKETS_FIRST, True),  # nothing known
    (("drop", None), ("drop", None), bday.ORDER_SOCKETS_FIRST, False),
    ((None, None), ("drop", None), bday.ORDER_SOCKETS_FIRST, False),
    (("drop", None), ("reject", None), bday.ORDER_GUESSES_FIRST, False),
    (("drop", None), (None, None), bday.ORDER_GUESSES_FIRST, False),
    (("reject", None), ("reject", None), bday.ORDER_SOCKETS_FIRST, True),
    (("drop", None), ("reject", "blocked"), bday.ORDER_SOCKETS_FIRST, True),
    (("drop", None), ("drop", "blocked"), bday.ORDER_SOCKETS_FIRST, False),
    (("drop", "blocked"), ("reject", None), bday.ORDER_GUESSES_FIRST, False),
]


@pytest.mark.parametrize("random_facts, easy_facts, order, limited", PLANS)
def test_who_goes_first(random_facts: tuple[str | None, str | None],
                        easy_facts: tuple[str | None, str | None], order: str,
                        limited: bool) -> None:
    plan = bday.plan(bday.Offer(sockets=200), bday.Offer(guesses=300), random_facts,
                     easy_facts)
    assert (plan.order, plan.ttl_limited) == (order, limited)
    assert (plan.sockets, plan.guesses, plan.port_range) == (200, 300, (1024, 65535))


def test_plan_pair_gives_birthday_only_for_exactly_one_varying_mapping() -> None:
    rnd = Facts(ALL, "varies", "drop", None, bday.Offer(sockets=100))
    easy = Facts(ALL, "same", "reject", None, bday.Offer(guesses=200))
    plan = plan_pair(rnd, easy)
    assert plan.strategy == "birthday" and plan.birthday is not None
    # guesses first: the easy side (joining) is second, the random side (waiting) first
    assert plan.waiting_is_first and plan.birthday.order == bday.ORDER_GUESSES_FIRST
    assert plan_pair(easy, rnd).waiting_is_first is False
    assert plan_pair(rnd, Facts(ALL, "varies")).strategy != "birthday"
    no_offer = Facts(frozenset({"prime"}), "same")
    assert plan_pair(rnd, no_offer).strategy != "birthday"
    unknown = Facts(ALL, None, None, None, bday.Offer(guesses=50))
    assert plan_pair(unknown, rnd).strategy == "birthday"  # unknown mapping: try


def _lines(replies: list) -> dict:
    return {r.conn: parse_line(r.data.rstrip(b"\n")) for r in replies}


def test_the_broker_pairs_one_random_nat_for_birthday_and_refuses_two() -> None:
    table = SessionTable()
    table.register("r", "s", A, None, 0.0, ALL, mapping="varies", unsolicited="drop",
                   birthday=bday.Offer(sockets=320, port_range=(1024, 65535),
                                       port_hot=(1024, 2047)))
    msgs = _lines(table.register("e", "s", B, None, 0.1, ALL, mapping="same",
                                 unsolicited="drop", birthday=bday.Offer(guesses=280)))
    assert {m.verb for m in msgs.values()} == {"PEER"}
    r, e = msgs["r"], msgs["e"]
    assert (r.get("birthday"), e.get("birthday")) == ("sockets", "guesses")
    assert r.get("role") == "second" and e.get("role") == "first"  # sockets first
    for m in (r, e):
        assert (m.get("strategy"), m.get("sockets"), m.get("guesses")) == ("birthday", "320",
                                                                            "280")
        assert (m.get("port_range"), m.get("port_hot")) == ("1024-65535", "1024-2047")
        assert m.get("order") == "sockets-first" and m.get("ttl_limited") == "0"
    # The exchange: GO to both once the second (the random side) said PRIMED.
    assert table.priming("r") and table.priming("e")
    assert [x.data.split()[1] for x in table.step("r", "PRIMED")] == [b"GO", b"GO"]

    table.register("x", "t", A, None, 0.0, ALL, mapping="varies")
    refused = _lines(table.register("y", "t", B, None, 0.1, ALL, mapping="varies"))
    assert {m.get("code") for m in refused.values()} == {"untraversable"}
    table.register("p", "u", A, None, 0.0, frozenset({"prime"}), mapping="varies")
    refused = _lines(table.register("q", "u", B, None, 0.1, ALL, mapping="same"))
    assert {m.get("code") for m in refused.values()} == {"untraversable"}  # no birthday


def test_the_broker_probes_a_birthday_pair() -> None:
    table = SessionTable()
    assert table.worth_probing("a", "s", ALL, "varies")
    assert not table.worth_probing("a", "s", frozenset({"order", "sync"}), "varies")
    table.register("a", "s", A, None, 0.0, ALL, mapping="varies")
    assert table.worth_probing("b", "s", ALL, "same")
    assert not table.worth_probing("b", "s", ALL, "varies")  # both random: refused
    assert not table.worth_probing("b", "s", frozenset({"order"}), "same")


def test_nofile_is_raised_within_the_hard_limit() -> None:
    # In a child: a hard limit once lowered cannot be raised again.
    code = ("import resource; from simulsyn_core._internal.spray import raise_nofile; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2000)); "
            "print(raise_nofile(1000), resource.getrlimit(resource.RLIMIT_NOFILE)[0]); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512)); "
            "print(raise_nofile(1000), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=30).stdout.split()
    assert out == ["1000", "1064", "448", "512"]  # raised; capped by the hard limit


@pytest.mark.parametrize("rate", [2000.0, 1e9])
def test_a_burst_on_loopback_finds_the_one_listening_port_and_closes_the_rest(rate: float
                                                                              ) -> None:
    """A stand-in for the random side's one open port among many: a listener on
    loopback; the burst aims at 40 closed ports and that one, at a bounded rate. At 1e9
    a second every SYN is behind its schedule (as after a late wake-up under load): the
    burst still looks for connections before each one and stops at the listener."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    target = server.getsockname()[1]
    closed = []
    for _ in range(40):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        closed.append(s)  # bound, not listening: a SYN to it gets an RST
    targets = [Endpoint("127.0.0.1", s.getsockname()[1]) for s in closed]
    targets.insert(25, Endpoint("127.0.0.1", target))
    pool = Pool()
    try:
        sent = pool.burst(targets, 0, None, rate, None, float("inf"), stop_on_connect=True)
        assert pool.connected and pool.connected[0][1] == 25
        assert sent == 26 and pool.opened == 26
        assert pool.failed["ECONNREFUSED"] + len(pool.pending) == 25
        keep = pool.connected[0][0]
        pool.close(keep=keep)
        assert keep.getpeername()[1] == target and not pool.pending
        keep.close()
    finally:
        server.close()
        for s in closed:
            s.close()
