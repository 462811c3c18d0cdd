"""The punch schedule's decisions, without a network."""

from __future__ import annotations

import random

from simulsyn_core._internal.punch import Attempt, GiveUp, Go, Pause, PunchSchedule


def test_first_step_is_an_attempt_bounded_by_the_remaining_time() -> None:
    sched = PunchSchedule(retries=3, retry_interval_s=0.01, attempt_timeout_s=10)
    assert sched.next(30.0) == Go(10)
    assert sched.next(2.5) == Go(2.5)


def test_a_refused_attempt_is_followed_by_one_jittered_pause_then_a_retry() -> None:
    sched = PunchSchedule(retries=3, retry_interval_s=0.01, attempt_timeout_s=10,
                          rng=random.Random(7))
    sched.record(Attempt(1, 0.0, 0.001, "ECONNREFUSED"))
    step = sched.next(5.0)
    assert isinstance(step, Pause) and 0.005 <= step.seconds <= 0.015
    sched.paused()
    assert sched.next(5.0) == Go(5.0)


def test_pauses_are_jittered_so_two_refused_peers_leave_lockstep() -> None:
    sched = PunchSchedule(retries=100, retry_interval_s=0.01, rng=random.Random(1))
    pauses = []
    for n in range(20):
        sched.record(Attempt(n + 1, 0.0, 0.001, "ECONNREFUSED"))
        step = sched.next(5.0)
        assert isinstance(step, Pause)
        pauses.append(step.seconds)
        sched.paused()
    assert len(set(pauses)) == 20 and min(pauses) >= 0.005 and max(pauses) <= 0.015
    sched.record(Attempt(21, 0.0, 0.001, "ECONNREFUSED"))
    assert sched.next(0.003) == Pause(0.003)  # never pauses past the deadline
    sched.paused()
    assert sched.next(0.002) == Go(0.002)  # nor waits past it


def test_a_timed_out_attempt_is_retried_at_once() -> None:
    sched = PunchSchedule(retries=3)
    sched.record(Attempt(1, 0.0, 10.0, "ETIMEDOUT"))
    assert isinstance(sched.next(5.0), Go)


def test_gives_up_on_retries_and_on_time() -> None:
    sched = PunchSchedule(retries=2)
    sched.record(Attempt(1, 0.0, 0.001, "ECONNREFUSED"))
    assert sched.next(0.0) == GiveUp("timed out after 1 attempt(s); last: ECONNREFUSED")
    sched.record(Attempt(2, 0.0, 0.001, "EHOSTUNREACH"))
    assert sched.next(5.0) == GiveUp("no connection after 2 attempt(s); last: EHOSTUNREACH")
