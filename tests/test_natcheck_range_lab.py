"""nat-check's port_range in the NAT lab: behind `random` (MASQUERADE --random-fully) it
samples the public ports and finds Linux's range and hot band; behind `home`
(endpoint-independent mapping) it samples nothing.

One lab (A behind `random`, B behind `home`), one broker, one check each, one after the
other. About 13 s in all on the 2-core machine: the lab and the broker ~3 s, the check
behind `random` ~8.5 s (4000 samples paced at 500/s), the one behind `home` ~0.5 s.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from synprobe import lab as labmod
from synprobe import state
from synprobe.natcheck import port_range
from tests import schemas
from tests.helpers import communicate_within
from tests.natcheck_expected import SERVER

pytestmark = [pytest.mark.lab]

# The u16 model puts 1/32 of the ports in 1024-2047, uniform 1/63: with 4000 samples the
# band's count is 3 sigma over uniform in all but about 3 runs in 10000 (2168 are needed
# for 39 in 40).
SAMPLES = 4000
CHECK_TIMEOUT_S = 60.0  # port_samples.time_limit(4000) is 21 s; the rest of a check ~1 s


def _check(lab: labmod.Lab, side: str, extra: list[str]) -> dict[str, Any]:
    proc = lab.popen("h" + side, [*labmod.SYNPROBE, "nat-check", "--server", SERVER, "--json",
                                  *extra],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    out, err = communicate_within(proc, CHECK_TIMEOUT_S)
    assert proc.returncode == 0, err.decode(errors="replace")
    report: dict[str, Any] = schemas.loads("nat-check", out)
    return report


def test_port_range_behind_random_and_none_behind_home(
        make_lab: Callable[..., labmod.Lab]) -> None:
    lab = make_lab("random", "home")
    labmod.start_broker(lab, extra=["--probe", "-q"])

    report = _check(lab, "a", ["--port-samples", str(SAMPLES)])
    got = report["port_range"]
    assert got is not None, report["reasons"].get("port_range")
    print("port_range behind random:", json.dumps(got), f"check {report['duration_s']} s")
    sampled = report["probes"]["port_samples"]
    assert sampled["asked"] == SAMPLES and sampled["failed"] == 0, got["reason"]
    assert got["samples"] == SAMPLES
    lo, hi = got["range"]
    assert 1024 <= got["min"] and got["max"] <= 65535
    assert 1024 <= lo <= got["min"] and got["max"] <= hi <= 65535
    assert hi - lo >= port_range.SNAP_FRACTION * (65535 - 1024), got["reason"]
    assert got["hot_band"] == [1024, 2047] and got["uniform"] is False, got["reason"]
    assert report["reasons"]["port_range"] == got["reason"]
    assert "most often 1024-2047" in report["recommendation"]["retries"]["reason"]
    facts = state.last_natcheck_facts()  # the check saved its result where this test reads
    assert facts is not None
    assert (facts.port_range, facts.port_hot) == ((lo, hi), (1024, 2047))

    report = _check(lab, "b", [])
    assert report["mapping"] == "endpoint-independent"
    assert report["port_range"] is None
    assert report["reasons"]["port_range"].startswith(
        "not sampled: the mapping is endpoint-independent")
    assert "port_samples" not in report["probes"]
    facts = state.last_natcheck_facts()
    assert facts is not None and (facts.port_range, facts.port_hot) == (None, None)
