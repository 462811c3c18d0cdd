"""Birthday punching through a port-randomising NAT, as pure code (spray.py has the I/O).

A NAT whose mapping depends on the destination (MASQUERADE --random-fully, the
"symmetric" NATs of carriers) gives each new 4-tuple a random public port: the port the
broker saw is not the one a punch's SYN leaves from. Birthday punching aims anyway:

- the random side opens N sockets from N local ports towards the easy side's public
  endpoint; its NAT gives each its own random public port;
- the easy side, whose NAT keeps one public port, sends SYNs from its one local port
  to M distinct guessed ports of the random side's address;
- a guess that equals one of the N public ports is a 4-tuple both NATs accept (each saw
  its own host's SYN for it): a simultaneous open, or a SYN answered with SYN+ACK.

With the N ports uniform over R ports and M distinct guesses, the chance that none
matches is (1 - M/R)^N, so P(success) = 1 - (1 - M/R)^N ~ 1 - exp(-N*M/R).

Linux's own random-fully is not uniform, and the guesses use it: the kernel draws a
16-bit number and takes it modulo the range size (nf_nat_l4proto_unique_tuple:
``off = get_random_u16(); port = min + off % range_size``). For the default range
1024-65535 (64512 ports) the 1024 lowest ports are drawn twice as often as the others
(measured in the lab: 622 of 20000 connections in 1024-2047, where uniform gives 317).
Guessing those first costs nothing against a uniform NAT and doubles each guess's
chance against Linux. ``p_expected`` uses that model only when nat-check saw the hot
band on the random side's NAT (``port_hot``); else the uniform formula.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from .numbers import ascii_int

DEFAULT_SOCKETS = 700  # N: the random side's sockets
DEFAULT_GUESSES = 700  # M: the easy side's guessed ports
DEFAULT_RATE = 500.0  # new SYNs per second per side, at most
MAX_SOCKETS = 4096
MAX_GUESSES = 16384
MAX_RATE = 10000.0
LINUX_RANGE = (1024, 65535)  # MASQUERADE without --to-ports, for a source port >= 1024
SIDE_SOCKETS = "sockets"  # the random side
SIDE_GUESSES = "guesses"  # the easy side
# The side that says PRIMED first and whose SYNs leave before GO (role second).
ORDER_SOCKETS_FIRST = "sockets-first"
ORDER_GUESSES_FIRST = "guesses-first"


@dataclass(frozen=True)
class Offer:
    """What one client's REGISTER says for birthday punching (each field optional)."""

    sockets: int | None = None  # N it is ready to open (it is the random side)
    guesses: int | None = None  # M it is ready to send (it is the easy side)
    port_range: tuple[int, int] | None = None  # its NAT's external range (nat-check)
    port_hot: tuple[int, int] | None = None  # a band nat-check saw allocated more often

    def fields(self) -> dict[str, str | None]:
        return {"sockets": _num(self.sockets), "guesses": _num(self.guesses),
                "port_range": format_range(self.port_range),
                "port_hot": format_range(self.port_hot)}

    @classmethod
    def parse(cls, get: Callable[[str], str | None]) -> Offer:
        """From a message's fields; a value out of bounds or malformed is ignored
        (unknown, not an error: room to grow)."""
        return cls(_count(get("sockets"), MAX_SOCKETS), _count(get("guesses"), MAX_GUESSES),
                   parse_range(get("port_range")), parse_range(get("port_hot")))


@dataclass(frozen=True)
class Plan:
    """The pair's birthday plan, as PEER tells it to both clients."""

    sockets: int
    guesses: int
    port_range: tuple[int, int] = LINUX_RANGE
    port_hot: tuple[int, int] | None = None
    order: str = ORDER_SOCKETS_FIRST
    # The random side primes its SYNs with a small TTL (they die before the easy side's
    # NAT) unless that NAT is known to drop an unsolicited SYN silently.
    ttl_limited: bool = True

    @property
    def size(self) -> int:
        return self.port_range[1] - self.port_range[0] + 1

    def fields(self, side: str) -> dict[str, str | None]:
        return {"birthday": side, "sockets": str(self.sockets), "guesses": str(self.guesses),
                "port_range": format_range(self.port_range),
                "port_hot": format_range(self.port_hot), "order": self.order,
                "ttl_limited": "1" if self.ttl_limited else "0"}

    @classmethod
    def parse(cls, get: Callable[[str], str | None]) -> tuple[str, Plan] | None:
        side = get("birthday")
        sockets = _count(get("sockets"), MAX_SOCKETS)
        guesses = _count(get("guesses"), MAX_GUESSES)
        port_range = parse_range(get("port_range"))
        order = get("order")
        if side not in (SIDE_SOCKETS, SIDE_GUESSES) or sockets is None or guesses is None \
                or port_range is None or order not in (ORDER_SOCKETS_FIRST, ORDER_GUESSES_FIRST):
            return None
        return side, cls(sockets, guesses, port_range, parse_range(get("port_hot")), order,
                         get("ttl_limited") != "0")

    def p_uniform(self) -> float:
        return p_uniform(self.sockets, self.guesses, self.size)

    def p_expected(self) -> float:
        """The model's chance: Linux's weights when nat-check saw the hot band, else
        the uniform formula."""
        if self.port_hot is None:
            return self.p_uniform()
        return p_weighted(self.sockets, self.guesses, self.port_range)


