"""What nat-check must find behind each lab profile, written by hand from the profile's
rules (synprobe/lab.py), never from nat-check's own output: the lab tests
(test_natcheck_lab.py) assert it on live runs, the classifier tests
(test_natcheck_classify.py) on the recorded captures, and the recorder
(natcheck_record.py) refuses to write a capture that disagrees."""

from __future__ import annotations

from typing import Any

from synprobe import lab as labmod

EI, APD = "endpoint-independent", "address-and-port-dependent"
ABORTS = {"rst": "aborts", "icmp": "aborts", "ttl_exceeded": "aborts"}
SERVER = f"{labmod.BROKER_IPS[0]}:{labmod.BROKER_PORT}"

# Extra nat-check options per profile (the lifetime is measured where it is short).
EXTRA: dict[str, list[str]] = {
    "home": ["--timers", "--max-wait", "2"],
    "syn-sent-5s": ["--timers", "--max-wait", "8"],
}

_HOME = dict(behind_nat=True, mapping=EI, port_preservation=True, port_allocation="preserving",
             filtering=APD, unsolicited_syn="drop", reply_syn="pass",
             syn_sent_lifetime_s=None, hairpin=False, hops=1, host_stack=ABORTS)
EXPECTED: dict[str, dict[str, Any]] = {
    "home": {**_HOME, "syn_sent_lifetime_s": 2.0},
    "home-nft": _HOME,
    "original": {**_HOME, "unsolicited_syn": "rst"},
    "reject-rst": {**_HOME, "unsolicited_syn": "rst"},
    "reject-icmp-port": {**_HOME, "unsolicited_syn": "icmp-port-unreachable"},
    "reject-icmp-admin": {**_HOME, "unsolicited_syn": "icmp-admin-prohibited"},
    "random": {**_HOME, "mapping": APD, "port_preservation": False,
               "port_allocation": "random", "hops": None},
    "syn-drop-all": {**_HOME, "reply_syn": "blocked", "hops": None},
    "syn-sent-5s": {**_HOME, "syn_sent_lifetime_s": 4.0},
    "firewall": {**_HOME, "behind_nat": False, "mapping": "none", "hairpin": True},
    "dmz": {**_HOME, "filtering": EI, "unsolicited_syn": "pass", "hairpin": True,
            "hops": None},
    "carrier": {**_HOME, "hops": 2},
}
VERDICT = {"home": "Punch-friendly NAT", "home-nft": "Punch-friendly NAT",
           "original": "Punchable NAT that rejects", "reject-rst": "Punchable NAT that rejects",
           "reject-icmp-port": "Punchable NAT that rejects",
           "reject-icmp-admin": "Punchable NAT that rejects", "random": "Hard NAT",
           "syn-drop-all": "Blocking NAT", "syn-sent-5s": "Punch-friendly NAT",
           "firewall": "No NAT", "dmz": "Open NAT", "carrier": "Punch-friendly NAT"}
# (order, ttl_limited_first_syn, ttl) of the recommendation
ADVICE = {"original": ("first", True, 2), "reject-rst": ("first", True, 2),
          "reject-icmp-port": ("first", True, 2), "reject-icmp-admin": ("first", True, 2),
          "random": ("either", False, None), "syn-drop-all": ("either", False, None),
          "dmz": ("either", False, None), "carrier": ("either", False, 3)}
DEFAULT_ADVICE = ("either", False, 2)  # the TTL a hole-opening SYN would need: hops + 1


def expected_path(side: str, profile: str) -> list[str | None]:
    """The routers that answer the TTL 1, 2, 3 SYNs with time-exceeded, from the lab's
    topology: the home gateway, the carrier's NAT (carrier only), the lab's router; None
    where the SYN reached the broker."""
    addr = labmod.side_addresses(side, labmod.PROFILES[profile])
    if labmod.PROFILES[profile].carrier:
        carrier_nat = addr.gateway_wan.rsplit(".", 1)[0] + ".1"  # the carrier's inside
        return [addr.gateway_lan, carrier_nat, addr.router]
    return [addr.gateway_lan, addr.router, None]


def mismatches(profile: str, report: dict[str, Any]) -> list[str]:
    """How a nat-check --json report differs from the expectations ([] if it does not)."""
    out = [f"{key}: {report.get(key)!r}, expected {value!r}"
           for key, value in EXPECTED[profile].items() if report.get(key) != value]
    if not str(report.get("verdict", "")).startswith(VERDICT[profile]):
        out.append(f"verdict: {report.get('verdict')!r}, expected {VERDICT[profile]}...")
    rec = report.get("recommendation") or {}
    advice = tuple(rec.get(k, {}).get("value") for k in ("order", "ttl_limited_first_syn",
                                                         "ttl"))
    if advice != ADVICE.get(profile, DEFAULT_ADVICE):
        out.append(f"recommendation: {advice}, expected {ADVICE.get(profile, DEFAULT_ADVICE)}")
    return out


