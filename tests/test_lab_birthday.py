"""Birthday punching through the lab: what remains after a punch, won or lost.

A won punch keeps exactly one connection on each host (every losing socket closed at
once), and a lost one leaves nothing behind on the hosts; neither leaves a conntrack
entry that stops the next punch between the same hosts, from the same local port, from
connecting. (Every pair with one random NAT is in tests/test_lab_punch.py and
tests/test_lab_strategies.py; the success rate over many runs is bench/bench_birthday.py's.)
"""

from __future__ import annotations

import os
import select
import subprocess
import time

import pytest

from simulsyn_core._internal import birthday as bday
from synprobe import lab as labmod
from tests import schemas
from tests.helpers import communicate_within

pytestmark = pytest.mark.lab

READ_TIMEOUT_S = 20.0


def _start(lab: labmod.Lab, node: str, extra: list[str]) -> subprocess.Popen[bytes]:
    broker = f"{labmod.BROKER_IPS[0]}:{labmod.BROKER_PORT}"
    return lab.popen(node, [*labmod.SYNPROBE, "punch", "--broker", broker, "--session", "bd",
                            "--json", "-v", "--timeout", "15", *extra],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _first_line(proc: subprocess.Popen[bytes]) -> dict:
    """The JSON report (the first stdout line), read with a bound."""
    assert proc.stdout is not None
    line = b""
    end = time.monotonic() + READ_TIMEOUT_S
    while not line.endswith(b"\n") and time.monotonic() < end:
        if select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))[0]:
            chunk = proc.stdout.read1(4096)  # type: ignore[attr-defined]
            if not chunk:
                break
            line += chunk
    assert line.endswith(b"\n"), f"no report within {READ_TIMEOUT_S} s: {line!r}"
    return schemas.loads("punch", line.split(b"\n")[0])


def _tcp_sockets(lab: labmod.Lab, node: str) -> list[tuple[str, str, str]]:
    """(state, local, peer) of every TCP socket in the host, the broker's aside."""
    out = lab.run(node, ["ss", "-tanH"], check=True).stdout
    rows = []
    for line in out.splitlines():
        state, _rq, _sq, local, peer = line.split()[:5]
        if not peer.startswith("192.0.2."):
            rows.append((state, local, peer))
    return rows


def _finish(procs: list[subprocess.Popen[bytes]], messages: list[bytes]
            ) -> list[tuple[int, str, str]]:
    """Give each its stdin (then end of input) first, then wait for both: each chat
    waits for its peer to finish too."""
    for proc, message in zip(procs, messages, strict=True):
        assert proc.stdin is not None
        proc.stdin.write(message)
        proc.stdin.close()
        proc.stdin = None
    outs = []
    for proc in procs:
        out, err = communicate_within(proc, READ_TIMEOUT_S)
        outs.append((proc.returncode, out.decode(), err.decode()))
    return outs


def _punch_pair(lab: labmod.Lab, extra: dict[str, list[str]]) -> tuple[dict, dict,
                                                                        subprocess.Popen[bytes],
                                                                        subprocess.Popen[bytes]]:
    pa = _start(lab, "ha", extra.get("a", []))
    time.sleep(0.2)
    pb = _start(lab, "hb", extra.get("b", []))
    return _first_line(pa), _first_line(pb), pa, pb


@pytest.mark.parametrize("profile_a, profile_b", [("random", "home"), ("original", "random")],
                         ids=["sockets-first", "guesses-first"])
