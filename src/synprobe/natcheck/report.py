"""The nat-check result: frozen dataclasses, and the one JSON form built from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KEYS = ("public", "behind_nat", "mapping", "port_preservation", "port_allocation",
        "filtering", "unsolicited_syn", "reply_syn", "syn_sent_lifetime_s", "hairpin",
        "hops", "host_stack")


@dataclass(frozen=True)
class Advice:
    value: Any
    reason: str


@dataclass(frozen=True)
class Recommendation:
    retries: Advice
    interval_s: Advice
    timeout_s: Advice
    order: Advice  # "first" | "second" | "either"
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
    mapping: str | None = None
    port_preservation: bool | None = None
    port_allocation: str | None = None
    filtering: str | None = None
    unsolicited_syn: str | None = None
    reply_syn: str | None = None
    syn_sent_lifetime_s: float | None = None
    hairpin: bool | None = None
    hops: int | None = None
    host_stack: dict[str, str] | None = None
    reasons: tuple[tuple[str, str], ...] = ()

    def reason(self, key: str) -> str:
        return "; ".join(r for k, r in self.reasons if k == key)


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

    def to_json(self) -> dict[str, Any]:
        f = self.findings
        out: dict[str, Any] = {"server": self.server}
        for key in KEYS:
            value = getattr(f, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        out["recommendation"] = self.recommendation.to_json()
        out["verdict"] = self.verdict
        out["reasons"] = {key: f.reason(key) for key in KEYS if f.reason(key)}
        out["path"] = list(self.path)
        out["packets"] = dict(self.packets)
        out["duration_s"] = round(self.duration_s, 3)
        out["pcap"] = self.pcap
        out["probes"] = dict(self.probes)
        out["exit_code"] = self.exit_code
        out["error"] = self.error
        return out
