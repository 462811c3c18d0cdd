"""The punch schedule's decisions, without a network."""

from __future__ import annotations

from simulsyn_core.punch import Attempt, GiveUp, Go, Pause, PunchSchedule


def test_first_step_is_an_attempt_bounded_by_the_remaining_time() -> None:
    sched = PunchSchedule(retries=3, retry_interval_s=0.01, attempt_timeout_s=10)
    assert sched.next(30.0) == Go(10)
    assert sched.next(2.5) == Go(2.5)


def test_a_refused_attempt_is_followed_by_one_pause_then_a_retry() -> None:
    sched = PunchSchedule(retries=3, retry_interval_s=0.01, attempt_timeout_s=10)
    sched.record(Attempt(1, 0.0, 0.001, "ECONNREFUSED"))
    assert sched.next(5.0) == Pause(0.01)
    sched.paused()
    assert sched.next(5.0) == Go(5.0)


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
