"""The nat-check result: the measured values (each defined once, as str-enums), frozen
dataclasses, and the one JSON form built from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from ..schema import SCHEMA_VERSION
from .port_range import PortRange

if TYPE_CHECKING:
    from .evidence import Evidence
    from .rfc5382 import Requirement


class StrValue(str, Enum):
    """A value that prints, formats, compares and serializes as its plain string, so the
    table and the JSON read the same as with bare strings."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(self, spec)


class Behaviour(StrValue):
    """mapping and filtering (RFC 4787 sections 4.1 and 5)."""

    EI = "endpoint-independent"
    AD = "address-dependent"
    APD = "address-and-port-dependent"
    NO_NAT = "none"  # mapping only: the server sees the host's own address


class PortAllocation(StrValue):
    PRESERVING = "preserving"
    SEQUENTIAL = "sequential"
    RANDOM = "random"


class Outcome(StrValue):
    """What became of a probe SYN: reply_syn is PASS or BLOCKED; unsolicited_syn is PASS
    (the host got it), DROP or the answer that came back. Another ICMP error is the plain
    string "icmp-T-C" (type T, code C)."""

    PASS = "pass"
    BLOCKED = "blocked"
    DROP = "drop"
    RST = "rst"
    SYN_ACK = "syn-ack"
    ICMP_PORT_UNREACHABLE = "icmp-port-unreachable"
    ICMP_ADMIN_PROHIBITED = "icmp-admin-prohibited"


class StackKind(StrValue):
    """The host_stack trials: the answer that meets the host's SYN."""

    RST = "rst"
    ICMP = "icmp"
    TTL_EXCEEDED = "ttl_exceeded"


class StackReaction(StrValue):
    ABORTS = "aborts"  # connect() ends when the answer arrives (Linux)
    RETRIES = "retries"  # the socket stays in SYN-SENT and resends


class ConnectState(StrValue):
    """How a host_stack connect() stood at its deadline, when not failed with an errno."""

    CONNECTED = "connected"
    PENDING = "pending"  # still in SYN-SENT


class Order(StrValue):
    """recommendation.order: which peer should start."""

    FIRST = "first"
    SECOND = "second"
    EITHER = "either"


KEYS = ("public", "behind_nat", "mapping", "port_preservation", "port_allocation",
        "filtering", "unsolicited_syn", "reply_syn", "syn_sent_lifetime_s", "hairpin",
        "hops", "host_stack", "port_range")


@dataclass(frozen=True)
class Advice:
    value: Any
    reason: str


@dataclass(frozen=True)
class Recommendation:
    retries: Advice
    interval_s: Advice
    timeout_s: Advice
    order: Advice  # an Order
    ttl_limited_first_syn: Advice  # bool
    ttl: Advice  # int | None

    def to_json(self) -> dict[str, Any]:
        return {name: {"value": getattr(self, name).value, "reason": getattr(self, name).reason}
                for name in ("retries", "interval_s", "timeout_s", "order",
                             "ttl_limited_first_syn", "ttl")}


@dataclass(frozen=True)
class Findings:
    """Every measured key; None where it could not be measured (reasons say why)."""

    public: tuple[str, ...] = ()
    behind_nat: bool | None = None
    mapping: Behaviour | None = None
    port_preservation: bool | None = None
    port_allocation: PortAllocation | None = None
    filtering: Behaviour | None = None
    unsolicited_syn: str | None = None  # an Outcome, or "icmp-T-C"
    reply_syn: Outcome | None = None
    syn_sent_lifetime_s: float | None = None
    hairpin: bool | None = None
    hops: int | None = None
    host_stack: dict[StackKind, StackReaction] | None = None
    port_range: PortRange | None = None  # sampled behind an endpoint-dependent mapping
    reasons: tuple[tuple[str, str], ...] = ()

    def reason(self, key: str) -> str:
        return "; ".join(r for k, r in self.reasons if k == key)

    @property
    def limited(self) -> str:
        """What a SYN that dies on the way is limited by: "TTL", or over IPv6 "hop"."""
        return "hop" if self.public and self.public[0].startswith("[") else "TTL"


@dataclass(frozen=True)
class NatCheckReport:
    server: str
    findings: Findings
    recommendation: Recommendation
    verdict: str
    duration_s: float
    packets: dict[str, int] = field(default_factory=dict)
    path: tuple[str | None, ...] = ()
    pcap: str | None = None
    probes: dict[str, Any] = field(default_factory=dict)  # ports each probe used
    exit_code: int = 0
    error: str | None = None
    evidence: Evidence | None = field(default=None, compare=False, repr=False)  # not in JSON
    rfc5382: tuple[Requirement, ...] = ()  # RFC 5382, requirement by requirement
    rfc5382_asked: bool = False  # --rfc5382: the slow probes ran

    def to_json(self) -> dict[str, Any]:
        f = self.findings
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "server": self.server}
        for key in KEYS:
            value = getattr(f, key)
            if isinstance(value, PortRange):
                value = value.to_json()
            out[key] = list(value) if isinstance(value, tuple) else value
        out["recommendation"] = self.recommendation.to_json()
        out["verdict"] = self.verdict
        out["reasons"] = {key: f.reason(key) for key in KEYS if f.reason(key)}
        out["path"] = list(self.path)
        out["packets"] = dict(self.packets)
        out["duration_s"] = round(self.duration_s, 3)
        out["pcap"] = self.pcap
        out["probes"] = dict(self.probes)
        raw = self.evidence.raw if self.evidence is not None else None
        # REQ-4's figure: how long after the server's SYN the NAT's answer came (null:
        # no answer, or not measured)
        out["unsolicited_syn_after_ms"] = raw.broker.unsolicited_ms if raw else None
        out["rfc5382"] = {
            "asked": self.rfc5382_asked,
            "failed": [r.req for r in self.rfc5382 if r.status == "fail"],
            "requirements": [r.to_json() for r in self.rfc5382]}
        out["exit_code"] = self.exit_code
        out["error"] = self.error
        return out
