"""What one nat-check sent and saw (``Evidence``), and the pure step from it to the
findings and their reasons (``decide``).

The split of scapy's ``nmap_sig`` (all I/O) and ``nmap_probes2sig`` (pure): ``client.py``
runs the probes and returns an ``Evidence``; everything decided about it happens here,
so the tests run ``decide`` on the captures recorded in the lab (captures/natcheck/: the
client's pcap and the rest of its evidence, ``Evidence.to_json``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.wire import parse_line

from ..packets.seen import Seen
from . import filtering, hairpin, hops, host_stack, mapping, port_range, reply_syn, timers
from . import protocol as P
from .port_samples import Sampled
from .report import Behaviour, Findings, Outcome, StackKind

RAW_KEYS = ("filtering", "unsolicited_syn", "reply_syn", "hairpin", "hops", "host_stack")

# unsolicited_syn's reason for each answer the broker saw (any other: an ICMP error).
UNSOLICITED_REASONS: dict[str | None, str] = {
    None: "the server did not say",
    Outcome.DROP: "no answer came back to {target}",
    Outcome.RST: "a TCP RST came back to {target}",
    Outcome.SYN_ACK: "a SYN+ACK came back to {target}: a host answered it",
}
UNSOLICITED_ICMP_REASON = "an ICMP error ({answer}) came back to {target}"
UNSOLICITED_PASS_REASON = ("the SYN reached this host: the NAT forwards unsolicited SYNs "
                           "here (DMZ or port forward)")


@dataclass(frozen=True)
class RawEvidence:
    """The raw probes as they were sent, and what came of them."""

    unsolicited_port: int  # the public port the broker's unsolicited SYN went to
    reply: reply_syn.ReplySynProbe
    hops: hops.HopsProbe
    hairpin: hairpin.HairpinProbe
    timers: timers.TimersProbe | None  # with --timers
    timers_deadline: float | None  # capture time when the holes' answers were counted
    answer_window_s: float
    broker: P.Result  # NC_RESULT: the broker's view of the unsolicited SYN, its packets
    stack: tuple[host_stack.StackOutcome, ...]  # the host_stack connect()s
    seen: tuple[Seen, ...]  # the client's capture once every answer was in
    hairpin_sent: bool = True  # False with --no-hairpin
    followed_port: int | None = None  # --rfc5382 (REQ-4): our SYN followed the broker's
    icmp_keep_port: int | None = None  # --rfc5382 (REQ-10): the ICMP error, then a SYN


@dataclass(frozen=True)
class Evidence:
    host_ip: str  # this host's address towards the broker
    info: P.ServerInfo  # NC_INFO
    control: mapping.Observation
    same_port: tuple[mapping.Observation, ...]
    fresh: tuple[mapping.Observation, ...]  # fresh[0]'s mapping is the filtering target
    timers_asked: bool
    raw_off: str  # why the raw probes did not run ("" when they ran)
    raw: RawEvidence | None
    port_samples_asked: int = 0  # --port-samples
    port_samples: Sampled | None = None  # None: not sampled (port_range.skip_reason)
    rfc5382_asked: bool = False  # --rfc5382: REQ-4's 6 s watch, REQ-10's ICMP probe

    def to_json(self) -> dict[str, Any]:
        """Everything but the capture (the pcap holds it), as plain JSON values (the port
        samples' keys only when asked for: the recordings made before them stay equal)."""
        out: dict[str, Any] = {
            "host_ip": self.host_ip, "info": bytes(self.info).decode().rstrip("\n"),
            "control": _obs_json(self.control),
            "same_port": [_obs_json(o) for o in self.same_port],
            "fresh": [_obs_json(o) for o in self.fresh],
            "timers_asked": self.timers_asked, "raw_off": self.raw_off, "raw": None}
        raw = self.raw
        if raw is not None:
            out["raw"] = {
                "unsolicited_port": raw.unsolicited_port,
                "reply_port": raw.reply.local_port, "hop_ports": list(raw.hops.local_ports),
                "hairpin_port": raw.hairpin.local_port,
                "timer_ports": list(raw.timers.local_ports) if raw.timers else [],
                "timer_waits": list(raw.timers.waits) if raw.timers else [],
                "timers_deadline": raw.timers_deadline,
                "answer_window_s": raw.answer_window_s,
                "broker": bytes(raw.broker).decode().rstrip("\n"),
                "stack": [[o.kind, o.local_port, o.outcome, o.elapsed_s] for o in raw.stack]}
            # Only when they differ from the defaults: older recordings stay equal.
            if not raw.hairpin_sent:
                out["raw"]["hairpin_sent"] = False
            for key in ("followed_port", "icmp_keep_port"):
                if getattr(raw, key) is not None:
                    out["raw"][key] = getattr(raw, key)
        if self.rfc5382_asked:
            out["rfc5382_asked"] = True
        if self.port_samples_asked:
            out["port_samples_asked"] = self.port_samples_asked
        ps = self.port_samples
        if ps is not None:
            out["port_samples"] = {"asked": ps.asked, "ports": list(ps.ports),
                                   "failed": ps.failed, "duration_s": ps.duration_s,
                                   "stopped": ps.stopped, "first_error": ps.first_error}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], seen: Sequence[Seen]) -> Evidence:
        """The inverse of to_json, with the capture read back from the pcap."""
        info = P.parse_message(parse_line(data["info"].encode()))
        assert isinstance(info, P.ServerInfo)
        fresh = tuple(_obs(o) for o in data["fresh"])
        raw = None
        r = data["raw"]
        if r is not None:
            broker = P.parse_message(parse_line(r["broker"].encode()))
            assert isinstance(broker, P.Result)
            probes = plan(data["host_ip"], info, fresh[0], r["reply_port"], r["hairpin_port"],
                          tuple(r["hop_ports"]), tuple(r["timer_ports"]),
                          tuple(r["timer_waits"]))
            raw = RawEvidence(
                r["unsolicited_port"], *probes, r["timers_deadline"], r["answer_window_s"],
                broker, tuple(host_stack.StackOutcome(StackKind(k), p, o, e)
                              for k, p, o, e in r["stack"]), tuple(seen),
                r.get("hairpin_sent", True), r.get("followed_port"), r.get("icmp_keep_port"))
        ps = data.get("port_samples")
        sampled = None if ps is None else Sampled(
            ps["asked"], tuple(ps["ports"]), ps["failed"], ps["duration_s"], ps["stopped"],
            ps["first_error"])
        return cls(data["host_ip"], info, _obs(data["control"]),
                   tuple(_obs(o) for o in data["same_port"]), fresh, data["timers_asked"],
                   data["raw_off"], raw, data.get("port_samples_asked", 0), sampled,
                   data.get("rfc5382_asked", False))


