"""RFC 5382 (NAT Behavioral Requirements for TCP, BCP 142), requirement by requirement.

Pure: from what one nat-check sent and saw (``Evidence``) and what it found
(``Findings``), one ``Requirement`` per REQ, each ``pass``, ``fail`` or ``not measured``
with its reason and the packets behind it. The sections cited are RFC 5382's:

* REQ-1 (4.1): endpoint-independent mapping (MUST).
* REQ-2 (4.2): every valid opening sequence, simultaneous open in particular (MUST).
* REQ-3 (4.3): endpoint-independent filtering RECOMMENDED (address-dependent where a
  stricter filter matters more): address-and-port-dependent filtering fails the
  recommendation, not a MUST.
* REQ-4 (4.3): no answer to an unsolicited SYN for at least 6 s; silently dropped if an
  outbound SYN for it follows within that time; otherwise ICMP port-unreachable
  (SHOULD), unless local policy drops it silently (REQ-4a).
* REQ-5 (5): transitory idle timeout >= 4 min; established >= 2 h 4 min.
* REQ-6 (6): ALGs off by default (RECOMMENDED): nat-check sends no application protocol.
* REQ-7 (7.1): no port overloading.
* REQ-8 (7.2): hairpinning (MUST); 8a: with the external source address and port.
* REQ-9 (7.3): ICMP destination-unreachable translated back to the host (SHOULD).
* REQ-10 (7.3): an ICMP error does not end the mapping (MUST NOT).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from simulsyn_core._internal.endpoint import Endpoint

from ..packets.seen import Seen
from . import hairpin, timers
from . import protocol as P
from .evidence import Evidence, RawEvidence, timers_counted
from .report import Behaviour, Findings, Outcome, StrValue

TRANSITORY_MIN_S = 240.0  # REQ-5: 4 minutes
ESTABLISHED_MIN_S = 2 * 3600 + 4 * 60  # REQ-5: 2 hours 4 minutes


class Status(StrValue):
    PASS = "pass"
    FAIL = "fail"
    NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Requirement:
    req: str  # "REQ-1", "REQ-8a", "REQ-5 transitory"
    section: str  # RFC 5382's section
    level: str  # MUST, SHOULD, RECOMMENDED
    title: str
    status: Status
    reason: str
    evidence: tuple[str, ...] = ()  # the packets and times behind the status

    def to_json(self) -> dict[str, Any]:
        return {"req": self.req, "section": self.section, "level": self.level,
                "title": self.title, "status": str(self.status), "reason": self.reason,
                "evidence": list(self.evidence)}


def _row(req: str, section: str, level: str, title: str
         ) -> Callable[..., Requirement]:
    def make(status: Status, reason: str, evidence: tuple[str, ...] = ()) -> Requirement:
        return Requirement(req, section, level, title, status, reason, evidence)
    return make


PASS, FAIL, NOT_MEASURED = Status.PASS, Status.FAIL, Status.NOT_MEASURED
NO_NAT = "no NAT: the server sees this host's own address (these are a NAT's requirements)"


def _packet(s: Seen, t0: float) -> str:
    """One packet of the capture, as the evidence shows it."""
    when = f"+{(s.t - t0) * 1000:.0f} ms"
    way = "out" if s.outgoing else "in"
    if s.is_icmp_error:
        icmp = "ICMPv6" if s.proto == 58 else "ICMP"
        return (f"{when} {way} {icmp} {s.icmp_type}/{s.icmp_code} {s.src} > {s.dst} "
                f"quoting {Endpoint(s.inner_src, s.inner_sport)} > "
                f"{Endpoint(s.inner_dst, s.inner_dport)}")
    flags = "RST" if s.is_rst else "SYN" if s.is_syn else f"flags 0x{s.flags:02x}"
    return (f"{when} {way} {flags} {Endpoint(s.src, s.sport)} > {Endpoint(s.dst, s.dport)} "
            f"seq 0x{s.seq:08x}")


def _raw_reason(ev: Evidence) -> str:
    return f"not measured: {ev.raw_off}" if ev.raw_off else "the raw probes did not run"


def _unmeasurable(ev: Evidence, f: Findings) -> str:
    """Why a requirement that needs the raw probes cannot be told ("" when it can)."""
    if f.behind_nat is False:
        return NO_NAT
    return _raw_reason(ev) if ev.raw is None else ""


def assess(ev: Evidence, f: Findings) -> tuple[Requirement, ...]:
    """Every requirement's status, reason and evidence (pure)."""
    rows = [_req1(f), _req2(ev, f), _req3(f), _req4(ev, f), *_req5(ev, f), _req6(),
            _req7(ev, f), *_req8(ev, f), _req9(ev, f), _req10(ev, f)]
    return tuple(rows)


