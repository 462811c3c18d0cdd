"""nat-check's verbs on the rendezvous line protocol, and the numbers both sides share.

Client -> broker (on connections to the broker's ports; see docs in the README):

* ``OBSERVE`` -> ``OBSERVED public=IP:PORT`` (any connection: the mapping probes);
* ``NC_HELLO`` -> ``NC_INFO ...`` on the control connection, which stays open for the
  whole check: the broker sends raw probes only while it is open, only to its address;
* ``NC_PROBE unsolicited=PORT filter=PORT`` -> the broker sends the unsolicited SYN and
  the two filtering SYNs and arms its capture -> ``NC_ARMED sent=N``;
* ``NC_REFLECT ports=P1,P2,...`` -> the broker answers each of those public ports with a
  SYN from its probe port (the hops probe) -> ``NC_REFLECTED sent=N``;
* ``NC_TIMERS waits=1,2,4`` -> the broker will answer the client's SYN tagged
  ``seq=TIMER_SEQ+i`` after waits[i] seconds -> ``NC_TIMERS_ARMED``;
* ``NC_DONE`` -> ``NC_RESULT unsolicited=... reply_seen=IP:PORT sent=N``.

A SYN that the client sends to the probe port with ``seq=REPLY_SEQ`` is answered at once
with a SYN from the probe port to the endpoint it came from (the reply_syn probe).
"""

from __future__ import annotations

from dataclasses import dataclass

from simulsyn_core.endpoint import Endpoint

# Port offsets from the port the client reached, on every broker address.
ALT_PORT_OFFSET = 1  # listens too: a second server port for the mapping probe
PROBE_PORT_OFFSET = 2  # raw probes come from here; inbound TCP to it is dropped
ICMP_PORT_OFFSET = 3  # inbound SYNs get ICMP port-unreachable (host_stack probe)
RST_PORT_OFFSET = 4  # nothing listens: the broker's kernel answers RST (host_stack)

# Sequence numbers that tag the client's crafted SYNs so the broker knows each one.
REPLY_SEQ = 0x5359_4E00
HOPS_SEQ = 0x5359_4E10
TIMER_SEQ = 0x5359_4E20
BROKER_SEQ = 0x5359_4F00

# The broker's packet budget: what one check (one control connection) can make it send.
UNSOLICITED_PACKETS = 1
FILTERING_PACKETS = 2
REPLY_PACKETS = 1
MAX_REFLECT = 3  # hops probe: TTL 1..3
MAX_TIMERS = 8  # syn_sent_lifetime: holes measured in parallel
PROBE_BUDGET = UNSOLICITED_PACKETS + FILTERING_PACKETS + REPLY_PACKETS + MAX_REFLECT + MAX_TIMERS
MAX_TIMER_WAIT_S = 280.0  # the broker closes a rendezvous connection after ~305 s
MAX_CONCURRENT_CHECKS = 4  # and one per client address
CHECK_MAX_S = MAX_TIMER_WAIT_S + 30.0  # a control connection's probes end after this
# How long to wait for the answers to a batch of probe SYNs: three round trips of the
# control connection (its kernel's smoothed RTT) plus 30 ms, within these bounds.
ANSWER_WINDOW_MIN_S = 0.05
ANSWER_WINDOW_MAX_S = 1.0


def answer_window(rtt_s: float) -> float:
    return min(ANSWER_WINDOW_MAX_S, max(ANSWER_WINDOW_MIN_S, 3 * rtt_s + 0.03))

VERB_HELLO = "NC_HELLO"
VERB_INFO = "NC_INFO"
VERB_OBSERVE = "OBSERVE"
VERB_OBSERVED = "OBSERVED"
VERB_PROBE = "NC_PROBE"
VERB_ARMED = "NC_ARMED"
VERB_REFLECT = "NC_REFLECT"
VERB_REFLECTED = "NC_REFLECTED"
VERB_TIMERS = "NC_TIMERS"
VERB_TIMERS_ARMED = "NC_TIMERS_ARMED"
VERB_DONE = "NC_DONE"
VERB_RESULT = "NC_RESULT"
CLIENT_VERBS = (VERB_HELLO, VERB_OBSERVE, VERB_PROBE, VERB_REFLECT, VERB_TIMERS, VERB_DONE)


@dataclass(frozen=True)
class ServerInfo:
    """What NC_INFO tells the client about the broker's probe side."""

    public: Endpoint  # the control connection's public endpoint as the broker saw it
    addrs: tuple[str, ...]  # the broker's addresses (the first is the one reached)
    port: int
    raw: bool  # the broker can send and sniff raw probes
    raw_reason: str
    budget: int

    @property
    def alt_port(self) -> int:
        return self.port + ALT_PORT_OFFSET

    @property
    def probe_port(self) -> int:
        return self.port + PROBE_PORT_OFFSET

    @property
    def icmp_port(self) -> int:
        return self.port + ICMP_PORT_OFFSET

    @property
    def rst_port(self) -> int:
        return self.port + RST_PORT_OFFSET


def parse_ports(text: str | None, limit: int) -> list[int]:
    """"1,2,3" -> [1, 2, 3]; raises ValueError on bad input or more than limit."""
    if not text:
        return []
    parts = text.split(",")
    if len(parts) > limit:
        raise ValueError(f"at most {limit} values, got {len(parts)}")
    out = []
    for part in parts:
        if not part.isdigit() or not 1 <= int(part) <= 65535:
            raise ValueError(f"bad port {part!r}")
        out.append(int(part))
    return out


def parse_waits(text: str | None) -> list[float]:
    if not text:
        return []
    parts = text.split(",")
    if len(parts) > MAX_TIMERS:
        raise ValueError(f"at most {MAX_TIMERS} waits, got {len(parts)}")
    waits = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"bad wait {part!r}") from None
        if not 0 < value <= MAX_TIMER_WAIT_S:
            raise ValueError(f"wait {value} outside (0, {MAX_TIMER_WAIT_S:g}]")
        waits.append(value)
    return waits
