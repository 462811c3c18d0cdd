"""README promises that need root: `broker --probe` refusing to start (8, 1), a lab tool
missing (10), an interrupted `lab up` cleaning up, and every lab test marked `lab`."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from synprobe import lab as labmod

from .conftest import lab_inodes, leftovers, require_lab
from .helpers import SYNPROBE

TESTS = Path(__file__).parent
PROBE_BINDS = ["--bind", f"{labmod.BROKER_IPS[0]}:{labmod.BROKER_PORT}"]


@pytest.mark.lab
def test_probe_broker_with_its_second_port_taken_is_exit_8(
        make_lab: Callable[..., labmod.Lab]) -> None:
    lab = make_lab()
    taken = f"{labmod.BROKER_IPS[0]}:{labmod.BROKER_PORT + 1}"
    holder = lab.popen("br", [sys.executable, "-c", textwrap.dedent(f"""
        import socket, time
        s = socket.socket()
        s.bind(("{labmod.BROKER_IPS[0]}", {labmod.BROKER_PORT + 1}))
        s.listen()
        time.sleep(60)""")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    labmod.wait_for_listen(lab, "br", labmod.BROKER_IPS[0], labmod.BROKER_PORT + 1, 10)
    run = lab.run("br", [*labmod.SYNPROBE, "broker", *PROBE_BINDS, "--probe"], timeout=30)
    holder.kill()
    assert run.returncode == 8, run.stderr
    assert "cannot listen" in run.stderr and "Traceback" not in run.stderr, taken
    rules = lab.run("br", ["iptables", "-S"], timeout=10).stdout
    assert "synprobe-natcheck" not in rules  # its rules went with it


@pytest.mark.lab
def test_probe_broker_whose_rules_are_refused_is_exit_1(
        make_lab: Callable[..., labmod.Lab], tmp_path: Path) -> None:
    lab = make_lab()
    fake = tmp_path / "bin"
    fake.mkdir()
    restore = fake / "iptables-restore"  # iptables -S is the real one; changes are refused
    restore.write_text("#!/bin/sh\necho 'iptables-restore: rule refused' >&2\nexit 1\n")
    restore.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    run = lab.run("br", [*labmod.SYNPROBE, "broker", *PROBE_BINDS, "--probe"], timeout=30,
                  env=env)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "rule refused" in lines[0] and "Traceback" not in run.stderr


@pytest.mark.lab
@pytest.mark.parametrize("command", [["lab", "up", "--id", "notool"],
                                     ["lab", "down", "--id", "notool"]])
def test_a_missing_lab_tool_is_exit_10(command: list[str], tmp_path: Path) -> None:
    require_lab()
    env = {**os.environ, "PATH": str(tmp_path)}  # no ip, no iptables, nothing
    proc = subprocess.run([*SYNPROBE, *command], capture_output=True, text=True, timeout=30,
                          env=env)
    assert proc.returncode == 10, proc.stderr
    assert proc.stderr == "synprobe: the lab needs ip (Debian: apt-get install iproute2)\n"


@pytest.mark.lab
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_lab_up_removes_what_it_built(sig: int) -> None:
    """Interrupted while building (some namespaces made, not all): nothing is left."""
    require_lab()
    for attempt in range(5):
        lab_id = f"int{os.getpid() % 10000}x{attempt}"
        prefix = f"ssyn-{lab_id}-"
        proc = subprocess.Popen([*SYNPROBE, "lab", "up", "--a", "carrier", "--b", "carrier",
                                 "--id", lab_id], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        names: list[str] = []
        inodes: set[int] = set()
        try:
            end = time.monotonic() + 30
            while proc.poll() is None and not names and time.monotonic() < end:
                names = [n for n in labmod.lab_namespaces() if n.startswith(prefix)]
            inodes = lab_inodes(names)
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            if proc.returncode == 0:  # built before the signal came: not this scenario
                subprocess.run([*SYNPROBE, "lab", "down", "--id", lab_id],
                               capture_output=True, timeout=60)
        if proc.returncode == 0:
            continue
        assert names, "the signal came before any namespace was made"
        assert proc.returncode == 130, err
        assert out == "" and err.strip() == "synprobe: interrupted"
        all_names = [f"{prefix}{n}" for n in (*labmod.NODES, "ca", "cb")]
        assert leftovers(all_names, inodes) == []  # no namespace, no process
        return
    pytest.fail("lab up finished before the signal 5 times: the scenario never happened")


# --- `-m lab` selects every test that builds a lab ---------------------------------------

def _uses_the_lab(tree: ast.AST) -> bool:
    """A function that takes make_lab (or a fixture that does) or calls require_lab()."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in ("make_lab", "require_lab"):
            return True
        if isinstance(node, ast.arg) and node.arg == "make_lab":
            return True
    return False


def _marked_lab(decorators: list[ast.expr]) -> bool:
    return any("mark.lab" in ast.unparse(d) for d in decorators)


def test_every_test_that_uses_the_lab_is_marked_lab() -> None:
    unmarked = []
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marked = any(
            isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                              for t in n.targets)
            and "mark.lab" in ast.unparse(n.value) for n in tree.body)
        fixtures = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)
                    and any("fixture" in ast.unparse(d) for d in n.decorator_list)
                    and _uses_the_lab(n)}
        for node in tree.body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            uses = _uses_the_lab(node) or any(a.arg in fixtures for a in node.args.args)
            if uses and not (module_marked or _marked_lab(node.decorator_list)):
                unmarked.append(f"{path.name}::{node.name}")
    assert unmarked == [], "uses the lab without the `lab` marker (so -m 'not lab' runs it)"
    # and the check sees what it should: the lab modules are found
    assert "test_natcheck_lab.py" in {p.name for p in TESTS.glob("test_*.py")}


def test_not_lab_selection_runs_no_lab_test() -> None:
    """`-m "not lab"` as an ordinary user's run: no test that builds a lab is selected."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                           "no:cacheprovider", "-m", "lab", str(TESTS)],
                          capture_output=True, text=True, timeout=120, cwd=TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lab_ids = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    for module in ("test_natcheck_lab.py", "test_natcheck_safety.py", "test_lab_punch.py",
                   "test_lab_cli.py", "test_analyze_lab.py", "test_capture_lab.py",
                   "test_lab_interop.py", "test_promises_lab.py"):
        assert f"tests/{module}" in lab_ids, module