def summary(rows: tuple[Requirement, ...]) -> str:
    """The verdict's sentence about RFC 5382: which REQs fail."""
    failed = [r.req for r in rows if r.status == FAIL]
    unmeasured = sum(r.status == NOT_MEASURED for r in rows)
    if failed:
        return (f"RFC 5382: fails {', '.join(failed)} ({unmeasured} of {len(rows)} "
                "requirements not measured).")
    return (f"RFC 5382: no requirement measured fails ({unmeasured} of {len(rows)} not "
            "measured).")


def _req1(f: Findings) -> Requirement:
    row = _row("REQ-1", "4.1", "MUST", "endpoint-independent mapping")
    if f.behind_nat is False:
        return row(NOT_MEASURED, NO_NAT)
    why = f.reason("mapping")
    if f.mapping == Behaviour.EI:
        return row(PASS, f"mapping endpoint-independent: {why}")
    if f.mapping in (Behaviour.AD, Behaviour.APD):
        return row(FAIL, f"mapping {f.mapping}: {why}")
    return row(NOT_MEASURED, f"mapping not told: {why}")


def _req2(ev: Evidence, f: Findings) -> Requirement:
    row = _row("REQ-2", "4.2", "MUST", "simultaneous open and every valid opening sequence")
    if f.behind_nat is False:
        return row(NOT_MEASURED, NO_NAT)
    handshakes = 1 + len(ev.same_port) + len(ev.fresh)
    if f.reply_syn == Outcome.PASS:
        return row(PASS, f"simultaneous open: {f.reason('reply_syn')}; three-way handshake: "
                         f"{handshakes} connections to the server came up (other sequences, "
                         "such as a SYN with data, were not tried)", _reply_evidence(ev))
    if f.reply_syn == Outcome.BLOCKED:
        return row(FAIL, f"simultaneous open fails: {f.reason('reply_syn')}",
                   _reply_evidence(ev))
    return row(NOT_MEASURED, f.reason("reply_syn") or _raw_reason(ev))


def _reply_evidence(ev: Evidence) -> tuple[str, ...]:
    raw = ev.raw
    if raw is None:
        return ()
    port = raw.reply.local_port
    return _packets(raw, lambda s: s.proto == 6 and port in (s.sport, s.dport))


def _packets(raw: RawEvidence, keep: Callable[[Seen], bool]) -> tuple[str, ...]:
    chosen = [s for s in raw.seen if keep(s)]
    if not chosen:
        return ()
    t0 = raw.seen[0].t
    return tuple(_packet(s, t0) for s in chosen)


def _req3(f: Findings) -> Requirement:
    row = _row("REQ-3", "4.3", "RECOMMENDED",
               "endpoint-independent filtering (address-dependent if stricter)")
    if f.behind_nat is False:
        return row(NOT_MEASURED, NO_NAT)
    why = f.reason("filtering")
    if f.filtering == Behaviour.EI:
        return row(PASS, f"filtering endpoint-independent, as recommended: {why}")
    if f.filtering == Behaviour.AD:
        return row(PASS, "filtering address-dependent, the recommendation where a stricter "
                         f"filter matters more: {why}")
    if f.filtering == Behaviour.APD:
        return row(FAIL, "filtering address-and-port-dependent: RFC 5382 recommends "
                         f"endpoint-independent (or address-dependent): {why}")
    return row(NOT_MEASURED, why or "filtering not told")