# --- RFC 5382, requirement by requirement (nat-check --rfc5382) ----------------------------
# Written from each profile's rules (synprobe/lab/profiles.py) and RFC 5382's text, never
# from nat-check's output:
# * REQ-1: MASQUERADE keeps one public port for every destination (pass); --random-fully
#   gives each destination another (random fails).
# * REQ-2: conntrack takes a SYN in the reply direction of our SYN's entry as ESTABLISHED,
#   which every profile's FORWARD accepts but syn-drop-all's first rule drops.
# * REQ-3: conntrack alone filters address-and-port-dependently (fails the recommendation);
#   the DMZ profiles forward every inbound TCP to the host (endpoint-independent).
# * REQ-4: INPUT ACCEPT (original) makes the NAT's own kernel RST at once, REJECT answers
#   at once (a violation: under 6 s); DROP says nothing (4a); the DMZ profiles forward it.
#   random: the followed SYN cannot be aimed (ports not kept), the rest is home's.
#   late-icmp: INPUT queues it, its helper has it REJECTed (ICMP port-unreachable) after
#   6.2 s, or dropped when the host's own SYN for it went out meanwhile: passes.
# * REQ-5: transitory: syn-sent-5s's SYN_SENT timeout is 5 s (--timers --max-wait 8 finds
#   it closed by 6 s); the others run without --timers; established: never measured.
# * REQ-7: one host, ports kept or random: its ports never share a public endpoint.
# * REQ-8: a SYN from the lan to the public address is the NAT's own INPUT (its kernel
#   RSTs it) unless a DNAT rule hairpins it (dmz, rfc5382); 8a: dmz MASQUERADEs it out of
#   lan (source 10.x.0.1), rfc5382 SNATs it to the public address, the port kept.
# * REQ-9: every FORWARD accepts RELATED, and conntrack rewrites the quoted packet.
# * REQ-10: Linux's conntrack keeps an entry an ICMP error is RELATED to (pass), except
#   where reply SYNs never pass (syn-drop-all: nothing can show the mapping).
# * firewall: no NAT, so none of them applies.
REQS = ("REQ-1", "REQ-2", "REQ-3", "REQ-4", "REQ-5 transitory", "REQ-5 established", "REQ-6",
        "REQ-7", "REQ-8", "REQ-8a", "REQ-9", "REQ-10")
P, F, N = "pass", "fail", "not measured"
_RFC_HOME = dict(zip(REQS, (P, P, F, P, N, N, N, P, F, N, P, P), strict=True))
_RFC_DMZ = {**_RFC_HOME, "REQ-3": P, "REQ-8": P, "REQ-8a": F}
RFC5382: dict[str, dict[str, str]] = {
    "home": _RFC_HOME,
    "home-nft": {**_RFC_HOME, "REQ-8": N},  # run with --no-hairpin
    "original": {**_RFC_HOME, "REQ-4": F},
    "reject-rst": {**_RFC_HOME, "REQ-4": F},
    "reject-icmp-port": {**_RFC_HOME, "REQ-4": F},
    "reject-icmp-admin": {**_RFC_HOME, "REQ-4": F},
    "random": {**_RFC_HOME, "REQ-1": F},
    "syn-drop-all": {**_RFC_HOME, "REQ-2": F, "REQ-10": N},
    "syn-sent-5s": {**_RFC_HOME, "REQ-5 transitory": F},
    "firewall": dict.fromkeys(REQS, N),
    "dmz": _RFC_DMZ,
    "rfc5382": {**_RFC_DMZ, "REQ-8a": P},
    "carrier": _RFC_HOME,
    "late-icmp": _RFC_HOME,  # ICMP after 6.2 s, the followed SYN dropped: REQ-4 passes
}
RFC5382_EXTRA: dict[str, list[str]] = {
    "home-nft": ["--no-hairpin"],
    "syn-sent-5s": ["--timers", "--max-wait", "8"],
}
# The NAT answers an unsolicited SYN only after 6 s: with this, and when (ms, from the
# profile's hold).
ANSWERS_LATE = {"late-icmp": ("icmp-port-unreachable", 6200)}
# The NAT answers an unsolicited SYN at once (REQ-4 violated by the answer's timing).
ANSWERS_AT_ONCE = {"original": "rst", "reject-rst": "rst",
                   "reject-icmp-port": "icmp-port-unreachable",
                   "reject-icmp-admin": "icmp-admin-prohibited"}
