"""The broker's abuse defences as pure code (simulsyn_core._internal.limits)."""

from __future__ import annotations

import random

from simulsyn_core._internal.limits import LogThrottle, MaxCounter, TokenBuckets, prefix_of


def test_prefix_is_the_slash_24_or_the_slash_64() -> None:
    assert prefix_of("198.51.100.77") == "198.51.100.0/24"
    assert prefix_of("127.3.2.1") == "127.3.2.0/24"
    assert prefix_of("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert prefix_of("fe80::1%eth0") == "fe80::/64"
    assert prefix_of("nonsense:") == "nonsense:"


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    buckets = TokenBuckets(rate=5, burst=20)
    assert sum(buckets.allow("a", 0.0) for _ in range(100)) == 20
    assert buckets.allow("b", 0.0)  # another key has its own bucket
    assert sum(buckets.allow("a", 1.0) for _ in range(100)) == 5  # one second: 5 more
    # then 10 requests a second for 10 s: half of them pass (5/s), never the burst again
    assert sum(buckets.allow("a", 1 + t / 10) for t in range(1, 101)) == 50


def test_token_buckets_forget_idle_keys_and_stay_bounded() -> None:
    buckets = TokenBuckets(rate=5, burst=20, max_keys=1000)
    for i in range(10000):
        buckets.allow(i, 0.0)
    assert len(buckets) == 1000
    buckets.allow("late", 10.0)  # all others refilled (20/5 = 4 s): dropped
    assert len(buckets) == 1


def test_log_throttle_one_line_per_key_per_interval() -> None:
    throttle = LogThrottle(interval_s=10)
    said = [throttle.note("x", t / 100) for t in range(2000)]  # 20 s, 100 events a second
    assert [i for i, (log, _) in enumerate(said) if log] == [0, 1000]
    assert said[1000] == (True, 999)


def test_max_counter_tracks_the_largest_key() -> None:
    rng = random.Random(7)
    counter = MaxCounter()
    shadow: dict[int, int] = {}
    for _ in range(5000):
        key = rng.randrange(20)
        if shadow.get(key) and rng.random() < 0.5:
            counter.add(key, -1)
            shadow[key] -= 1
        else:
            counter.add(key)
            shadow[key] = shadow.get(key, 0) + 1
        best = max(shadow.values())
        assert counter.max == best
        assert counter.top() == ({k for k, v in shadow.items() if v == best} if best else set())
    assert all(counter[k] == v for k, v in shadow.items())