def _req4(ev: Evidence, f: Findings) -> Requirement:
    row = _row("REQ-4", "4.3", "MUST",
               "no answer to an unsolicited SYN for 6 s; dropped if an outbound SYN follows")
    why_not = _unmeasurable(ev, f)
    if why_not or ev.raw is None:
        return row(NOT_MEASURED, why_not)
    raw = ev.raw
    result = raw.broker
    evidence: tuple[str, ...] = (
        f"the server's SYN to port {raw.unsolicited_port}: {result.unsolicited}"
        + (f" after {result.unsolicited_ms} ms" if result.unsolicited_ms is not None
                   else "")
                + (f" (watched {result.watched_ms} ms)" if result.watched_ms else ""),)
    if raw.followed_port is not None:
        evidence += (f"the server's SYN to port {raw.followed_port}, followed out by ours: "
                     f"{result.followed}"
                     + (f" after {result.followed_ms} ms" if result.followed_ms is not None
                        else ""),)
    silence_ms = int(P.REQ4_SILENCE_S * 1000)
    if f.unsolicited_syn == Outcome.PASS:
        return row(PASS, "the NAT forwarded the unsolicited SYN to the host: it did not "
                         "answer it itself", evidence)
    answer = result.unsolicited
    if answer is None:
        return row(NOT_MEASURED, "the server did not say what came back", evidence)
    if answer != Outcome.DROP:
        after = result.unsolicited_ms
        if after is None or after < silence_ms:
            when = (f"after {after} ms" if after is not None
                    else f"within the {raw.answer_window_s * 1000:.0f} ms watched")
            return row(FAIL, f"the NAT answered an unsolicited SYN with {answer} {when}: "
                             "REQ-4 forbids any answer for 6 s", evidence)
    watched = result.watched_ms or 0
    if answer == Outcome.DROP and watched < silence_ms:
        how = ("the server did not watch for 6 s (an older synprobe broker)"
               if ev.rfc5382_asked else "the 6 s watch needs --rfc5382")
        return row(NOT_MEASURED, f"no answer within the {raw.answer_window_s * 1000:.0f} ms "
                                 f"watched; {how}", evidence)
    followed = result.followed
    if followed is not None and followed != Outcome.DROP:
        return row(FAIL, f"a SYN that an outbound SYN followed was answered with {followed} "
                         "(it must be dropped silently)", evidence)
    followed_note = ("and one that our outbound SYN followed was dropped silently"
                     if followed == Outcome.DROP else
                     "the followed-SYN case not measured (the NAT does not keep port "
                     "numbers, so our SYN's public port is not known)")
    if answer == Outcome.DROP:
        return row(PASS, f"no answer in {watched / 1000:g} s: dropped silently (REQ-4a), "
                         + followed_note, evidence)
    how = ("ICMP port-unreachable, as REQ-4 recommends" if answer ==
           Outcome.ICMP_PORT_UNREACHABLE else f"{answer} (REQ-4 recommends ICMP "
                                              "port-unreachable: a SHOULD)")
    return row(PASS, f"answered only after {result.unsolicited_ms} ms, with {how}; "
                     + followed_note, evidence)


