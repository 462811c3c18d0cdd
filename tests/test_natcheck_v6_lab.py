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


def _run_pair(pair: tuple[str, str]) -> dict[str, dict[str, Any]]:
    lab = labmod.Lab("home", "home", v6=pair,
                     lab_id=f"n6{os.getpid() % 100000}{PAIRS.index(pair)}")
    out: dict[str, dict[str, Any]] = {}
    try:
        lab.up()
        labmod.start_broker(lab, extra=["--probe", "-q"])
        for side, profile in zip("ab", pair, strict=True):
            proc = lab.popen("h" + side, [*labmod.SYNPROBE, "nat-check", "-6", "--server",
                                          SERVER6, "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            try:
                stdout, stderr = proc.communicate(timeout=CHECK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate(timeout=5)
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
    results = _run_pair(pair)
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