def _obs_json(o: mapping.Observation) -> dict[str, str]:
    return {"local": str(o.local), "server": str(o.server), "public": str(o.public)}


def _obs(d: dict[str, str]) -> mapping.Observation:
    return mapping.Observation(*(Endpoint.parse(d[k]) for k in ("local", "server", "public")))


def plan(host_ip: str, info: P.ServerInfo, filter_obs: mapping.Observation, reply_port: int,
         hairpin_port: int, hop_ports: tuple[int, ...], timer_ports: tuple[int, ...],
         waits: tuple[float, ...]) -> tuple[reply_syn.ReplySynProbe, hops.HopsProbe,
                                            hairpin.HairpinProbe, timers.TimersProbe | None]:
    """The client's crafted probes for these local ports (pure; the I/O sends them)."""
    server_ip = info.addrs[0]
    return (reply_syn.ReplySynProbe(host_ip, reply_port, server_ip, info.probe_port),
            hops.HopsProbe(host_ip, server_ip, info.probe_port, hop_ports),
            hairpin.HairpinProbe(host_ip, hairpin_port, filter_obs.public,
                                 filter_obs.local.port),
            timers.TimersProbe(host_ip, server_ip, info.probe_port, timer_ports, waits)
            if waits else None)


def reflects(m: mapping.MappingResult) -> bool:
    """Whether the hops probe can run: the public port of a TTL-limited SYN (which the
    broker must aim at) is known only when the NAT preserves ports."""
    return m.port_preservation


def hops_not_measured(m: mapping.MappingResult, reply: str | None, filt: str | None,
                      unsolicited_syn: str | None) -> str | None:
    """Why hops cannot be told from this check (None: they can)."""
    if not reflects(m):
        return ("the NAT does not preserve ports, so the public port of a TTL-limited SYN "
                "cannot be known")
    if reply != Outcome.PASS:
        return "reply SYNs do not pass, so no TTL opens a hole"
    if filt == Behaviour.EI or unsolicited_syn == Outcome.PASS:
        return "any SYN reaches the host: no hole is needed, hops not told"
    return None


def unsolicited_finding(raw: RawEvidence, server_ip: str, public_ip: str
                        ) -> tuple[str | None, str]:
    """The broker saw the NAT's answer; our capture shows a SYN that passed."""
    if any(s.is_syn and not s.outgoing and s.dport == raw.unsolicited_port
           and s.src == server_ip for s in raw.seen):
        return Outcome.PASS, UNSOLICITED_PASS_REASON
    answer = raw.broker.unsolicited
    if answer is not None and answer in tuple(Outcome):
        answer = Outcome(answer)
    target = f"the server's SYN to {Endpoint(public_ip, raw.unsolicited_port)} (no mapping)"
    why = UNSOLICITED_REASONS.get(answer, UNSOLICITED_ICMP_REASON)
    return answer, why.format(target=target, answer=answer)


@dataclass(frozen=True)
class Decision:
    findings: Findings  # with every reason
    path: tuple[str | None, ...]  # the routers that answered the TTL-limited SYNs


