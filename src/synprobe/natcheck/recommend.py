"""From findings to advice for `synprobe punch` on this side, and a one-sentence verdict
(pure). Each piece of advice carries the one-line reason it follows from."""

from __future__ import annotations

from .report import (
    Advice,
    Behaviour,
    Findings,
    Order,
    Outcome,
    Recommendation,
    StackKind,
    StackReaction,
)

DEFAULT_TIMEOUT_S = 30.0


def _rejects(f: Findings) -> bool:
    return f.unsolicited_syn is not None and f.unsolicited_syn != Outcome.DROP \
        and f.unsolicited_syn != Outcome.PASS


def port_hint(f: Findings) -> str:
    """Where new public ports come from (port_range), for the hard-NAT advice; "" if
    not sampled."""
    pr = f.port_range
    if pr is None or pr.range is None:
        return ""
    out = "new public ports come from {}-{}".format(*pr.range)
    if pr.hot_band is not None and pr.uniform is False:
        out += ", most often {}-{}: a birthday punch aims there".format(*pr.hot_band)
    elif pr.uniform:
        out += ", uniformly"
    return out


def recommend(f: Findings) -> Recommendation:
    aborts = bool(f.host_stack) and all(v == StackReaction.ABORTS
                                        for v in (f.host_stack or {}).values())
    rejects = _rejects(f)
    blocked = f.reply_syn == Outcome.BLOCKED
    # Timeout: the peer's SYN must arrive while our hole is open.
    if f.syn_sent_lifetime_s is not None and f.syn_sent_lifetime_s < DEFAULT_TIMEOUT_S:
        timeout = Advice(max(1.0, f.syn_sent_lifetime_s),
                         f"a hole lives {f.syn_sent_lifetime_s:g} s: each attempt's SYN must be "
                         "answered within it")
    else:
        timeout = Advice(DEFAULT_TIMEOUT_S, "both peers start within this; holes live longer"
                         if f.syn_sent_lifetime_s is not None else
                         "hole lifetime not measured (--timers): the punch default")
    hard = bool(f.behind_nat) and f.mapping not in (None, Behaviour.EI, Behaviour.NO_NAT) \
        and not f.port_preservation
    if blocked:
        retries = Advice(1, "reply SYNs are blocked: retrying cannot help")
        interval = Advice(None, "no retries")
    elif hard:
        hint = port_hint(f)
        retries = Advice(1, "the public port changes with each destination: retrying the same "
                            "endpoint cannot help; `synprobe punch` goes birthday (many "
                            "sockets here, many guessed ports from a peer whose NAT keeps "
                            "its port)" + (f"; {hint}" if hint else ""))
        interval = Advice(None, "no retries")
    elif rejects and aborts:
        retries = Advice(50, f"this NAT answers an early SYN with {f.unsolicited_syn} and this "
                             "host's connect() aborts on RST/ICMP: attempts can end at once, "
                             "keep trying until both holes are open")
        interval = Advice(0.2, "attempts end at once; pace them so 50 cover 10 s")
    elif rejects:
        retries = Advice(10, f"the NAT answers an early SYN with {f.unsolicited_syn}")
        interval = Advice(1.0, "the host's TCP keeps retrying on its own between attempts")
    else:
        retries = Advice(3, "unsolicited SYNs are dropped silently: one connect() waits while "
                            "the kernel resends the SYN, and the peer's SYN meets it")
        interval = Advice(1.0, "only attempts that fail at once need a pause")
    if f.behind_nat is False:
        order = Advice(Order.EITHER, "no NAT on this side: only the firewall's state matters")
    elif rejects:
        order = Advice(Order.FIRST, "this NAT rejects unsolicited SYNs: open our hole before the "
                                "peer's SYN arrives, or the peer's connect() is refused")
    else:
        order = Advice(Order.EITHER, "this NAT drops unsolicited SYNs silently: the order does "
                                 "not matter")
    if rejects and f.hops is not None:
        ttl_needed = Advice(True, "open our hole first with a SYN that dies before the peer's "
                                  "NAT: then the peer's SYN always finds it open, whatever the "
                                  "peer's NAT does with early SYNs")
        ttl = Advice(f.hops + 1, f"{f.hops} router(s) up to and including our NAT, plus one")
        if f.host_stack and f.host_stack.get(StackKind.TTL_EXCEEDED) == StackReaction.ABORTS:
            ttl = Advice(f.hops + 1, f"{f.hops} router(s) up to and including our NAT, plus "
                                     "one; its time-exceeded aborts connect(): retry at once")
    elif rejects:
        ttl_needed = Advice(True, "the NAT rejects unsolicited SYNs, but hops were not measured")
        ttl = Advice(None, "hops unknown")
    else:
        full = "full-TTL SYN" if f.limited == "TTL" else "SYN at the full hop limit"
        ttl_needed = Advice(False, f"a {full} does no harm here: unsolicited SYNs are "
                                   "dropped silently" if f.unsolicited_syn == Outcome.DROP else
                                   "not needed on this side")
        ttl = (Advice(f.hops + 1, f"not needed; if one is used: {f.hops} router(s) up to and "
                                  "including our NAT, plus one")
               if f.hops is not None else Advice(None, "hops not measured"))
    return Recommendation(retries, interval, timeout, order, ttl_needed, ttl)


