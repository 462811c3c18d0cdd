"""The broker's defences against abuse, as pure code (no sockets, no clock of its own):
token buckets per address and per prefix, a counter that knows its largest key in O(1),
and a throttle for log lines. broker.py and rendezvous.py feed them ``now``.

Every structure here is bounded in memory: a bucket that has refilled is the same as no
bucket, so idle ones are dropped; past ``max_keys`` the least recently used goes.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Hashable


def prefix_of(ip: str) -> str:
    """The network a client's address is counted in: its /24 for IPv4, its /64 for IPv6
    (what one subscriber, or one cheap cloud host, usually holds)."""
    if ":" not in ip:
        head, dot, _ = ip.rpartition(".")
        return f"{head}.0/24" if dot else ip
    try:
        net = ipaddress.IPv6Network((ip.split("%", 1)[0], 64), strict=False)
    except ValueError:
        return ip
    return str(net)


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up.

    ``allow`` takes one token (True) or says the key is over its rate (False). O(1)
    amortised per call; at most ``max_keys`` buckets are kept (the least recently used
    go first: a forgotten key starts again with a full bucket, the lenient mistake)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 65536) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def tokens(self, key: Hashable, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def allow(self, key: Hashable, now: float, cost: float = 1.0) -> bool:
        tokens = self.tokens(key, now)
        ok = tokens >= cost
        self._buckets[key] = (tokens - cost if ok else tokens, now)
        self._buckets.move_to_end(key)
        self._prune(now)
        return ok

    def _prune(self, now: float) -> None:
        """Drop buckets that are full again (idle for burst/rate), oldest first; past
        max_keys, the least recently used whatever its level."""
        refill_s = self.burst / self.rate if self.rate > 0 else float("inf")
        while self._buckets:
            key, (_, last) = next(iter(self._buckets.items()))
            if now - last < refill_s and len(self._buckets) <= self.max_keys:
                return
            del self._buckets[key]


class LogThrottle:
    """At most one log line per key per ``interval_s``: ``note`` says whether to log now,
    and how many events of that key were kept quiet since the last line."""

    def __init__(self, interval_s: float = 10.0, max_keys: int = 4096) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()

    def note(self, key: Hashable, now: float) -> tuple[bool, int]:
        """(log now?, events suppressed since the last line of this key)."""
        last, quiet = self._last.get(key, (float("-inf"), 0))
        if now - last >= self.interval_s:
            self._last[key] = (now, 0)
            self._last.move_to_end(key)
            while len(self._last) > self.max_keys:
                self._last.popitem(last=False)
            return True, quiet
        self._last[key] = (last, quiet + 1)
        return False, quiet + 1


class MaxCounter:
    """Counts per key, and which key has the largest count, in O(1) per change (counts
    move by one: the keys are kept in sets per count)."""

    def __init__(self) -> None:
        self._count: dict[Hashable, int] = {}
        self._with: dict[int, set[Hashable]] = {}
        self.max = 0

    def __getitem__(self, key: Hashable) -> int:
        return self._count.get(key, 0)

    def __len__(self) -> int:
        return len(self._count)

    def add(self, key: Hashable, delta: int = 1) -> None:
        if delta == 1 or delta == -1:  # (nearly every call: a connection in or out)
            self._step(key, delta)
            return
        for _ in range(abs(delta)):
            self._step(key, 1 if delta > 0 else -1)

    def _step(self, key: Hashable, step: int) -> None:
        old = self._count.get(key, 0)
        new = old + step
        if new < 0:
            raise ValueError(f"count of {key!r} below 0")
        if old:
            keys = self._with[old]
            keys.discard(key)
            if not keys:
                del self._with[old]
                if self.max == old and step < 0:
                    self.max = new
        if new:
            self._count[key] = new
            self._with.setdefault(new, set()).add(key)
            self.max = max(self.max, new)
        else:
            del self._count[key]

    def top(self) -> set[Hashable]:
        """The keys with the largest count (empty when all are 0)."""
        return self._with.get(self.max, set())
