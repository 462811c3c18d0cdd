"""nat-check's messages on the rendezvous line protocol: one codec, as aioice's stun.py.

Each message is a frozen dataclass; ``bytes(msg)`` encodes it and ``parse_message``
decodes any of them (the line framing is ``simulsyn_core._internal.wire``'s). Bad input raises
``ProtocolError`` (a ``ValueError``) with an exact message, which the broker sends back
in its ERROR line. Client -> broker (docs/protocol.md, "nat-check"):

* ``OBSERVE`` -> ``OBSERVED public=IP:PORT`` (any connection: the mapping probes);
* ``NC_HELLO`` -> ``NC_INFO ...`` on the control connection, which stays open for the
  whole check: the broker sends raw probes only while it is open, only to its address;
* ``NC_PROBE unsolicited=PORT filter=PORT window_ms=N`` -> the broker sends the
  unsolicited SYN and the two filtering SYNs and arms its capture -> ``NC_ARMED sent=N``;
* ``NC_REFLECT ports=P1,P2,...`` -> the broker answers each of those public ports with a
  SYN from its probe port (the hops probe) -> ``NC_REFLECTED sent=N``;
* ``NC_TIMERS waits=1,2,4`` -> the broker will answer the client's SYN tagged
  ``Seq.TIMER + i`` after waits[i] seconds -> ``NC_TIMERS_ARMED holes=N``;
* ``NC_DONE`` -> ``NC_RESULT unsolicited=... sent=N reply_seen=IP:PORT,...``.

A SYN that the client sends to the probe port with ``seq=Seq.REPLY`` is answered at once
with a SYN from the probe port to the endpoint it came from (the reply_syn probe).

Free text (``raw_reason=``, and the broker's ``ERROR message=``) follows the line
protocol's one rule: a space is sent as ``_``; a literal ``_`` or ``%`` as ``%5F`` or
``%25``, so that a text such as "CAP_NET_RAW" comes back whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.numbers import ascii_int, parse_finite_float, parse_port
from simulsyn_core._internal.wire import Message, ProtocolError, encode_message

# Port offsets from the port the client reached, on every broker address.
ALT_PORT_OFFSET = 1  # listens too: a second server port for the mapping probe
PROBE_PORT_OFFSET = 2  # raw probes come from here; inbound TCP to it is dropped
ICMP_PORT_OFFSET = 3  # inbound SYNs get ICMP port-unreachable (host_stack probe)
RST_PORT_OFFSET = 4  # nothing listens: the broker's kernel answers RST (host_stack)

# The broker's packet budget: what one check (one control connection) can make it send.
UNSOLICITED_PACKETS = 1
FILTERING_PACKETS = 2
REPLY_PACKETS = 1
MAX_REFLECT = 3  # hops probe: TTL 1..3
MAX_TIMERS = 8  # syn_sent_lifetime: holes measured in parallel
FOLLOWED_PACKETS = 1  # --rfc5382, REQ-4: an unsolicited SYN that an outbound SYN follows
ICMP_KEEP_PACKETS = 2  # --rfc5382, REQ-10: an ICMP error, then a SYN on the same mapping
PROBE_BUDGET = (UNSOLICITED_PACKETS + FILTERING_PACKETS + REPLY_PACKETS + MAX_REFLECT
                + MAX_TIMERS + FOLLOWED_PACKETS + ICMP_KEEP_PACKETS)
MAX_TIMER_WAIT_S = 280.0  # the broker closes a rendezvous connection after ~305 s
MAX_CONCURRENT_CHECKS = 4  # and one per client address
CHECK_MAX_S = MAX_TIMER_WAIT_S + 30.0  # a control connection's probes end after this
# How long to wait for the answers to a batch of probe SYNs: three round trips of the
# control connection (its kernel's smoothed RTT) plus 30 ms, within these bounds.
ANSWER_WINDOW_MIN_S = 0.05
ANSWER_WINDOW_MAX_S = 1.0
# RFC 5382 REQ-4: a NAT must not answer an unsolicited SYN for 6 s. --rfc5382 asks the
# broker to watch for the answer this long (NC_PROBE watch_ms=), at most WATCH_MAX_S.
REQ4_SILENCE_S = 6.0
WATCH_MAX_S = 10.0
# REQ-10: the broker's SYN follows its ICMP error on the same mapping after this long.
ICMP_KEEP_GAP_S = 0.2


def answer_window(rtt_s: float) -> float:
    return min(ANSWER_WINDOW_MAX_S, max(ANSWER_WINDOW_MIN_S, 3 * rtt_s + 0.03))


class Seq(IntEnum):
    """The sequence numbers that tag every crafted SYN, so that the side that sees one
    knows which probe it belongs to. A tag with an index adds it (``Seq.HOPS + ttl``);
    the ranges do not overlap (tests/test_natcheck_protocol.py)."""

    # the client's SYNs
    REPLY = 0x5359_4E00  # reply_syn: the broker answers it at once
    HOPS = 0x5359_4E10  # + TTL, 1..MAX_REFLECT
    TIMER = 0x5359_4E20  # + index of the wait, 0..MAX_TIMERS-1: answered after that wait
    HAIRPIN = 0x5359_4E30  # to the host's own public endpoint
    FOLLOW = 0x5359_4E40  # REQ-4: follows the broker's FOLLOWED SYN out (not answered)
    ICMP_KEEP = 0x5359_4E41  # REQ-10: answered with an ICMP error, then a SYN
    # the broker's SYNs
    UNSOLICITED = 0x5359_4F00
    FILTERING = 0x5359_4F01  # from the address reached; + 1 from the other address
    REPLY_ANSWER = 0x5359_4F04  # the answer to a Seq.REPLY SYN
    REFLECT = 0x5359_4F08  # + index of the port in NC_REFLECT (hops)
    TIMER_ANSWER = 0x5359_4F10  # + index of the wait
    FOLLOWED = 0x5359_4F20  # REQ-4: unsolicited, then the host's Seq.FOLLOW SYN goes out
    ICMP_KEEP_ANSWER = 0x5359_4F21  # REQ-10: the SYN after the ICMP error


# --- free text ------------------------------------------------------------------------------

_ESCAPES = {" ": "_", "_": "%5F", "%": "%25"}
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}
_ESCAPED_RE = re.compile("|".join(re.escape(v) for v in _UNESCAPES))


def escape_text(text: str) -> str:
    """A free-text value as one word: the one escaping rule of the line protocol."""
    return "".join(_ESCAPES.get(c, c) for c in text)


def unescape_text(word: str) -> str:
    return _ESCAPED_RE.sub(lambda m: _UNESCAPES[m[0]], word)


# --- field codecs -----------------------------------------------------------------------------

def _int(msg: Message, key: str) -> int:
    text = msg.require(key)
    value = ascii_int(text)
    if value is None:
        raise ProtocolError(f"{msg.verb} {key}=: bad number {text!r}")
    return value


def _endpoint(msg: Message, key: str) -> Endpoint:
    text = msg.require(key)
    try:
        return Endpoint.parse(text)
    except ValueError as exc:
        raise ProtocolError(f"{msg.verb} {key}=: {exc}") from None


def _opt_int(msg: Message, key: str) -> int | None:
    return _int(msg, key) if msg.get(key) is not None else None


def _port(msg: Message, key: str) -> int:
    text = msg.require(key)
    try:
        return parse_port(text)
    except ValueError:
        raise ProtocolError(f"bad port {text!r}") from None


def parse_ports(text: str | None, limit: int) -> tuple[int, ...]:
    """"1,2,3" -> (1, 2, 3); raises ValueError on bad input or more than limit."""
    if not text:
        return ()
    parts = text.split(",")
    if len(parts) > limit:
        raise ValueError(f"at most {limit} values, got {len(parts)}")
    out = []
    for part in parts:
        try:
            out.append(parse_port(part))
        except ValueError:
            raise ValueError(f"bad port {part!r}") from None
    return tuple(out)


def parse_waits(text: str | None) -> tuple[float, ...]:
    if not text:
        return ()
    parts = text.split(",")
    if len(parts) > MAX_TIMERS:
        raise ValueError(f"at most {MAX_TIMERS} waits, got {len(parts)}")
    waits = []
    for part in parts:
        try:
            value = parse_finite_float(part)
        except ValueError:
            raise ValueError(f"bad wait {part!r}") from None
        if not 0 < value <= MAX_TIMER_WAIT_S:
            raise ValueError(f"wait {value} outside (0, {MAX_TIMER_WAIT_S:g}]")
        waits.append(value)
    return tuple(waits)


def _listed(key: str, text: str | None, parse: Callable[[str | None], tuple]) -> tuple:
    try:
        return parse(text)
    except ValueError as exc:
        raise ProtocolError(f"{key}=: {exc}") from None


# --- the messages ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Observe:
    VERB: ClassVar[str] = "OBSERVE"

    def __bytes__(self) -> bytes:
        return encode_message(self.VERB)

    @classmethod
    def decode(cls, msg: Message) -> Observe:
        return cls()


@dataclass(frozen=True)
class Observed:
    VERB: ClassVar[str] = "OBSERVED"
    public: Endpoint  # the connection's source as the broker saw it

    def __bytes__(self) -> bytes:
        return encode_message(self.VERB, public=self.public)

    @classmethod
    def decode(cls, msg: Message) -> Observed:
        return cls(_endpoint(msg, "public"))


@dataclass(frozen=True)
class Hello:
    VERB: ClassVar[str] = "NC_HELLO"

    def __bytes__(self) -> bytes:
        return encode_message(self.VERB)

    @classmethod
    def decode(cls, msg: Message) -> Hello:
        return cls()


@dataclass(frozen=True)
class ServerInfo:
    """NC_INFO: what the broker tells the client about its probe side."""

    VERB: ClassVar[str] = "NC_INFO"
    public: Endpoint  # the control connection's public endpoint as the broker saw it
    addrs: tuple[str, ...]  # the broker's addresses (the first is the one reached)
    port: int
    raw: bool  # the broker can send and sniff raw probes
    raw_reason: str = ""  # why not ("" when raw)
    budget: int = 0

    def __bytes__(self) -> bytes:
        return encode_message(self.VERB, public=self.public, addrs=",".join(self.addrs),
                              port=self.port, raw="yes" if self.raw else "no",
                              raw_reason=escape_text(self.raw_reason) or None,
                              budget=self.budget)

    @classmethod
    def decode(cls, msg: Message) -> ServerInfo:
        addrs = tuple(a for a in msg.require("addrs").split(",") if a)
        if not addrs:
            raise ProtocolError("NC_INFO without an address in addrs=")
        raw = msg.require("raw")
        if raw not in ("yes", "no"):
            raise ProtocolError(f"NC_INFO raw=: yes or no, not {raw!r}")
        return cls(_endpoint(msg, "public"), addrs, _port(msg, "port"), raw == "yes",
                   unescape_text(msg.get("raw_reason") or ""),
                   _int(msg, "budget") if msg.get("budget") is not None else 0)

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


@dataclass(frozen=True)
class Probe:
    """NC_PROBE: send the unsolicited SYN to ``unsolicited`` and the filtering SYNs to
    ``filter`` (both public ports of the client's address); answers come within
    ``window_ms``. With ``watch_ms`` (--rfc5382, REQ-4) the broker watches the unsolicited
    SYN's answer that long, and with ``followed`` sends a second unsolicited SYN there,
    which the host's own SYN follows out."""

    VERB: ClassVar[str] = "NC_PROBE"
    unsolicited: int
    filter: int
    window_ms: int | None = None
    watch_ms: int | None = None
    followed: int | None = None

    def __bytes__(self) -> bytes:
        return encode_message(self.VERB, unsolicited=self.unsolicited, filter=self.filter,
                              window_ms=self.window_ms, watch_ms=self.watch_ms,
                              followed=self.followed)

    @classmethod
    def decode(cls, msg: Message) -> Probe:
        return cls(_port(msg, "unsolicited"), _port(msg, "filter"), _opt_int(msg, "window_ms"),
                   _opt_int(msg, "watch_ms"),
                   _port(msg, "followed") if msg.get("followed") is not None else None)


@dataclass(frozen=True)
class Armed:
    VERB: ClassVar[str] = "NC_ARMED"
    sent: int

    def __bytes__(self) -> bytes:
        return encode_message(self.VERB, sent=self.sent)

    @classmethod
    def decode(cls, msg: Message) -> Armed:
        return cls(_int(msg, "sent"))


@dataclass(frozen=True)
class Reflect:
    """NC_REFLECT: answer each of these public ports of the client with a SYN (hops)."""

    VERB: ClassVar[str] = "NC_REFLECT"
    ports: tuple[int, ...]

    def __bytes__(self) -> bytes:
        return encode_message(self.VERB, ports=",".join(str(p) for p in self.ports))

    @classmethod
    def decode(cls, msg: Message) -> Reflect:
        return cls(_listed("ports", msg.get("ports"), lambda t: parse_ports(t, MAX_REFLECT)))


@dataclass(frozen=True)
class Reflected:
    VERB: ClassVar[str] = "NC_REFLECTED"
    sent: int

    def __bytes__(self) -> bytes:
        return encode_message(self.VERB, sent=self.sent)

    @classmethod
    def decode(cls, msg: Message) -> Reflected:
        return cls(_int(msg, "sent"))


@dataclass(frozen=True)
class Timers:
    """NC_TIMERS: answer the client's SYN tagged Seq.TIMER + i after waits[i] seconds."""

    VERB: ClassVar[str] = "NC_TIMERS"
    waits: tuple[float, ...]

    def __bytes__(self) -> bytes:
        return encode_message(self.VERB, waits=",".join(f"{w:g}" for w in self.waits))

    @classmethod
    def decode(cls, msg: Message) -> Timers:
        return cls(_listed("waits", msg.require("waits"), parse_waits))


@dataclass(frozen=True)
class TimersArmed:
    VERB: ClassVar[str] = "NC_TIMERS_ARMED"
    holes: int

    def __bytes__(self) -> bytes:
        return encode_message(self.VERB, holes=self.holes)

    @classmethod
    def decode(cls, msg: Message) -> TimersArmed:
        return cls(_int(msg, "holes"))


@dataclass(frozen=True)
class Done:
    VERB: ClassVar[str] = "NC_DONE"

    def __bytes__(self) -> bytes:
        return encode_message(self.VERB)

    @classmethod
    def decode(cls, msg: Message) -> Done:
        return cls()


@dataclass(frozen=True)
class Result:
    """NC_RESULT: what came back to the unsolicited SYN (unsolicited.classify, None when
    it was not sent), the raw packets sent for this check, the reply_syn sources seen;
    how long after the SYN its answer came (``unsolicited_ms``, none when dropped), and
    the same for the followed SYN (--rfc5382)."""

    VERB: ClassVar[str] = "NC_RESULT"
    unsolicited: str | None
    sent: int
    reply_seen: tuple[Endpoint, ...] = field(default=())
    unsolicited_ms: int | None = None
    followed: str | None = None
    followed_ms: int | None = None
    watched_ms: int | None = None  # how long the broker watched for the answers

    def __bytes__(self) -> bytes:
        return encode_message(self.VERB, unsolicited=self.unsolicited, sent=self.sent,
                              reply_seen=",".join(str(e) for e in self.reply_seen) or None,
                              unsolicited_ms=self.unsolicited_ms, followed=self.followed,
                              followed_ms=self.followed_ms, watched_ms=self.watched_ms)

    @classmethod
    def decode(cls, msg: Message) -> Result:
        try:
            seen = tuple(Endpoint.parse(e) for e in (msg.get("reply_seen") or "").split(",")
                         if e)
        except ValueError as exc:
            raise ProtocolError(f"NC_RESULT reply_seen=: {exc}") from None
        return cls(msg.get("unsolicited"), _int(msg, "sent"), seen,
                   _opt_int(msg, "unsolicited_ms"), msg.get("followed"),
                   _opt_int(msg, "followed_ms"), _opt_int(msg, "watched_ms"))


NcMessage = (Observe | Observed | Hello | ServerInfo | Probe | Armed | Reflect | Reflected
             | Timers | TimersArmed | Done | Result)
MESSAGES: dict[str, type[NcMessage]] = {
    cls.VERB: cls for cls in (Observe, Observed, Hello, ServerInfo, Probe, Armed, Reflect,
                              Reflected, Timers, TimersArmed, Done, Result)}


def parse_message(msg: Message) -> NcMessage:
    """The typed message of one parsed line; ProtocolError on a verb or field it lacks."""
    cls = MESSAGES.get(msg.verb)
    if cls is None:
        raise ProtocolError(f"{msg.verb} is not a nat-check message")
    return cls.decode(msg)