def _req5(ev: Evidence, f: Findings) -> list[Requirement]:
    transitory = _row("REQ-5 transitory", "5", "MUST",
                      "transitory idle timeout (SYN hole) at least 4 min")
    established = _row("REQ-5 established", "5", "MUST",
                       "established idle timeout at least 2 h 4 min")
    est = established(NOT_MEASURED, "needs an idle established connection watched for "
                                    "2 h 4 min: nat-check does not run that long")
    if f.behind_nat is False:
        return [transitory(NOT_MEASURED, NO_NAT), est]
    if not ev.timers_asked:
        return [transitory(NOT_MEASURED, "needs --timers (with --max-wait 240 or more)"), est]
    raw = ev.raw
    if raw is None or raw.timers is None:
        return [transitory(NOT_MEASURED, _raw_reason(ev)), est]
    why = f.reason("syn_sent_lifetime_s")
    lifetime = f.syn_sent_lifetime_s
    closed = timers.closed_after(raw.timers, timers_counted(raw))
    evidence = tuple(f"wait {w:g} s: {'open' if p else 'closed'}" for w, p in sorted(
        zip(raw.timers.waits, timers.passed(raw.timers, timers_counted(raw)), strict=True)))
    if lifetime is not None and lifetime >= TRANSITORY_MIN_S:
        return [transitory(PASS, f"the hole was open after {lifetime:g} s: {why}", evidence),
                est]
    if lifetime is not None and closed is not None and closed <= TRANSITORY_MIN_S:
        return [transitory(FAIL, f"the hole closed within {closed:g} s, under 4 min: {why}",
                           evidence), est]
    return [transitory(NOT_MEASURED, f"{why}: 4 min not reached (--max-wait 240 or more)",
                       evidence), est]


def _req6() -> Requirement:
    return _row("REQ-6", "6", "RECOMMENDED", "ALGs off by default")(
        NOT_MEASURED, "nat-check sends no application protocol an ALG would rewrite")


def _req7(ev: Evidence, f: Findings) -> Requirement:
    row = _row("REQ-7", "7.1", "MUST", "no port overloading")
    if f.behind_nat is False:
        return row(NOT_MEASURED, NO_NAT)
    by_local: dict[str, set[str]] = {}
    for o in (ev.control, *ev.same_port, *ev.fresh):
        by_local.setdefault(str(o.public), set()).add(str(o.local))
    evidence = tuple(f"{', '.join(sorted(local))} -> {public}"
                     for public, local in by_local.items())
    shared = [public for public, local in by_local.items() if len(local) > 1]
    if shared:
        return row(FAIL, f"several local ports share the public endpoint {shared[0]}",
                   evidence)
    locals_ = {str(o.local) for o in (ev.control, *ev.same_port, *ev.fresh)}
    return row(PASS, f"{len(locals_)} local ports got {len(by_local)} distinct public "
                     "endpoints (from one host; overloading between two hosts needs a "
                     "second host behind the NAT)", evidence)


def _req8(ev: Evidence, f: Findings) -> list[Requirement]:
    req8 = _row("REQ-8", "7.2", "MUST", "hairpinning")
    req8a = _row("REQ-8a", "7.2", "MUST", "hairpinning with the external source address "
                                         "and port")
    why_not = _unmeasurable(ev, f)
    if why_not or ev.raw is None:
        return [req8(NOT_MEASURED, why_not), req8a(NOT_MEASURED, why_not)]
    raw = ev.raw
    if not raw.hairpin_sent:
        why = f"not measured: {hairpin.OFF_REASON}"
        return [req8(NOT_MEASURED, why), req8a(NOT_MEASURED, why)]
    probe = raw.hairpin
    evidence = _packets(raw, lambda s: s.proto == 6 and s.seq == P.Seq.HAIRPIN
                        or (s.is_rst and s.dport == probe.local_port))
    why = f.reason("hairpin")
    if f.hairpin is None:
        return [req8(NOT_MEASURED, why), req8a(NOT_MEASURED, why)]
    if not f.hairpin:
        return [req8(FAIL, why, evidence), req8a(NOT_MEASURED, "no hairpinning")]
    back = hairpin.came_back(probe, raw.seen)
    assert back is not None
    public_ip = ev.info.public.ip
    source = str(Endpoint(back.src, back.sport))
    if back.src != public_ip:
        verdict_8a = req8a(FAIL, f"the hairpinned SYN came from {source}, not from this "
                                 f"host's external address {public_ip}", evidence)
    elif f.port_preservation and back.sport == probe.local_port:
        verdict_8a = req8a(PASS, f"the hairpinned SYN came from {source}: the sender's "
                                 "external address and port", evidence)
    elif f.port_preservation:
        verdict_8a = req8a(FAIL, f"the hairpinned SYN came from {source}, not from the "
                                 f"sender's external port {probe.local_port}", evidence)
    else:
        verdict_8a = req8a(NOT_MEASURED, f"the hairpinned SYN came from {source}: the "
                                         "external address; the sender's external port is "
                                         "unknown (no port preservation)", evidence)
    return [req8(PASS, why, evidence), verdict_8a]


