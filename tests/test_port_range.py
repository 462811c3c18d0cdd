"""nat-check's port_range: the pure classification on synthetic samples (uniform, the Linux
u16 model, a --to-ports range, too few), the chi-square tail against closed forms, the
decision and the JSON/table/advice built from it, what the punch reads back (state), and
the sampler against a broker on loopback (no lab, no privileges)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import time
from dataclasses import fields, replace
from pathlib import Path

import pytest

from simulsyn_core._internal.broker import Broker
from simulsyn_core._internal.client import NatFacts
from simulsyn_core._internal.endpoint import Endpoint
from synprobe import state
from synprobe.natcheck import port_range as pr
from synprobe.natcheck import port_samples
from synprobe.natcheck.evidence import Evidence, decide, probes_of
from synprobe.natcheck.port_samples import Sampled
from synprobe.natcheck.recommend import recommend, verdict
from synprobe.natcheck.render import table
from synprobe.natcheck.report import NatCheckReport
from synprobe.natcheck.server import ProbeServer
from synprobe.packets.seen import seen_from_pcap

CAPTURES = Path(__file__).resolve().parent.parent / "captures" / "natcheck"


def linux_u16(rng: random.Random, lo: int, hi: int, n: int) -> list[int]:
    """What nf_nat_l4proto_unique_tuple does with --random-fully: lo + u16 % size."""
    size = hi - lo + 1
    return [lo + rng.getrandbits(16) % size for _ in range(n)]


def uniform(rng: random.Random, lo: int, hi: int, n: int) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


# --- the chi-square tail ----------------------------------------------------------------------

def _q_even(x: float, df: int) -> float:
    """Closed form of the chi-square tail for an even df: e^-h sum_{i<df/2} h^i / i!."""
    h = x / 2
    return math.exp(-h) * sum(h ** i / math.factorial(i) for i in range(df // 2))


@pytest.mark.parametrize(("x", "df"), [(0.5, 2), (10.0, 4), (18.3, 10), (67.5, 50),
                                       (100.0, 50), (40.0, 64), (300.0, 64)])
def test_chi2_sf_meets_the_closed_form(x: float, df: int) -> None:
    assert pr.chi2_sf(x, df) == pytest.approx(_q_even(x, df), rel=1e-9, abs=1e-300)


def test_chi2_sf_at_known_critical_values() -> None:
    assert pr.chi2_sf(3.841459, 1) == pytest.approx(0.05, abs=1e-6)  # odd df: no closed form
    assert pr.chi2_sf(6.634897, 1) == pytest.approx(0.01, abs=1e-6)
    assert pr.chi2_sf(11.0705, 5) == pytest.approx(0.05, abs=1e-5)
    assert pr.chi2_sf(0.0, 3) == 1.0
    with pytest.raises(ValueError):
        pr.chi2_sf(1.0, 0)


def test_chi2_uniform_bins_follow_their_widths() -> None:
    # every port of 1..10 once: exactly uniform, whatever the bins' widths
    stat, df = pr.chi2_uniform(list(range(1, 11)) * 30, 1, 10)
    assert stat == pytest.approx(0.0) and df >= 1
    stat, _ = pr.chi2_uniform([1] * 300, 1, 10)  # everything in the first bin
    assert stat > 1000


# --- the Linux model ------------------------------------------------------------------------

def test_linux_band_of_the_default_range_is_1024_2047_twice_as_likely() -> None:
    band = pr.linux_band(1024, 65535)
    assert band is not None
    (lo, hi), p_uniform, p_model = band
    assert (lo, hi) == (1024, 2047)
    assert p_uniform == pytest.approx(1024 / 64512)
    assert p_model == pytest.approx(2048 / 65536)  # each port 2/65536 against 1/65536


def test_linux_band_of_a_to_ports_range_and_of_one_without() -> None:
    band = pr.linux_band(20000, 29999)  # 65536 = 6 * 10000 + 5536
    assert band is not None and band[0] == (20000, 25535)
    assert band[2] == pytest.approx(5536 * 7 / 65536)
    assert pr.linux_band(32768, 65535) is None  # 32768 ports divide 65536: no band


def test_the_lab_measurement_shows_the_hot_band() -> None:
    # measured behind the lab's `random` profile: 622 of 20000 in 1024-2047
    rng = random.Random(7)
    ports = uniform(rng, 1024, 2047, 622) + uniform(rng, 2048, 65535, 20000 - 622)
    got = pr.classify(ports)
    assert got.range == (1024, 65535)
    assert (got.uniform, got.hot_band) == (False, (1024, 2047))
    assert "holds 622" in got.reason


# --- classify on synthetic samples ------------------------------------------------------------

def test_uniform_over_the_default_range() -> None:
    got = pr.classify(uniform(random.Random(1), 1024, 65535, 4000))
    assert got.samples == 4000 and got.range == (1024, 65535)
    assert got.uniform is True and got.hot_band is None
    assert got.chi2 is not None and got.p_value is not None and got.p_value > pr.ALPHA_CHI2
    assert "no hot band, uniform is" in got.reason


def test_the_linux_u16_model_over_the_default_range() -> None:
    got = pr.classify(linux_u16(random.Random(1), 1024, 65535, 4000))
    assert got.range == (1024, 65535)
    assert got.uniform is False and got.hot_band == (1024, 2047)
    assert "a hot band" in got.reason


@pytest.mark.parametrize("seed", range(5))
def test_a_to_ports_range_uniform(seed: int) -> None:
    # --to-ports 20000-29999, uniform: the range comes out within a few gaps of it
    ports = uniform(random.Random(seed), 20000, 29999, 1000)
    got = pr.classify(ports)
    assert got.range is not None
    lo, hi = got.range
    assert 19960 <= lo <= min(ports) and max(ports) <= hi <= 30040
    assert (got.min, got.max) == (min(ports), max(ports))
    assert got.hot_band is None and got.uniform is not False
    assert "widened by the expected gap" in got.reason
    # 7 against 6 draws per port: 10000 samples tell uniform from Linux's model
    got = pr.classify(uniform(random.Random(seed), 20000, 29999, 10000))
    assert got.uniform is True and got.hot_band is None


def test_samples_that_cannot_tell_say_how_many_would() -> None:
    # 1000 samples from uniform over 1024-65535 leave it open one time in five or so
    got = pr.classify(uniform(random.Random(6), 1024, 65535, 1000))
    assert got.uniform is None and got.hot_band is None and got.chi2 is not None
    assert "neither shown nor ruled out" in got.reason
    assert "about 2168 samples are needed" in got.reason
    assert pr.samples_needed(1024 / 64512, 2048 / 65536) == 2168


def test_a_to_ports_range_with_the_u16_model_shows_its_band() -> None:
    # 7 against 6 draws per port: enough samples show 20000-25535
    got = pr.classify(linux_u16(random.Random(3), 20000, 29999, 30000))
    assert got.uniform is False and got.hot_band is not None
    assert abs(got.hot_band[0] - 20000) <= 5 and abs(got.hot_band[1] - 25535) <= 100


def test_not_uniform_but_not_the_linux_band() -> None:
    rng = random.Random(2)
    ports = uniform(rng, 1024, 65535, 900) + uniform(rng, 40000, 41000, 300)
    got = pr.classify(ports)
    assert got.uniform is False and got.hot_band is None
    assert "not Linux's hot band" in got.reason


def test_too_few_samples_say_how_many_are_needed() -> None:
    got = pr.classify(uniform(random.Random(4), 1024, 65535, 50))
    assert got.samples == 50 and got.range is not None
    assert (got.uniform, got.chi2, got.p_value, got.hot_band) == (None, None, None, None)
    assert f"at least {pr.MIN_SAMPLES} are needed" in got.reason


def test_a_band_too_narrow_for_the_samples_is_not_tested() -> None:
    got = pr.classify(uniform(random.Random(5), 1024, 65535, 200))
    assert got.uniform is True and got.hot_band is None
    assert "too narrow to test with 200 samples (needs 315)" in got.reason


@pytest.mark.parametrize("ports", [[], [4000], [4000, 4000, 4000]])
def test_no_range_from_nothing_or_one_port(ports: list[int]) -> None:
    got = pr.classify(ports)
    assert got.samples == len(ports) and got.range is None and got.uniform is None
    assert got.reason
    assert json.dumps(got.to_json())


@pytest.mark.parametrize("bad", [0, 65536, -1])
def test_a_bad_port_is_a_value_error(bad: int) -> None:
    with pytest.raises(ValueError, match="not a port"):
        pr.classify([1024, bad])


def test_likely_range_is_clamped() -> None:
    assert pr.likely_range(1, 100, 2)[0] == (1, 199)
    assert pr.likely_range(65000, 65535, 3)[0] == (64732, 65535)  # gap 267.5


def test_to_json_holds_every_key() -> None:
    got = pr.classify(linux_u16(random.Random(1), 1024, 65535, 4000)).to_json()
    assert set(got) == {"samples", "min", "max", "range", "uniform", "chi2", "p_value",
                        "hot_band", "reason"}
    assert got["range"] == [1024, 65535] and got["hot_band"] == [1024, 2047]


@pytest.mark.parametrize(("behind", "mapping", "asked", "skips"), [
    (True, "address-and-port-dependent", 1000, False),
    (True, "address-dependent", 1000, False),
    (True, "address-and-port-dependent", 0, True),
    (True, "endpoint-independent", 1000, True),
    (True, None, 1000, True),
    (False, "none", 1000, True),
])
def test_skip_reason(behind: bool, mapping: str | None, asked: int, skips: bool) -> None:
    assert (pr.skip_reason(behind, mapping, asked) is not None) == skips


# --- the decision, the JSON, the table, the advice ------------------------------------------

def _evidence(profile: str) -> Evidence:
    record = json.loads((CAPTURES / f"{profile}-evidence.json").read_text())
    data = (CAPTURES / f"{profile}-client.pcap").read_bytes()
    return Evidence.from_json(record["evidence"],
                              seen_from_pcap(data, [record["evidence"]["host_ip"]]))


def _report(ev: Evidence) -> NatCheckReport:
    f = decide(ev).findings
    return NatCheckReport("192.0.2.10:8086", f, recommend(f), verdict(f), 0.0,
                          probes=probes_of(ev))


def test_the_random_profile_with_samples_reports_port_range() -> None:
    ports = linux_u16(random.Random(9), 1024, 65535, 4000)
    ev = replace(_evidence("random"), port_samples_asked=4000,
                 port_samples=Sampled(4000, tuple(ports), 0, 8.1))
    report = _report(ev)
    data = json.loads(json.dumps(report.to_json()))
    got = data["port_range"]
    assert got["range"] == [1024, 65535] and got["hot_band"] == [1024, 2047]
    assert got["uniform"] is False and got["samples"] == 4000
    assert got["reason"].startswith("4000 of 4000 fresh connections answered OBSERVE")
    assert data["reasons"]["port_range"] == got["reason"]
    assert data["probes"]["port_samples"] == {"asked": 4000, "answered": 4000, "failed": 0,
                                              "duration_s": 8.1}
    assert "most often 1024-2047" in data["recommendation"]["retries"]["reason"]
    assert data["verdict"].startswith("Hard NAT") and "1024-65535" in data["verdict"]
    assert "1024-65535, hot 1024-2047" in table(report)  # the row (its value wraps)
    # the evidence keeps the samples: the decision can be made again from its JSON
    again = Evidence.from_json(json.loads(json.dumps(ev.to_json())), ev.raw.seen if ev.raw
                               else ())
    assert again == ev


def test_the_random_profile_not_sampled_says_why() -> None:
    ev = _evidence("random")  # recorded before sampling: nothing asked
    data = _report(ev).to_json()
    assert data["port_range"] is None
    assert data["reasons"]["port_range"] == "not sampled: --port-samples 0"
    assert "port_samples" not in ev.to_json()  # the recordings stay as they were


def test_an_endpoint_independent_mapping_is_not_sampled() -> None:
    ev = replace(_evidence("home"), port_samples_asked=1000)
    data = _report(ev).to_json()
    assert data["port_range"] is None
    assert data["reasons"]["port_range"].startswith(
        "not sampled: the mapping is endpoint-independent")


# --- what the punch reads back ----------------------------------------------------------------

RESULT = {"public": ["198.51.100.2:40001"], "unsolicited_syn": "drop", "reply_syn": "pass",
          "recommendation": {"ttl": {"value": None, "reason": ""}}, "error": None}


@pytest.mark.parametrize(("saved", "expected"), [
    ({"range": [1024, 65535], "uniform": False, "hot_band": [1024, 2047]},
     ((1024, 65535), (1024, 2047))),
    ({"range": [1024, 65535], "uniform": True, "hot_band": None}, ((1024, 65535), None)),
    ({"range": [1024, 65535], "uniform": None, "hot_band": [1024, 2047]},
     ((1024, 65535), None)),
    ({"range": [20000, 29999], "uniform": False, "hot_band": [1024, 2047]},
     ((20000, 29999), None)),  # a band outside the range is not believed
    (None, (None, None)),
    ({"range": [2000, 1000], "uniform": False, "hot_band": [1024, 2047]}, (None, None)),
    ({"range": "1024-65535"}, (None, None)),
    ({"range": [True, 65535]}, (None, None)),
    ([1, 2], (None, None)),
])
def test_last_natcheck_facts_carry_the_port_range(saved: object, expected: tuple) -> None:
    state.save_last_natcheck({**RESULT, "port_range": saved}, ["synprobe", "nat-check"])
    facts = state.last_natcheck_facts()
    assert facts is not None
    assert (facts.port_range, facts.port_hot) == expected


def test_nat_facts_end_with_the_port_fields() -> None:
    # the names, types and defaults the punch side adds to NatFacts too (a trivial merge)
    last = [(f.name, f.type, f.default) for f in fields(NatFacts)][-3:]
    assert last == [("age_s", "float", 0.0),
                    ("port_range", "tuple[int, int] | None", None),
                    ("port_hot", "tuple[int, int] | None", None)]


# --- the sampler against a broker on loopback ------------------------------------------------

def _sample_on_loopback(count: int, **kwargs: object) -> Sampled:
    async def scenario() -> Sampled:
        server = ProbeServer(["127.0.0.1"], raw_reason="off", log=lambda _line: None)
        broker = Broker([Endpoint("127.0.0.1", 0)], log=lambda _line: None,
                        services=server.services())
        await broker.start()
        try:
            return await asyncio.to_thread(lambda: port_samples.run(
                broker.listening[0], count, **kwargs))  # type: ignore[arg-type]
        finally:
            await broker.close()

    return asyncio.run(scenario())


def test_sampler_reads_one_public_port_per_fresh_connection() -> None:
    shown: list[tuple[float, float]] = []
    got = _sample_on_loopback(200, progress=lambda d, t: shown.append((d, t)))
    # no NAT on loopback: each public port is the kernel's fresh local port
    assert got.asked == 200 and len(got.ports) == 200 and len(set(got.ports)) == 200
    assert got.failed == 0 and got.stopped == ""
    assert got.duration_s >= 199 / port_samples.RATE_PER_S - 0.01  # paced
    assert shown[-1] == (200, 200)


def test_sampler_stops_after_failures_to_connect() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # bound, never listening: connect() is refused
        closed = Endpoint("127.0.0.1", holder.getsockname()[1])
        start = time.monotonic()
        got = port_samples.run(closed, 1000)
    assert got.ports == () and got.failed == port_samples.max_failures(1000)
    assert "connections failed" in got.stopped and "ECONNREFUSED" in got.first_error
    assert time.monotonic() - start < 5.0


def test_sampler_is_bounded_by_time_when_nothing_answers() -> None:
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(128)  # the kernel accepts; nobody ever answers OBSERVE
        start = time.monotonic()
        got = port_samples.run(Endpoint(*mute.getsockname()), 50, max_open=8, limit_s=1.0)
        elapsed = time.monotonic() - start
    assert got.ports == () and "time limit" in got.stopped
    assert elapsed < 3.0  # limit_s 1.0, on a loaded machine