def test_a_won_punch_keeps_one_connection_and_the_next_punch_connects(
        make_lab, profile_a: str, profile_b: str) -> None:
    lab = make_lab(profile_a, profile_b)
    labmod.start_broker(lab, ["--syn-probe"])
    for attempt in (1, 2):  # the second: same local port on the easy side, right after
        ports = {"a" if profile_a != "random" else "b": ["--local-port", "41234"]}
        ra, rb, pa, pb = _punch_pair(lab, ports)
        diag = f"A: {ra}\nB: {rb}\nconntrack A:\n{lab.conntrack('a')}\nB:\n{lab.conntrack('b')}"
        assert ra["established"] and rb["established"], diag
        assert ra["strategy"] == rb["strategy"] == "birthday", diag
        expected_order = "guesses-first" if "original" in (profile_a, profile_b) \
            else "sockets-first"
        for r in (ra, rb):
            b = r["birthday"]
            assert b["order"] == expected_order and b["winner"] is not None, diag
            assert b["p_expected"] > 0.95 and b["sockets_used"] >= 1, diag
            assert b["syns_sent"] >= b["sockets_used"], diag
        # While they chat: on each host, one TCP socket towards the peer, established; no
        # losing socket left in any state (a TIME-WAIT is the first round's chat, ended).
        for node, report in (("ha", ra), ("hb", rb)):
            rows = [r for r in _tcp_sockets(lab, node) if r[0] != "TIME-WAIT"]
            assert len(rows) == 1 and rows[0][0] == "ESTAB", f"{node}: {rows}\n{diag}"
            assert rows[0][1] == report["local"], f"{node}: {rows}\n{diag}"
        outs = _finish([pa, pb], [b"from A\n", b"from B\n"])
        assert [o[0] for o in outs] == [0, 0], f"{outs}\n{diag}"
        assert outs[0][1].splitlines()[-1:] == ["from B"], outs  # the report was read
        assert outs[1][1].splitlines()[-1:] == ["from A"], outs
        for node in ("ha", "hb"):  # ended cleanly: at most TIME-WAIT of the chat
            assert all(s == "TIME-WAIT" for s, _, _ in _tcp_sockets(lab, node)), attempt


def test_a_lost_punch_leaves_nothing_that_blocks_the_next(make_lab) -> None:
    """One socket and one guess: p ~ 1/32768, lost (exit 5, said so, within a few
    seconds). No socket is left on either host, and the next punch, from the same local
    port on the easy side, connects."""
    lab = make_lab("random", "reject-rst")
    labmod.start_broker(lab, ["--syn-probe"])
    tiny = ["--birthday-sockets", "1", "--birthday-guesses", "1"]
    started = time.monotonic()
    ra, rb, pa, pb = _punch_pair(lab, {"a": tiny, "b": [*tiny, "--local-port", "41235"]})
    outs = _finish([pa, pb], [b"", b""])
    took = time.monotonic() - started
    diag = f"{ra}\n{rb}\n{outs}"
    assert [o[0] for o in outs] == [5, 5], diag
    for r in (ra, rb):
        assert not r["established"] and "birthday: no guess matched" in r["error"], diag
        assert r["birthday"]["sockets_used"] == 1 and r["birthday"]["winner"] is None, diag
    assert took < 12, diag
    for node in ("ha", "hb"):
        assert _tcp_sockets(lab, node) == [], node
    before = {s: lab.conntrack(s) for s in "ab"}
    ra, rb, pa, pb = _punch_pair(lab, {"b": ["--local-port", "41235"]})
    outs = _finish([pa, pb], [b"again A\n", b"again B\n"])
    assert ra["established"] and rb["established"], f"{ra}\n{rb}\n{outs}\n{before}"
    assert [o[0] for o in outs] == [0, 0], outs


def test_nat_check_gives_the_guessing_side_the_range_and_hot_band(make_lab, tmp_path) -> None:
    """The random side's nat-check (its own state directory) samples its NAT's ports; the
    punch tells the broker the range and the hot band, and both sides' plan carries them
    (the expected chance is then Linux's model, not the uniform formula)."""
    lab = make_lab("random", "home")
    labmod.start_broker(lab, ["--probe", "-q", "--syn-probe"])
    server = f"{labmod.BROKER_IPS[0]}:{labmod.BROKER_PORT}"
    env = {"SYNPROBE_STATE_DIR": str(tmp_path / "a")}
    check = lab.run("ha", [*labmod.SYNPROBE, "nat-check", "--server", server, "--json",
                           "--port-samples", "4000"], timeout=90, env={**os.environ, **env})
    found = schemas.loads("nat-check", check.stdout)["port_range"]
    assert found["range"] == [1024, 65535] and found["hot_band"] == [1024, 2047], found
    run_a, run_b = labmod.punch_pair(lab, "informed", messages=("A\n", "B\n"),
                                     timeout_s=15, stagger_s=0.2, side_env={"a": env})
    diag = f"{run_a.stderr}\n{run_b.stderr}"
    assert run_a.returncode == run_b.returncode == 0, diag
    for run in (run_a, run_b):
        plan = (run.report or {})["birthday"]
        assert plan["range"] == [1024, 65535] and plan["hot_band"] == [1024, 2047], diag
        # The Linux model (the hot band guessed first), not the uniform formula; it is the
        # larger chance.
        model = bday.p_weighted(plan["sockets"], plan["guesses"], (1024, 65535))
        assert plan["p_expected"] == pytest.approx(model, abs=1e-4), diag
        assert plan["p_expected"] > plan["p_uniform"], diag
