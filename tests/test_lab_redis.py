"""Brokers sharing sessions through Redis, in the lab: a redis-server and two brokers in
the broker's namespace, peer A registered at one broker and peer B at the other; they
are paired and punch (the adaptive strategies' PRIMED -> GO crosses the brokers), and a
relayed pair meets at the one relay both PEER lines name."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from synprobe import lab as labmod
from synprobe.lab.profiles import BROKER_IPS, BROKER_PORT
from tests.helpers import stop_process
from tests.test_lab_relay import _diag as relay_diag
from tests.test_lab_strategies import MSGS, TIMEOUT_S, _diag, assert_chatted

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="redis-server is not installed (scripts/setup.sh)")]
REDIS_PORT = 6390  # inside the broker's namespace, on its loopback
SECOND_PORT = BROKER_PORT + 10


@pytest.fixture
def two_brokers(make_lab, request, tmp_path: Path) -> Iterator[tuple[labmod.Lab, Path]]:
    """A lab with redis-server and two brokers (on BROKER_PORT and SECOND_PORT) in "br";
    all three stopped (and reaped) before the lab goes. Yields the lab and the first
    broker's log."""
    profile_a, profile_b, extra = request.param
    lab = make_lab(profile_a, profile_b)
    procs = [lab.popen("br", ["redis-server", "--port", str(REDIS_PORT), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)]
    try:
        labmod.wait_for_listen(lab, "br", "127.0.0.1", REDIS_PORT, 10, procs[0])
        url = f"redis://127.0.0.1:{REDIS_PORT}/0"
        for port in (BROKER_PORT, SECOND_PORT):
            with (tmp_path / f"broker-{port}.log").open("wb") as log:
                procs.append(labmod.start_broker(lab, ["--redis", url, *extra], port=port,
                                                 stderr=log))
        yield lab, tmp_path / f"broker-{BROKER_PORT}.log"
    finally:
        for proc in reversed(procs):
            stop_process(proc)
    assert all(p.returncode is not None for p in procs)


AT_B = {"b": ["--broker", f"{BROKER_IPS[0]}:{SECOND_PORT}"]}
FORCED = [("prime", "home", "home"), ("order", "reject-icmp-port", "home"),
          ("sync", "home", "firewall")]


@pytest.mark.parametrize("two_brokers, strategy",
                         [((a, b, ["--syn-probe"]), s) for s, a, b in FORCED],
                         ids=[f"{s}-{a}-{b}" for s, a, b in FORCED], indirect=["two_brokers"])
def test_peers_at_two_brokers_punch(two_brokers: tuple[labmod.Lab, Path],
                                    strategy: str) -> None:
    lab, first_log = two_brokers
    run_a, run_b = labmod.punch_pair(lab, "shared", messages=MSGS, timeout_s=TIMEOUT_S,
                                     stagger_s=0.2, args=["--strategy", strategy, "-v"],
                                     side_args=AT_B)
    diag = _diag(lab, run_a, run_b, f"--strategy {strategy} at two brokers")
    for run in (run_a, run_b):
        assert run.report is not None and run.report["strategy"] == strategy, diag
    # A waited at the first broker; the second decided the pair and told it through Redis.
    assert "paired by broker" in first_log.read_text(), diag
    assert_chatted(lab, run_a, run_b, f"--strategy {strategy} at two brokers")


@pytest.mark.parametrize("two_brokers", [("random", "random", ["--relay", "--syn-probe"])],
                         indirect=True)
def test_a_relayed_pair_meets_at_one_broker(two_brokers: tuple[labmod.Lab, Path]) -> None:
    lab, _ = two_brokers
    run_a, run_b = labmod.punch_pair(lab, "relayed", messages=MSGS, args=["-v"],
                                     timeout_s=TIMEOUT_S, side_args=AT_B)
    diag = relay_diag(lab, run_a, run_b)
    for run, theirs in ((run_a, MSGS[1]), (run_b, MSGS[0])):
        assert run.returncode == 0 and run.report is not None, diag
        assert run.report["path"] == "relay" and run.chat_lines == [theirs.strip()], diag
        # B registered last: its broker decided the pair and relays it, for both.
        assert f"broker's relay {BROKER_IPS[0]}:{SECOND_PORT}" in run.stderr, diag
