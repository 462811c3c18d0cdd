"""The broker's choice of strategy (plan_pair, SessionTable), its sync delivery, its SYN
probe of a registering client's NAT, and what the punch takes from the last nat-check.

The expected choices are written from the rules in docs/protocol.md, case by case."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time

import pytest

from simulsyn_core._internal.broker import probe_unsolicited, sync_delays
from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.rendezvous import Facts, SessionTable, plan_pair
from simulsyn_core._internal.wire import parse_line
from synprobe import state

ALL = frozenset({"prime", "order", "sync"})
A = Endpoint("198.51.100.2", 40001)
B = Endpoint("203.0.113.2", 40002)


def facts(unsolicited: str | None = None, reply_syn: str | None = None,
          offers: frozenset[str] = ALL) -> Facts:
    return Facts(offers, None, unsolicited, reply_syn)


@pytest.mark.parametrize("w, j, strategy, waiting_first", [
    # both drop early SYNs silently: no harm in sending at once
    (("drop", "pass"), ("drop", "pass"), "sync", True),
    (("drop", None), ("drop", None), "sync", True),
    # one answers: it sends first (role second), the dropping side after GO (first)
    (("reject", None), ("drop", None), "order", False),
    (("drop", None), ("reject", None), "order", True),
    # both answer: neither may meet an early SYN
    (("reject", None), ("reject", None), "prime", True),
    # nothing known
    ((None, None), (None, None), "prime", True),
    ((None, None), ("drop", None), "order", False),  # only the first's NAT must be known
    # a NAT that drops reply SYNs: its side sends the crossing SYN (role first)
    (("drop", "blocked"), ("drop", "pass"), "order", True),
    (("drop", "pass"), ("drop", "blocked"), "order", False),
    (("reject", "pass"), ("drop", "blocked"), "order", False),
    (("reject", "blocked"), ("drop", "pass"), "prime", True),
    (("reject", "pass"), ("reject", "blocked"), "prime", False),
    ((None, None), (None, "blocked"), "prime", False),
])
def test_auto_chooses_from_what_is_known(w: tuple, j: tuple, strategy: str,
                                         waiting_first: bool) -> None:
    plan = plan_pair(facts(*w), facts(*j))
    assert (plan.strategy, plan.waiting_is_first) == (strategy, waiting_first)
    assert plan.why


def test_the_choice_is_only_among_what_both_offered() -> None:
    plain = plan_pair(facts("drop", offers=frozenset()), facts("drop"))
    assert plain.strategy is None
    # an older punch offers prime only
    assert plan_pair(facts("drop", offers=frozenset({"prime"})), facts("drop")).strategy \
        == "prime"
    # forced order with nothing known: the joining side sends first
    only_order = frozenset({"order"})
    plan = plan_pair(facts(offers=only_order), facts(offers=only_order))
    assert (plan.strategy, plan.waiting_is_first) == ("order", True)
    # forced order: a side whose NAT drops reply SYNs is always first, and the reason
    # says when the facts are against it
    plan = plan_pair(facts(None, "pass", only_order), facts(None, "blocked", only_order))
    assert (plan.strategy, plan.waiting_is_first) == ("order", False)
    plan = plan_pair(facts("reject", "blocked", only_order), facts("drop", "pass", only_order))
    assert (plan.strategy, plan.waiting_is_first) == ("order", True)
    assert "safer" in plan.why
    plan = plan_pair(facts("reject", offers=only_order), facts("reject", offers=only_order))
    assert plan.strategy == "order" and "safer" in plan.why
    # forced sync where order would be safer: asked for, given
    only_sync = frozenset({"sync"})
    assert plan_pair(facts("reject", offers=only_sync),
                     facts("drop", offers=only_sync)).strategy == "sync"


def test_every_combination_gives_a_plan_whose_first_can_receive_nothing_it_blocks() -> None:
    values = (None, "drop", "reject"), (None, "pass", "blocked")
    for wu, wr, ju, jr in itertools.product(values[0], values[1], values[0], values[1]):
        if wr == jr == "blocked":
            continue  # refused before planning
        plan = plan_pair(facts(wu, wr), facts(ju, jr))
        second = (ju, jr) if plan.waiting_is_first else (wu, wr)
        first = (wu, wr) if plan.waiting_is_first else (ju, jr)
        if plan.strategy in ("order", "prime"):
            assert second[1] != "blocked"  # the second's NAT receives the crossing SYN
        if plan.strategy == "order":
            assert first[0] == "drop"  # it meets the second's early SYN
        if plan.strategy == "sync":
            assert wu == ju == "drop"


def _lines(replies: list) -> list:
    return [(r.conn, parse_line(r.data.rstrip(b"\n")), r.close, r.sync) for r in replies]


def test_table_tells_roles_strategy_and_why_and_keeps_order_pairs_open() -> None:
    table = SessionTable()
    table.register("a", "s", A, None, 0.0, ALL, unsolicited="reject")
    told = _lines(table.register("b", "s", B, None, 0.1, ALL, unsolicited="drop"))
    assert [(c, m.fields["strategy"], m.fields["role"], close, sync)
            for c, m, close, sync in told] == [("a", "order", "second", False, False),
                                               ("b", "order", "first", False, False)]
    assert "sends_first" in told[0][1].fields["why"]
    assert table.priming("a") and table.priming("b")
    # GO as soon as the second (here "a", which sends first) said PRIMED
    go = _lines(table.step("a", "PRIMED"))
    assert sorted((c, m.verb, close) for c, m, close, _ in go) == [("a", "GO", True),
                                                                  ("b", "GO", True)]
    assert not table.priming("a") and not table.priming("b")
    # the first of an order pair has nothing to say
    table = SessionTable()
    table.register("a", "s", A, None, 0.0, ALL, unsolicited="reject")
    table.register("b", "s", B, None, 0.1, ALL, unsolicited="drop")
    told = _lines(table.step("b", "PRIMED"))
    assert sorted((c, m.fields["code"]) for c, m, _, _ in told) == [("a", "peer-gone"),
                                                                     ("b", "bad-request")]


def test_sync_pairs_are_closed_and_marked_for_timed_delivery() -> None:
    table = SessionTable()
    table.register("a", "s", A, None, 0.0, ALL, unsolicited="drop")
    told = _lines(table.register("b", "s", B, None, 0.1, ALL, unsolicited="drop"))
    assert [(m.fields["strategy"], close, sync) for _, m, close, sync in told] == [
        ("sync", True, True), ("sync", True, True)]
    assert not table.priming("a")


def test_an_older_client_gets_no_why() -> None:
    table = SessionTable()
    table.register("a", "s", A, None, 0.0)
    told = _lines(table.register("b", "s", B, None, 0.1, ALL))
    assert "why" not in told[0][1].fields and "strategy" not in told[0][1].fields


def test_both_nats_dropping_reply_syns_are_refused_at_once() -> None:
    table = SessionTable()
    table.register("a", "s", A, None, 0.0, ALL, reply_syn="blocked")
    told = _lines(table.register("b", "s", B, None, 0.1, ALL, reply_syn="blocked"))
    assert [(c, m.verb, m.fields["code"], close) for c, m, close, _ in told] == [
        ("a", "ERROR", "untraversable", True), ("b", "ERROR", "untraversable", True)]
    assert "reply" in told[0][1].fields["message"]
    table = SessionTable()
    table.register("a", "s", A, None, 0.0, ALL, reply_syn="blocked")
    assert [m.verb for _, m, _, _ in _lines(table.register("b", "s", B, None, 0.1, ALL))] \
        == ["PEER", "PEER"]


def test_sync_delays_hold_the_nearer_peer_back_by_half_the_rtt_difference() -> None:
    assert sync_delays([(0.100, 0.005), (0.020, 0.002)]) == pytest.approx([0.0, 0.040])
    assert sync_delays([(0.010, 0.001), (0.010, 0.001)]) == [0.0, 0.0]
    # a difference within the paths' own jitter is not held for: it is noise
    assert sync_delays([(0.108, 0.010), (0.100, 0.010)]) == [0.0, 0.0]
    assert sync_delays([None, (0.020, 0.001)]) == [0.0, 0.0]  # unknown: nobody is held
    assert sync_delays([(5.0, 0.1), (0.0001, 0.0)])[1] == 1.0  # bounded


def test_syn_probe_tells_an_answered_syn_from_a_dropped_one() -> None:
    # Answered: a closed port on loopback (RST).
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert asyncio.run(probe_unsolicited(Endpoint("127.0.0.1", port), "127.0.0.1", 1.0)) \
        == "reject"
    # Dropped: a listener whose accept queue is full drops a new SYN silently (Linux,
    # tcp_abort_on_overflow 0).
    with open("/proc/sys/net/ipv4/tcp_abort_on_overflow") as f:
        assert f.read().strip() == "0"
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        target = Endpoint("127.0.0.1", full.getsockname()[1])
        fillers = [socket.create_connection(target.sockaddr, timeout=2) for _ in range(1)]
        try:
            started = time.monotonic()
            assert asyncio.run(probe_unsolicited(target, "127.0.0.1", 0.3)) == "drop"
            assert time.monotonic() - started < 2.5  # its 0.3 s, on a loaded machine
        finally:
            for s in fillers:
                s.close()


def _save(result: dict, when: float) -> None:
    state.save_last_natcheck(result, ["synprobe", "nat-check"])
    path = state.state_dir() / state.NATCHECK_FILE
    record = json.loads(path.read_text())
    record["time"] = when
    path.write_text(json.dumps(record))


def test_the_last_nat_check_gives_facts_for_its_network_only_when_fresh() -> None:
    result = {"public": ["198.51.100.2:40001"], "unsolicited_syn": "icmp-admin-prohibited",
              "reply_syn": "blocked", "recommendation": {"ttl": {"value": 3, "reason": ""}},
              "error": None}
    assert state.last_natcheck_facts() is None
    _save(result, time.time() - 60)
    got = state.last_natcheck_facts()
    assert got is not None
    assert (got.public_ip, got.unsolicited, got.reply_syn, got.ttl) == (
        "198.51.100.2", "reject", "blocked", 3)
    _save({**result, "unsolicited_syn": "drop", "reply_syn": None}, time.time())
    got = state.last_natcheck_facts()
    assert got is not None and (got.unsolicited, got.reply_syn) == ("drop", None)
    _save(result, time.time() - 2 * 86400)
    assert state.last_natcheck_facts() is None  # too old
    _save({**result, "error": "the broker did not answer"}, time.time())
    assert state.last_natcheck_facts() is None  # a failed nat-check says nothing


def test_the_broker_probes_only_registrations_it_can_use() -> None:
    table = SessionTable()
    assert table.worth_probing("a", "s", ALL, "same")
    assert table.worth_probing("a", "s", frozenset({"sync"}), None)
    assert not table.worth_probing("a", "s", frozenset({"prime"}), None)  # an older punch
    assert not table.worth_probing("a", "s", frozenset(), None)  # plain
    assert not table.worth_probing("a", "s", ALL, "varies")  # refused anyway
    assert not table.worth_probing("a", "bad name!", ALL, None)
    table.register("a", "s", A, None, 0.0, ALL, mapping="varies")
    assert not table.worth_probing("a", "s2", ALL, None)  # registered already
    assert not table.worth_probing("b", "s", ALL, None)  # its peer's NAT randomises


def test_first_and_second_go_with_peer_or_seed_broker_only(capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    from synprobe.cli import main

    assert main(["punch", "--broker", "127.0.0.1:9", "--session", "s", "--first"]) == 2
    assert "--first goes with --peer or --seed-broker" in capsys.readouterr().err