def _num(value: int | None) -> str | None:
    return None if value is None else str(value)


def _count(text: str | None, limit: int) -> int | None:
    value = None if text is None else ascii_int(text, max_digits=6)
    return value if value is not None and 1 <= value <= limit else None


def format_range(r: tuple[int, int] | None) -> str | None:
    return None if r is None else f"{r[0]}-{r[1]}"


def parse_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    lo, sep, hi = text.partition("-")
    low, high = ascii_int(lo, max_digits=5), ascii_int(hi, max_digits=5)
    if not sep or low is None or high is None:
        return None
    return (low, high) if 1 <= low <= high <= 65535 else None


def p_uniform(sockets: int, guesses: int, size: int) -> float:
    """1 - (1 - M/R)^N: N uniform ports over R, M distinct guesses."""
    if guesses >= size:
        return 1.0
    return -math.expm1(sockets * math.log1p(-guesses / size))


def linux_weights(port_range: tuple[int, int]) -> tuple[int, int, int]:
    """Linux's random-fully over [lo, hi]: (ports in the hot band, their weight, the
    others' weight), from ``lo + get_random_u16() % size``: the lowest 65536 mod size
    ports get one draw more than the others."""
    size = port_range[1] - port_range[0] + 1
    return 65536 % size, 65536 // size + 1, 65536 // size


def p_weighted(sockets: int, guesses: int, port_range: tuple[int, int]) -> float:
    """The chance when the guesses take the hot band first (guess_ports) against
    Linux's weights."""
    hot, w_hot, w_cold = linux_weights(port_range)
    in_hot = min(guesses, hot)
    covered = (in_hot * w_hot + (min(guesses, port_range[1] - port_range[0] + 1) - in_hot)
               * w_cold) / 65536
    if covered >= 1:
        return 1.0
    return -math.expm1(sockets * math.log1p(-covered))


def guess_ports(guesses: int, port_range: tuple[int, int], rng: random.Random) -> list[int]:
    """M distinct ports of ``port_range``: Linux's hot band first (in random order), then
    the rest at random. Against a uniform NAT any M distinct ports are as good."""
    lo, hi = port_range
    hot, _, _ = linux_weights(port_range)
    band = list(range(lo, lo + hot))
    rng.shuffle(band)
    picked = band[:guesses]
    rest = guesses - len(picked)
    if rest > 0:
        others = range(lo + hot, hi + 1)
        picked += rng.sample(others, min(rest, len(others)))
    return picked


def plan(random_side: Offer, easy_side: Offer, random_facts: tuple[str | None, str | None],
         easy_facts: tuple[str | None, str | None]) -> Plan:
    """Who sends first, from what is known of both NATs: ``*_facts`` are (unsolicited,
    reply_syn) as REGISTER or the broker's SYN probe gave them (None: unknown).

    - sockets first (the random side opens its N holes, then the guesses cross into
      them): when the easy NAT drops an unsolicited SYN (an early full SYN from the
      random side harms nothing: it is dropped, and the kernel's own retransmissions of
      it too), or drops reply SYNs (the guesses must be the crossing SYNs; then the
      random side's are TTL-limited unless the easy NAT is known to drop);
    - guesses first: when the random NAT drops an unsolicited SYN (the M guesses die
      there silently, each leaving its hole open in the easy NAT) and the easy NAT
      answers one: then the random side's full SYNs cross into the guessed holes and
      the unmatched ones are answered harmlessly;
    - else sockets first with TTL-limited SYNs (nothing known, or both NATs answer).
    """
    e_unsolicited, e_reply = easy_facts
    r_unsolicited, r_reply = random_facts
    if r_reply == "blocked" and e_reply != "blocked":
        order, limited = ORDER_GUESSES_FIRST, False  # the random side's SYNs must cross
    elif e_unsolicited == "drop" or e_reply == "blocked":
        order, limited = ORDER_SOCKETS_FIRST, e_unsolicited != "drop"
    elif r_unsolicited == "drop":
        order, limited = ORDER_GUESSES_FIRST, False
    else:
        order, limited = ORDER_SOCKETS_FIRST, True
    return Plan(random_side.sockets or DEFAULT_SOCKETS, easy_side.guesses or DEFAULT_GUESSES,
                random_side.port_range or LINUX_RANGE, random_side.port_hot, order, limited)


def describe(p: Plan) -> str:
    """The broker's reason (why=), short: PEER's other fields carry the numbers."""
    if p.order == ORDER_GUESSES_FIRST:
        return ("one NAT randomises ports: birthday punching, the guesses first (the random "
                "NAT drops them silently)")
    return ("one NAT randomises ports: birthday punching, the random side's SYNs first"
            + (" (TTL-limited)" if p.ttl_limited else " (the other NAT drops them silently)"))


def summary(p: Plan) -> str:
    """N, M, the range and the chance, for --verbose."""
    lo, hi = p.port_range
    return (f"{p.sockets} sockets x {p.guesses} guesses over ports {lo}-{hi} ({p.size}): "
            f"p = {p.p_expected():.4f}" + (" (Linux's hot band, as nat-check saw)"
                                           if p.port_hot else " (uniform)"))