def verdict(f: Findings) -> str:
    """One sentence a user can paste into a bug report."""
    facts = []
    if f.behind_nat:
        facts.append(f"mapping {f.mapping or 'unknown'}"
                     + (", ports preserved" if f.port_preservation else
                        f", ports {f.port_allocation or 'not preserved'}"))
    facts.append(f"filtering {f.filtering or 'unknown'}")
    facts.append(f"unsolicited SYN: {f.unsolicited_syn or 'unknown'}")
    facts.append(f"reply SYN: {f.reply_syn or 'unknown'}")
    what = "; ".join(facts)
    if f.reply_syn == Outcome.BLOCKED:
        return (f"Blocking {'NAT' if f.behind_nat else 'firewall'} ({what}): it drops SYNs that "
                "answer our own, so TCP simultaneous open cannot work through it; use a relay.")
    if f.behind_nat and f.mapping not in (None, Behaviour.EI, Behaviour.NO_NAT) \
            and not f.port_preservation:
        hint = port_hint(f)
        return (f"Hard NAT ({what}): the public port changes with every destination, so the "
                "peer cannot know where to aim: a plain punch fails; `synprobe punch` crosses it "
                "by birthday punching when the peer's NAT keeps its port (two such NATs need "
                "a relay)" + (f"; {hint}." if hint else "."))
    if f.reply_syn is None:
        return f"Incomplete check ({what}): the raw probes did not run, see the reasons."
    if f.behind_nat is False and f.unsolicited_syn == Outcome.PASS:
        return (f"No NAT, no firewall ({what}): unsolicited SYNs reach this host, so the peer "
                "can simply connect to its address.")
    if f.behind_nat is False and _rejects(f):
        return (f"No NAT, a firewall that rejects unsolicited SYNs ({what}): TCP simultaneous "
                "open works if this side sends first (a hop-limited SYN) or keeps retrying.")
    if f.behind_nat is False:
        return (f"No NAT, a stateful firewall ({what}): TCP simultaneous open works; give the "
                "peer this host's address.")
    if _rejects(f):
        return (f"Punchable NAT that rejects unsolicited SYNs ({what}): TCP simultaneous open "
                f"works if this side sends first (a {f.limited}-limited SYN) or keeps "
                "retrying.")
    if f.unsolicited_syn == Outcome.PASS or f.filtering == Behaviour.EI:
        return (f"Open NAT ({what}): unsolicited SYNs reach this host, so the peer can simply "
                "connect to its public endpoint.")
    return (f"Punch-friendly NAT ({what}): TCP simultaneous open works with plain retries.")
