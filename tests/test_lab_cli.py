"""`synprobe lab` by hand: up, down, demo, and cleanup on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from synprobe import lab as labmod

from .conftest import lab_inodes, leftovers, processes_in, require_lab
from .helpers import SYNPROBE


def _namespaces(prefix: str) -> list[str]:
    return [n for n in labmod.lab_namespaces() if n.startswith(prefix)]


def _wait_for(what: str, ready: Callable[[], bool], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < end, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.05)


@pytest.mark.lab
def test_lab_up_then_down_leaves_nothing() -> None:
    require_lab()
    lab_id = f"cli{os.getpid() % 100000}"
    try:
        up = subprocess.run([*SYNPROBE, "lab", "up", "--a", "original", "--b", "firewall",
                             "--id", lab_id], capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        assert f"ssyn-{lab_id}-ha" in up.stdout
        assert len(_namespaces(f"ssyn-{lab_id}-")) == 6
        rules = subprocess.run(["ip", "netns", "exec", f"ssyn-{lab_id}-ga", "iptables-save"],
                               capture_output=True, text=True, timeout=10).stdout
        assert "MASQUERADE" in rules and ":INPUT ACCEPT" in rules  # the original's rules
        # a process left running in the lab: `lab down` must stop it, not only delete
        sleeper = subprocess.Popen(["ip", "netns", "exec", f"ssyn-{lab_id}-hb", "sleep", "60"])
        _wait_for("sleep in hB", lambda: bool(processes_in(lab_inodes(
            [f"ssyn-{lab_id}-hb"]))), 10)
        names = _namespaces(f"ssyn-{lab_id}-")
        inodes = lab_inodes(names)
    finally:
        down = subprocess.run([*SYNPROBE, "lab", "down", "--id", lab_id],
                              capture_output=True, text=True, timeout=60)
    assert down.returncode == 0
    assert "removed 6 namespace(s)" in down.stdout
    assert leftovers(names, inodes) == []
    assert sleeper.wait(10) == -signal.SIGTERM


@pytest.mark.lab
def test_demo_connects_and_cleans_up() -> None:
    require_lab()
    lab_id = f"demo{os.getpid() % 100000}"
    demo = subprocess.run([*SYNPROBE, "lab", "demo", "--a", "home", "--b", "firewall",
                           "--id", lab_id], capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "peer says: hello from B (203.0.113.130)" in demo.stdout
    assert "peer says: hello from A (10.1.0.2)" in demo.stdout
    assert "session demo: paired" in demo.stdout  # the broker's log
    assert demo.stdout.rstrip().endswith("lab removed.")
    assert _namespaces(f"ssyn-{lab_id}-") == []


@pytest.mark.lab
def test_demo_killed_with_sigterm_removes_its_lab() -> None:
    require_lab()
    lab_id = f"term{os.getpid() % 100000}"
    proc = subprocess.Popen([*SYNPROBE, "lab", "demo", "--a", "syn-drop-all", "--b",
                             "syn-drop-all",
                             "--timeout", "30", "--id", lab_id], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for("the demo's lab", lambda: len(_namespaces(f"ssyn-{lab_id}-")) >= 6, 30)
    names = _namespaces(f"ssyn-{lab_id}-")
    assert len(names) == 6, "the demo never brought its lab up"
    inodes = lab_inodes(names)
    hosts = lab_inodes([f"ssyn-{lab_id}-ha", f"ssyn-{lab_id}-hb"])
    try:
        # the punches are running in both hosts (both NATs drop every inbound SYN, which
        # the demo's broker cannot know: they would punch for 30 s)
        _wait_for("both punches running", lambda: len(processes_in(hosts)) >= 2, 30)
        assert proc.poll() is None, "the demo ended before its punches ran"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130
    assert leftovers(names, inodes) == []  # no namespace, no process of the lab


def test_lab_commands_refuse_without_root_in_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from synprobe.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for args in (["lab", "down", "--all"], ["lab", "up", "--id", "never"], ["lab", "demo"]):
        assert main(args) == 6
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs CAP_NET_ADMIN" in err, err
