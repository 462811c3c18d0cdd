"""The command line: help, usage errors and exit codes, without the lab."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from simulsyn_core._internal.exitcodes import ExitStatus
from synprobe.cli import cli, main
from tests import schemas

from .helpers import SYNPROBE


def test_help_lists_every_command_and_exit_code() -> None:
    out = CliRunner().invoke(cli, ["--help"]).output
    for word in ("broker", "punch", "lab"):
        assert word in out
    for status in ExitStatus:
        assert f"{int(status):>3}  {status.name.lower().replace('_', '-')}" in out


@pytest.mark.parametrize("args, message", [
    (["punch"], "give exactly one of --broker, --seed-broker or --peer"),
    (["punch", "--broker", "127.0.0.1:1", "--plain"], "--plain with --broker needs --session"),
    (["punch", "--broker", "127.0.0.1:1", "--code", "7-apple", "--session", "s"],
     "--code goes with --broker, without --session"),
    (["punch", "--broker", "127.0.0.1:1", "--code", "7-applle-adroitness"],
     "'applle' is not one of the code's words"),
    (["punch", "--broker", "127.0.0.1:1", "--code", "٣-apple-adroitness"], "is not a code"),
    (["punch", "--broker", "127.0.0.1:1", "--session", "s", "--secret", "x", "--plain"],
     "--plain turns authentication off"),
    (["punch", "--seed-broker", "127.0.0.1:1", "--secret", "x"],
     "--secret goes with --session or --peer"),
    (["punch", "--peer", "127.0.0.1:1"], "--peer needs --local-port"),
    (["punch", "--peer", "1.2.3:4", "--local-port", "5"], "is not an IP address"),
    (["punch", "--broker", "127.0.0.1:1", "--session", "a b"], "1-64 of A-Z"),
    (["punch", "--broker", "127.0.0.1:1", "--session", "s", "--retries", "0"], "0"),
    (["nosuch"], "No such command"),
])
def test_usage_errors_exit_2_with_a_message(args: list[str], message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def _closed_port() -> int:
    """Nothing listens on it: below the ephemeral range, so no parallel test's broker on
    127.0.0.1:0 takes it meanwhile."""
    from tests.helpers import free_port

    return free_port()


def test_unreachable_broker_is_exit_3_with_json() -> None:
    port = _closed_port()
    proc = subprocess.run([*SYNPROBE, "punch", "--broker", f"127.0.0.1:{port}", "--session",
                           "s", "--json", "--timeout", "5"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == ExitStatus.BROKER_UNREACHABLE
    report = schemas.loads("punch", proc.stdout)
    assert report["established"] is False
    assert "ECONNREFUSED" in report["error"]
    assert proc.stderr.startswith("synprobe: broker 127.0.0.1:")
    assert "Traceback" not in proc.stderr


def test_broker_that_cannot_bind_is_exit_8() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([*SYNPROBE, "broker", "--bind", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == ExitStatus.ADDRESS_IN_USE
    assert "cannot listen" in proc.stderr


def test_punch_path_never_imports_scapy() -> None:
    port = _closed_port()
    code = ("import sys; from synprobe.cli import main; "
            "rc = [main(a) for a in (['--help'], ['punch', '--help'], ['broker', '--help'], "
            f"['punch', '--peer', '127.0.0.1:{port}', '--local-port', '{_closed_port()}', "
            "'--no-chat', '--json', '--retries', '2'])]; "
            "import simulsyn_core._internal.broker, simulsyn_core._internal.session, "
            "simulsyn_core._internal.client; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('scapy', 'tabulate')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert proc.stdout.strip().endswith("[]"), proc.stdout + proc.stderr


def test_broker_port_out_of_range_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["punch", "--broker", "127.0.0.1:99999", "--session", "s"]) == 2
    assert "port must be 1-65535" in capsys.readouterr().err


def test_taken_local_port_is_exit_8_with_json() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([*SYNPROBE, "punch", "--broker", "127.0.0.1:1", "--session", "s",
                               "--local-port", str(port), "--json"],
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == ExitStatus.ADDRESS_IN_USE, proc.stderr
    report = schemas.loads("punch", proc.stdout)
    assert report["exit_code"] == 8 and "cannot bind local port" in report["error"]
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


def test_sigterm_while_waiting_is_exit_130_with_json() -> None:
    import signal

    from .helpers import loopback_broker, wait_for_stderr

    with loopback_broker() as (_, port):
        proc = subprocess.Popen([*SYNPROBE, "punch", "--broker", f"127.0.0.1:{port}",
                                 "--session", "term", "--json", "-v"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            err = wait_for_stderr(proc, "waiting for the peer", 20)  # registered
            proc.send_signal(signal.SIGTERM)
            out, rest = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        err += rest
    assert proc.returncode == ExitStatus.INTERRUPTED
    report = schemas.loads("punch", out)
    assert (report["error"], report["exit_code"]) == ("interrupted", 130)
    assert "synprobe: interrupted" in err
