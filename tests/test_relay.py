"""relay.py without a network: tokens, waits, the limits, why a session ended."""

from __future__ import annotations

import itertools

import pytest

from simulsyn_core._internal.relay import (
    TOKEN_RE,
    Pair,
    Refuse,
    RelayLimits,
    RelayTable,
    Wait,
)


def _table(**limits: float) -> RelayTable:
    counter = itertools.count()
    return RelayTable(RelayLimits(**limits),  # type: ignore[arg-type]
                      new_token=lambda: f"{next(counter):032x}")


def test_issued_tokens_are_32_lowercase_hex_and_new_each_time() -> None:
    table = RelayTable()
    tokens = {table.issue(0.0) for _ in range(100)}
    assert len(tokens) == 100 and all(TOKEN_RE.fullmatch(t) for t in tokens)


def test_first_waits_second_pairs_and_the_token_is_used_up() -> None:
    table = _table()
    token = table.issue(0.0)
    assert table.arrive(token, "a", "10.0.0.1", 1.0) == Wait(token)
    paired = table.arrive(token, "b", "10.0.0.2", 2.0)
    assert isinstance(paired, Pair)
    assert (paired.session.first, paired.session.second) == ("a", "b")
    assert len(table) == 1
    third = table.arrive(token, "c", "10.0.0.3", 3.0)
    assert isinstance(third, Refuse) and third.code == "unknown-token"
    assert table.status(token, 3.0)[0] == "active"
    assert table.end(token, "closed", "both sides finished", 4.0) is paired.session
    assert len(table) == 0
    assert table.status(token, 5.0) == ("closed", "both sides finished")
    again = table.arrive(token, "d", "10.0.0.1", 5.0)
    assert isinstance(again, Refuse) and again.code == "unknown-token"


def test_unknown_and_expired_tokens() -> None:
    table = RelayTable(token_ttl_s=600.0)
    refusal = table.arrive("0" * 32, "a", "10.0.0.1", 0.0)
    assert isinstance(refusal, Refuse) and refusal.code == "unknown-token"
    token = table.issue(0.0)
    late = table.arrive(token, "a", "10.0.0.1", 600.0)
    assert isinstance(late, Refuse) and late.code == "unknown-token"
    assert table.status(token, 600.0)[0] == "unknown"


def test_token_table_is_bounded_oldest_dropped_first() -> None:
    table = RelayTable(max_tokens=3)
    tokens = [table.issue(0.0) for _ in range(4)]
    assert isinstance(table.arrive(tokens[0], "a", "10.0.0.1", 1.0), Refuse)
    assert isinstance(table.arrive(tokens[1], "b", "10.0.0.1", 1.0), Wait)


def test_a_waiter_that_leaves_gives_the_token_back() -> None:
    table = _table()
    token = table.issue(0.0)
    assert isinstance(table.arrive(token, "a", "10.0.0.1", 1.0), Wait)
    assert not table.leave(token, "someone-else")
    assert table.leave(token, "a")
    assert len(table) == 0
    assert isinstance(table.arrive(token, "b", "10.0.0.1", 40.0), Wait)


def test_sessions_at_once_and_per_address() -> None:
    table = _table(sessions=2, per_ip=1)
    t1, t2, t3 = (table.issue(0.0) for _ in range(3))
    assert isinstance(table.arrive(t1, "a1", "10.0.0.1", 0.0), Wait)
    busy = table.arrive(t2, "a2", "10.0.0.1", 0.0)
    assert isinstance(busy, Refuse) and busy.code == "relay-busy"
    assert isinstance(table.arrive(t2, "b2", "10.0.0.2", 0.0), Wait)
    full = table.arrive(t3, "c3", "10.0.0.3", 0.0)
    assert isinstance(full, Refuse) and full.code == "relay-full"
    # The second side: its own address must have room, unless it is the first's.
    busy = table.arrive(t1, "x", "10.0.0.2", 0.0)
    assert isinstance(busy, Refuse) and busy.code == "relay-busy"
    assert isinstance(table.arrive(t1, "a1b", "10.0.0.1", 0.0), Pair)
    table.end(t1, "closed", "", 1.0)
    assert isinstance(table.arrive(t3, "c3", "10.0.0.1", 1.0), Wait)


def test_rate_bucket_and_budget() -> None:
    table = _table(rate=1000, budget=5000)
    token = table.issue(0.0)
    table.arrive(token, "a", "10.0.0.1", 0.0)
    paired = table.arrive(token, "b", "10.0.0.2", 0.0)
    assert isinstance(paired, Pair)
    s = paired.session
    assert s.allowance(0.0) == 250  # a quarter second's worth
    s.count(0, 250, 0.0)
    assert s.allowance(0.0) == 0
    assert s.wait_for(100, 0.0) == pytest.approx(0.1)
    assert s.allowance(0.1) == pytest.approx(100)
    s.count(1, 100, 0.1)
    assert s.sent == [250, 100] and s.total == 350
    assert not s.over_budget(5000 - 350)
    assert s.over_budget(5000 - 350 + 1)
    assert s.idle_left(0.1) == pytest.approx(300.0)


def test_no_rate_no_budget() -> None:
    table = _table(rate=0, budget=0)
    token = table.issue(0.0)
    table.arrive(token, "a", "10.0.0.1", 0.0)
    paired = table.arrive(token, "b", "10.0.0.1", 0.0)
    assert isinstance(paired, Pair)
    assert paired.session.allowance(0.0) == float("inf")
    assert not paired.session.over_budget(10**15)


def test_ended_reasons_are_forgotten_after_a_while() -> None:
    table = RelayTable(ended_keep_s=120.0)
    token = table.issue(0.0)
    table.arrive(token, "a", "10.0.0.1", 0.0)
    table.arrive(token, "b", "10.0.0.2", 0.0)
    table.end(token, "budget", "over 100 bytes", 10.0)
    assert table.status(token, 129.0) == ("budget", "over 100 bytes")
    assert table.status(token, 131.0)[0] == "unknown"