def decide(ev: Evidence) -> Decision:
    """Pure: the findings, with a reason for each, from what the check sent and saw."""
    m = mapping.classify(ev.control, ev.same_port, ev.fresh, [ev.host_ip])
    reasons = list(m.reasons)
    findings = Findings(public=tuple(str(p) for p in m.public), behind_nat=m.behind_nat,
                        mapping=m.mapping, port_preservation=m.port_preservation,
                        port_allocation=m.port_allocation)
    path: tuple[str | None, ...] = ()
    if ev.raw is None:
        reasons += [(k, f"not measured: {ev.raw_off}") for k in RAW_KEYS]
    else:
        findings, more, path = _decide_raw(ev, ev.raw, m, findings)
        reasons += more
    if not ev.timers_asked:
        reasons.append(("syn_sent_lifetime_s", "not measured: needs --timers"))
    ranged, why = port_range_finding(ev, m)
    reasons.append(("port_range", why))
    findings = replace(findings, port_range=ranged)
    return Decision(replace(findings, reasons=tuple(reasons)), path)


def port_range_finding(ev: Evidence, m: mapping.MappingResult
                       ) -> tuple[port_range.PortRange | None, str]:
    """The port range of the sampled public ports, or why there is none."""
    skip = port_range.skip_reason(m.behind_nat, m.mapping, ev.port_samples_asked)
    if skip is not None:
        return None, skip
    sampled = ev.port_samples
    if sampled is None:
        return None, "not sampled"
    ranged = port_range.classify(sampled.ports)
    ranged = replace(ranged, reason=f"{sampled.summary()}; {ranged.reason}")
    return ranged, ranged.reason


def _decide_raw(ev: Evidence, raw: RawEvidence, m: mapping.MappingResult, base: Findings
                ) -> tuple[Findings, list[tuple[str, str]], tuple[str | None, ...]]:
    reasons: list[tuple[str, str]] = []
    server_ip = ev.info.addrs[0]
    other_ip = ev.info.addrs[1] if len(ev.info.addrs) > 1 else None
    lifetime: float | None = None
    if raw.timers is not None:
        lifetime, why = timers.classify(raw.timers, timers_counted(raw))
        reasons.append(("syn_sent_lifetime_s", why))
    unsolicited_syn, why = unsolicited_finding(raw, server_ip, ev.info.public.ip)
    reasons.append(("unsolicited_syn", why))
    filt, why = filtering.classify(raw.seen, ev.fresh[0].local.port, server_ip, other_ip,
                                   ev.info.probe_port)
    reasons.append(("filtering", why))
    reply, why = reply_syn.classify(raw.reply, raw.seen)
    reasons.append(("reply_syn", why))
    hp, why = hairpin.classify(raw.hairpin, raw.seen)
    if not m.behind_nat:
        hp, why = True, "not behind a NAT: the public endpoint is the host's own address"
    elif not raw.hairpin_sent:
        hp, why = None, f"not measured: {hairpin.OFF_REASON}"
    reasons.append(("hairpin", why))
    hop_count: int | None = None
    why_not = hops_not_measured(m, reply, filt, unsolicited_syn)
    if why_not is not None:
        why = why_not
    else:
        hop_count, why = hops.classify(raw.hops, raw.seen)
    reasons.append(("hops", why))
    stack, why = host_stack.classify(raw.stack, raw.seen)
    reasons.append(("host_stack", why))
    findings = replace(base, filtering=filt, unsolicited_syn=unsolicited_syn, reply_syn=reply,
                       hairpin=hp, hops=hop_count, host_stack=stack,
                       syn_sent_lifetime_s=lifetime)
    return findings, reasons, tuple(hops.path(raw.hops, raw.seen))


def timers_counted(raw: RawEvidence) -> list[Seen]:
    """The capture up to the moment the holes' answers were counted (later ones do not
    count: the wait for them was over)."""
    deadline = raw.timers_deadline
    return [s for s in raw.seen if deadline is None or s.t <= deadline]


def probes_of(ev: Evidence) -> dict[str, Any]:
    """The JSON's "probes": the ports each probe used, for reading the pcap."""
    out: dict[str, Any] = {"host": ev.host_ip, "server_port": ev.info.port,
                           "filter_local_port": ev.fresh[0].local.port}
    raw = ev.raw
    if raw is not None:
        out.update(unsolicited_port=raw.unsolicited_port, reply_port=raw.reply.local_port,
                   hairpin_port=raw.hairpin.local_port if raw.hairpin_sent else None,
                   hop_ports=list(raw.hops.local_ports),
                   timer_ports=list(raw.timers.local_ports) if raw.timers else [],
                   timer_waits=list(raw.timers.waits) if raw.timers else [],
                   answer_window_s=round(raw.answer_window_s, 3))
        if raw.followed_port is not None:
            out["followed_port"] = raw.followed_port
        if raw.icmp_keep_port is not None:
            out["icmp_keep_port"] = raw.icmp_keep_port
    ps = ev.port_samples
    if ps is not None:
        out["port_samples"] = {"asked": ps.asked, "answered": len(ps.ports),
                               "failed": ps.failed, "duration_s": round(ps.duration_s, 3)}
    return out
