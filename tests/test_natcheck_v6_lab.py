"""nat-check -6 in the NAT lab: every IPv6 profile, its expected keys written by hand
from the profile's rules (src/synprobe/lab/profiles.py PROFILES6), not from a run.

Host A 2001:db8:a::2 behind gateway ga, host B 2001:db8:b::2 behind gb; the broker
listens on 2001:db8:c::10 and ::11 (and its IPv4 addresses). Each pair's lab is taken
down, and checked for leftovers, on every exit path."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from synprobe import lab as labmod
from tests import schemas
from tests.conftest import require_lab, take_down_and_check
from tests.helpers import communicate_within

pytestmark = pytest.mark.lab

CHECK_TIMEOUT_S = 40.0
SERVER6 = f"[{labmod.BROKER_IPS6[0]}]:{labmod.BROKER_PORT}"
EI, APD = "endpoint-independent", "address-and-port-dependent"
# rfc6092: no translation, a stateful firewall: only the flow the host opened passes.
_FIREWALL6 = dict(behind_nat=False, mapping="none", port_preservation=True,
                  port_allocation="preserving", filtering=APD, unsolicited_syn="drop",
                  reply_syn="pass", syn_sent_lifetime_s=None, hairpin=True, hops=1)
EXPECTED6: dict[str, dict[str, Any]] = {
    "rfc6092": _FIREWALL6,
    "reject6-rst": {**_FIREWALL6, "unsolicited_syn": "rst"},
    "reject6-admin": {**_FIREWALL6, "unsolicited_syn": "icmp-admin-prohibited"},
    # NETMAP rewrites the /64 prefix both ways, the interface identifier and port stay;
    # a SYN to the host's own translated address is not mapped back (no hairpin).
    "nptv6": {**_FIREWALL6, "behind_nat": True, "mapping": EI, "hairpin": False},
    # no firewall at all: every SYN reaches the host
    "open6": {**_FIREWALL6, "filtering": EI, "unsolicited_syn": "pass", "hops": None},
}
PUBLIC_PREFIX = {"nptv6": "2001:db8:1a::2"}  # side a
VERDICT6 = {"nptv6": "Punch-friendly NAT (", "rfc6092": "No NAT, a stateful firewall (",
            "reject6-rst": "No NAT, a firewall that rejects unsolicited SYNs (",
            "reject6-admin": "No NAT, a firewall that rejects unsolicited SYNs (",
            "open6": "No NAT, no firewall ("}
PAIRS = [("nptv6", "rfc6092"), ("reject6-rst", "reject6-admin"), ("open6", "rfc6092")]


def _run_pair(pair: tuple[str, str], v4: tuple[str, str] = ("home", "home"),
              extra: tuple[str, ...] = (), sides: str = "ab", lab_no: int = 0
              ) -> dict[str, dict[str, Any]]:
    lab = labmod.Lab(*v4, v6=pair, lab_id=f"n6{os.getpid() % 100000}{lab_no}")
    out: dict[str, dict[str, Any]] = {}
    try:
        lab.up()
        labmod.start_broker(lab, extra=["--probe", "-q"])
        for side, profile in zip("ab", pair, strict=True):
            if side not in sides:
                continue
            proc = lab.popen("h" + side, [*labmod.SYNPROBE, "nat-check", "-6", "--server",
                                          SERVER6, "--json", *extra], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            stdout, stderr = communicate_within(proc, CHECK_TIMEOUT_S)
            out[side] = {"profile": profile, "rc": proc.returncode,
                         "stderr": stderr.decode(errors="replace"),
                         "json": schemas.loads("nat-check", stdout) if stdout.strip()
                         else None}
    finally:
        leaks = take_down_and_check(lab)
    assert leaks == [], leaks
    return out


@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_natcheck_v6_profile_keys(pair: tuple[str, str]) -> None:
    require_lab()
    results = _run_pair(pair, lab_no=PAIRS.index(pair))
    problems = []
    for side, got in results.items():
        profile, report = got["profile"], got["json"]
        assert got["rc"] == 0 and report is not None, (profile, got["stderr"][-2000:])
        for key, want in EXPECTED6[profile].items():
            if report[key] != want:
                problems.append(f"{profile} (side {side}) {key}: {report[key]!r} != {want!r}")
        if not report["verdict"].startswith(VERDICT6[profile]):
            problems.append(f"{profile} verdict {report['verdict']!r}")
        host = "2001:db8:a::2" if side == "a" else "2001:db8:b::2"
        public_ip = PUBLIC_PREFIX.get(profile, host) if side == "a" else host
        if not all(p.startswith(f"[{public_ip}]:") for p in report["public"]):
            problems.append(f"{profile} public {report['public']} not at {public_ip}")
    assert problems == []


def test_natcheck_v6_timers_measure_the_firewalls_syn_sent_timeout() -> None:
    """--timers over IPv6: side A's gateway keeps a SYN_SENT conntrack entry 5 s (the
    v4 profile syn-sent-5s sets nf_conntrack_tcp_timeout_syn_sent in the gateway's
    namespace, for both families); its RFC 6092 firewall then drops the late reply SYN.
    The waits 1, 2, 4, 6, 8 s find the hole open after 4 s and closed after 6 s."""
    require_lab()
    got = _run_pair(("rfc6092", "nptv6"), v4=("syn-sent-5s", "home"),
                    extra=("--timers", "--max-wait", "8"), sides="a", lab_no=7)["a"]
    report = got["json"]
    assert got["rc"] == 0 and report is not None, got["stderr"][-2000:]
    assert report["syn_sent_lifetime_s"] == 4.0, report["syn_sent_lifetime_s"]
    assert "open after 4 s, closed after 6 s" in report["reasons"]["syn_sent_lifetime_s"]
    assert report["recommendation"]["timeout_s"]["value"] == 4.0, report["recommendation"]
    for key, want in EXPECTED6["rfc6092"].items():  # the rest as without --timers
        if key != "syn_sent_lifetime_s":
            assert report[key] == want, (key, report[key])


P, F, N = "pass", "fail", "not measured"
# nptv6 (side a) by its rules: NETMAP keeps the mapping endpoint-independent and the
# ports, the RFC 6092 firewall filters address-and-port-dependent and drops unsolicited
# SYNs, a SYN to the host's own mapped address is not mapped back (no hairpin), ICMPv6
# errors are RELATED and translated back, and conntrack keeps the entry after one.
RFC5382_NPTV6 = {"REQ-1": P, "REQ-2": P, "REQ-3": F, "REQ-4": P, "REQ-5 transitory": N,
                 "REQ-5 established": N, "REQ-6": N, "REQ-7": P, "REQ-8": F, "REQ-8a": N,
                 "REQ-9": P, "REQ-10": P}


def test_natcheck_v6_rfc5382_on_nptv6() -> None:
    """--rfc5382 over IPv6, requirement by requirement (REQ-10's ICMP error is ICMPv6
    type 1 code 4: it was crafted as IPv4 and never sent, so REQ-10 read "fail")."""
    require_lab()
    got = _run_pair(("nptv6", "rfc6092"), extra=("--rfc5382",), sides="a", lab_no=8)["a"]
    report = got["json"]
    assert got["rc"] == 0 and report is not None, got["stderr"][-2000:]
    statuses = {r["req"]: r["status"] for r in report["rfc5382"]["requirements"]}
    assert statuses == RFC5382_NPTV6, report["rfc5382"]
    req10 = next(r for r in report["rfc5382"]["requirements"] if r["req"] == "REQ-10")
    assert any("ICMPv6 1/4" in e for e in req10["evidence"]), req10
    assert report["verdict"].endswith("RFC 5382: fails REQ-3, REQ-8 (4 of 12 requirements "
                                      "not measured)."), report["verdict"]
