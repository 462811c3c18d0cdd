"""punch --pcap in the NAT lab: both peers capture their run; analyze explains each file,
tshark reads it, and the capture began before the run's first packet."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from synprobe import lab as labmod
from synprobe.analyze.command import analyze_file

from .test_capture import _tshark

pytestmark = pytest.mark.lab
BROKER = f"{labmod.BROKER_IPS[0]}:{labmod.BROKER_PORT}"


def punch_with_pcaps(lab: labmod.Lab, tmp_path: Path, session: str
                     ) -> dict[str, tuple[int | None, str, Path]]:
    """Both hosts run `synprobe punch --pcap`, A first; -> side: (exit code, stderr, pcap)."""
    env = {**os.environ, "SYNPROBE_STATE_DIR": str(tmp_path / "state")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for side in ("a", "b"):
        procs[side] = lab.popen("h" + side, [
            *labmod.SYNPROBE, "punch", "--broker", BROKER, "--session", session, "--json",
            "--timeout", "15", "-v", "--pcap", str(tmp_path / f"{side}.pcapng")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    def finish(side: str) -> tuple[int | None, str, Path]:
        proc = procs[side]
        try:  # both at once: each chat ends only when the other side has sent its line
            _, err = proc.communicate(f"hello from {side}\n".encode(), timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=5)
        return proc.returncode, err.decode(errors="replace"), tmp_path / f"{side}.pcapng"

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(procs, pool.map(finish, procs), strict=True))
    return results


def test_punch_pcaps_in_the_lab(make_lab: Callable[..., labmod.Lab], tmp_path: Path) -> None:
    lab = make_lab("home", "home")
    labmod.start_broker(lab)
    runs = punch_with_pcaps(lab, tmp_path, "cap")
    kinds = {}
    for side, (code, err, pcap) in runs.items():
        assert code == 0, err
        attempts = analyze_file(str(pcap)).attempts
        host = lab.side(side).host
        # The broker connection opened first and was captured from its first SYN on.
        broker, *punches = attempts
        assert broker.endpoints[1] == BROKER and broker.kind == "three-way"
        assert broker.endpoints[0].startswith(host + ":")
        assert punches and punches[-1].established
        kinds[side] = punches[-1].kind
        comments = _tshark(pcap, "-T", "fields", "-e", "frame.comment").stdout.splitlines()
        assert comments[0] == f"broker: SYN from us to {BROKER}"
        assert any(c.startswith("punch: SYN from us to ") for c in comments)
        assert any(c.startswith("chat: ") and "B of data" in c for c in comments)
    # The default strategy primes: each side's TTL-limited SYN dies on the way (a "primed"
    # attempt in each capture); the first sends the full SYN from a fresh socket, which
    # the second's primed socket answers: "three-way" at the first, "primed" (established)
    # at the second.
    second = next(side for side, (_, err, _) in runs.items() if "our role: second" in err)
    first = "b" if second == "a" else "a"
    assert (kinds[first], kinds[second]) == ("three-way", "primed")