def _icmp_to(raw: RawEvidence, host_ip: str, local_port: int) -> Seen | None:
    """A destination-unreachable that came in for our packet from ``local_port``, with the
    quoted packet translated back to this host's address."""
    return next((s for s in raw.seen if not s.outgoing and s.is_unreachable
                 and s.inner_src == host_ip
                 and s.inner_sport == local_port), None)


def _req9(ev: Evidence, f: Findings) -> Requirement:
    row = _row("REQ-9", "7.3", "SHOULD", "ICMP destination-unreachable translated back")
    why_not = _unmeasurable(ev, f)
    if why_not or ev.raw is None:
        return row(NOT_MEASURED, why_not)
    raw = ev.raw
    ports = [o.local_port for o in raw.stack if o.kind == "icmp"]
    if raw.icmp_keep_port is not None:
        ports.append(raw.icmp_keep_port)
    came = [s for s in (_icmp_to(raw, ev.host_ip, p) for p in ports) if s is not None]
    t0 = raw.seen[0].t if raw.seen else 0.0
    if came:
        return row(PASS, f"{len(came)} ICMP destination-unreachable error(s) for our SYNs "
                         "reached the host, the quoted SYN translated back to "
                         f"{ev.host_ip}", tuple(_packet(s, t0) for s in came))
    keep_syn = _keep_syn(raw)
    if keep_syn is not None:
        return row(FAIL, "the server's ICMP error for our SYN did not reach the host, but "
                         "the SYN it sent after it on the same mapping did",
                   (_packet(keep_syn, t0),))
    return row(NOT_MEASURED, "no ICMP error reached the host, and nothing shows that one "
                             "reached the NAT")


def _keep_syn(raw: RawEvidence) -> Seen | None:
    """REQ-10's SYN from the server, after its ICMP error, as it reached the host."""
    port = raw.icmp_keep_port
    return next((s for s in raw.seen if port is not None and not s.outgoing and s.is_syn
                 and s.seq == P.Seq.ICMP_KEEP_ANSWER and s.dport == port), None)


def _req10(ev: Evidence, f: Findings) -> Requirement:
    row = _row("REQ-10", "7.3", "MUST", "an ICMP error does not end the mapping")
    why_not = _unmeasurable(ev, f)
    if why_not or ev.raw is None:
        return row(NOT_MEASURED, why_not)
    raw = ev.raw
    if raw.icmp_keep_port is None:
        return row(NOT_MEASURED, "needs --rfc5382 (an ICMP error for our SYN, then a SYN "
                                 "on the same mapping)")
    if raw.broker.watched_ms is None:
        return row(NOT_MEASURED, "the server does not send REQ-10's ICMP error (an older "
                                 "synprobe broker)")
    if f.reply_syn != Outcome.PASS:
        return row(NOT_MEASURED, "reply SYNs do not pass this NAT: nothing can show that the "
                                 "mapping outlived the ICMP error")
    port = raw.icmp_keep_port
    evidence = _packets(raw, lambda s: (s.proto == 6 and port in (s.sport, s.dport))
                        or (s.is_icmp_error and s.inner_sport == port))
    icmp = _icmp_to(raw, ev.host_ip, port)
    syn = _keep_syn(raw)
    gap = f"{P.ICMP_KEEP_GAP_S * 1000:.0f} ms"
    if syn is not None:
        seen_icmp = ("the ICMP error reached the host" if icmp is not None
                     else "the ICMP error was sent (not translated to the host)")
        return row(PASS, f"{seen_icmp}; the server's SYN {gap} later on the same mapping "
                         "still reached the host", evidence)
    return row(FAIL, f"after the server's ICMP error for our SYN, its SYN {gap} later on the "
                     "same mapping did not reach the host (a reply SYN does without the "
                     "error): the ICMP error ended the mapping", evidence)
