"""README promises checked black-box on loopback (no root): exit codes, the punch's
options, the path check, the broker's deadlines and caps, --seed-broker's choice.

Where a README figure is too long for a test (the broker's 8,192 connections, nat-check's
310 s), the test asserts the constant and then shrinks it in a broker run in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulsyn_core._internal.exitcodes import ExitStatus
from tests import schemas
from tests.helpers import free_port

from .helpers import SYNPROBE, loopback_broker, read_line, wait_for_output

ORIGINAL = [sys.executable, str(Path(__file__).with_name("original_example.py"))]


# --- small tools ----------------------------------------------------------------------

def _free_port() -> int:
    return free_port()


def _run(args: list[str], timeout_s: float = 60, **kwargs: Any
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SYNPROBE, *args], capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL, **kwargs)


def _report(proc: subprocess.CompletedProcess[str] | tuple[int, str, str]) -> dict[str, Any]:
    out = proc.stdout if isinstance(proc, subprocess.CompletedProcess) else proc[1]
    return dict(schemas.loads("punch", out.splitlines()[0]))


@contextlib.contextmanager
def _server(handle: Any, backlog: int = 8) -> Iterator[int]:
    """A TCP server on 127.0.0.1 whose every connection goes to handle(conn) in a thread."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(backlog)
    srv.settimeout(0.2)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            conns.append(conn)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield int(srv.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        srv.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.close()


def _reusable(port: int = 0) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    return s


@contextlib.contextmanager
def _dropping_port() -> Iterator[int]:
    """A loopback port whose SYNs are dropped (a listener with a full accept queue)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    try:
        while True:  # fill the accept queue until a connection hangs: SYNs are dropped
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
            if not select.select([], [f], [], 0.5)[1]:
                break
            assert len(fillers) < 10, "the accept queue never filled"
        yield port
    finally:
        for f in fillers:
            f.close()
        srv.close()


# --- exit 1: one line, or the stack with --traceback ----------------------------------

_BOOM = ("import sys\nimport simulsyn_core._internal.session as session\n"
         "def boom(*a, **k):\n    raise RuntimeError('boom')\n"
         "session.run_punch = boom\nfrom synprobe.cli import main\nsys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("traceback", [False, True])
def test_internal_error_is_exit_1_in_one_line_or_the_stack_with_traceback(
        traceback: bool) -> None:
    args = [*(["--traceback"] if traceback else []), "punch", "--peer", "127.0.0.1:9",
            "--local-port", str(_free_port())]
    proc = subprocess.run([sys.executable, "-c", _BOOM, *args], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == ExitStatus.ERROR == 1
    if traceback:
        assert "Traceback (most recent call last)" in proc.stderr
        assert proc.stderr.rstrip().endswith("RuntimeError: boom")
    else:
        assert proc.stderr == ("synprobe: internal error: RuntimeError: boom "
                               "(run with --traceback and report it)\n")


# --- exit 9: the peer resets the connection mid-chat ----------------------------------

def test_peer_reset_mid_chat_is_exit_9() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(20)
    proc = subprocess.Popen([*SYNPROBE, "punch", "--peer", f"127.0.0.1:{srv.getsockname()[1]}",
                             "--local-port", str(_free_port()), "--json", "-v",
                             "--timeout", "10"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        conn, _ = srv.accept()
        conn.settimeout(10)
        conn.sendall(b"\x05hello")
        assert proc.stdout is not None
        seen = wait_for_output(proc.stdout, "hello\n", 20).splitlines()
        assert schemas.loads("punch", seen[0])["established"] is True
        assert seen[1:] == ["hello"]  # the chat runs; stdin is still open
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        conn.close()  # an RST, mid-chat
        out, err = proc.communicate(timeout=20)
    finally:
        srv.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == ExitStatus.PEER_LOST == 9, err
    assert "connection to the peer lost" in err and "Traceback" not in err


# --- exit 3: a broker that refuses, times out, or speaks another protocol -------------

def _silent(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.recv(4096)
        time.sleep(30)


def _http(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        conn.close()


@pytest.mark.parametrize("mode", ["--broker", "--seed-broker"])
def test_broker_that_never_answers_is_exit_3(mode: str) -> None:
    with _server(_silent) as port:
        start = time.monotonic()
        proc = _run(["punch", mode, f"127.0.0.1:{port}",
                     *(["--session", "s"] if mode == "--broker" else []),
                     "--json", "--timeout", "2"])
        took = time.monotonic() - start
    assert proc.returncode == ExitStatus.BROKER_UNREACHABLE, proc.stderr
    assert "did not answer in time" in _report(proc)["error"]
    assert took < 2 + 10  # --timeout 2, interpreter start-up on a loaded machine


def test_broker_whose_connect_times_out_is_exit_3() -> None:
    with _dropping_port() as port:  # the broker's SYNs get no answer: connect() times out
        proc = _run(["punch", "--broker", f"127.0.0.1:{port}", "--session", "s", "--json",
                     "--timeout", "2"])
    assert proc.returncode == ExitStatus.BROKER_UNREACHABLE, proc.stderr
    assert "ETIMEDOUT" in _report(proc)["error"]


@pytest.mark.parametrize("other", ["http", "original list broker"])
def test_broker_speaking_another_protocol_is_exit_3(other: str) -> None:
    with contextlib.ExitStack() as stack:
        if other == "http":
            port = stack.enter_context(_server(_http))
        else:
            port = _free_port()
            broker = subprocess.Popen([*ORIGINAL, "broker", "--bind", f"127.0.0.1:{port}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stack.callback(broker.wait, 5)
            stack.callback(broker.kill)
            _wait_listening(port)
        proc = _run(["punch", "--broker", f"127.0.0.1:{port}", "--session", "s", "--json",
                     "--timeout", "5"])
    assert proc.returncode == ExitStatus.BROKER_UNREACHABLE, proc.stderr
    assert "something else than the rendezvous protocol" in _report(proc)["error"]


def _wait_listening(port: int, timeout_s: float = 20) -> None:
    end = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < end, f"nothing listens on {port}"
        time.sleep(0.05)


# --- the plain broker on Ctrl-C --------------------------------------------------------

def test_plain_broker_stops_with_130_on_sigint() -> None:
    with loopback_broker() as (proc, _):
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == ExitStatus.INTERRUPTED == 130
    assert "Traceback" not in err and err.rstrip().endswith("stopped")


# --- the punch's options: --retries, --retry-interval, --attempt-timeout -------------

def _refused_punch(*extra: str) -> subprocess.CompletedProcess[str]:
    """A punch to a loopback port where nothing listens: every attempt is refused at once."""
    return _run(["punch", "--peer", f"127.0.0.1:{_free_port()}", "--local-port",
                 str(_free_port()), "--json", "--no-chat", *extra])


def test_attempts_stop_at_retries() -> None:
    proc = _refused_punch("--retries", "3", "--timeout", "20")
    assert proc.returncode == ExitStatus.PUNCH_FAILED, proc.stderr
    report = _report(proc)
    assert report["attempts"] == 3 == len(report["attempt_log"])
    assert [a["n"] for a in report["attempt_log"]] == [1, 2, 3]
    assert {a["outcome"] for a in report["attempt_log"]} == {"ECONNREFUSED"}
    assert "no connection after 3 attempt(s)" in report["error"]


def test_retry_interval_paces_refused_attempts() -> None:
    proc = _refused_punch("--retries", "5", "--retry-interval", "0.2", "--timeout", "20")
    assert proc.returncode == ExitStatus.PUNCH_FAILED, proc.stderr
    starts = [a["t_s"] for a in _report(proc)["attempt_log"]]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert len(gaps) == 4
    # 0.2 s +-50 % jitter (plus the refused attempt itself, a fraction of a millisecond)
    assert all(0.1 <= g <= 0.6 for g in gaps), gaps  # 0.3 at most, plus a busy machine
    fast = _refused_punch("--retries", "5", "--timeout", "20")  # the default: 0.01 s
    fast_starts = [a["t_s"] for a in _report(fast)["attempt_log"]]
    assert fast_starts[-1] - fast_starts[0] < 0.1 * 4, fast_starts


def test_attempt_timeout_bounds_each_connect() -> None:
    with _dropping_port() as port:
        proc = _run(["punch", "--peer", f"127.0.0.1:{port}", "--local-port",
                     str(_free_port()), "--json", "--no-chat", "--retries", "2",
                     "--attempt-timeout", "0.5", "--timeout", "20"])
    assert proc.returncode == ExitStatus.PUNCH_FAILED, proc.stderr
    log = _report(proc)["attempt_log"]
    assert [a["outcome"] for a in log] == ["ETIMEDOUT", "ETIMEDOUT"]
    assert all(0.45 <= a["duration_s"] <= 1.5 for a in log), log  # not the default 10 s
    assert log[1]["t_s"] - log[0]["t_s"] < 1.5  # no pause after a timed-out attempt


# --- the path check: unconfirmed, aborted with RST, within 3 s --------------------------

def test_path_check_unconfirmed_within_3s_is_aborted_with_rst() -> None:
    """A peer that accepts the connection but never answers the HELLO: the attempt is
    `unconfirmed` after 3 s and the punch aborts it with an RST (README: path check)."""
    with loopback_broker() as (_, broker_port):
        listener = _reusable()
        listener.listen(1)
        listener.settimeout(20)
        fake_port = listener.getsockname()[1]
        reg = _reusable(fake_port)  # registers from the port it listens on
        reg.settimeout(20)
        reg.connect(("127.0.0.1", broker_port))
        reg.sendall(b"SSYN1 REGISTER session=pathcheck\n")
        assert read_line(reg).startswith(b"SSYN1 REGISTERED")
        proc = subprocess.Popen([*SYNPROBE, "punch", "--broker", f"127.0.0.1:{broker_port}",
                                 "--session", "pathcheck", "--json", "-v", "--retries", "1",
                                 "--timeout", "20"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            conn, _ = listener.accept()
            accepted = time.monotonic()
            conn.settimeout(10)
            got = b""
            with pytest.raises(ConnectionResetError):  # RST, not a FIN (which reads b"")
                while chunk := conn.recv(4096):
                    got += chunk  # the HELLO, never answered
            aborted_after = time.monotonic() - accepted
            out, err = proc.communicate(timeout=20)
        finally:
            for s in (listener, reg):
                s.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    assert got, "the punch sent no HELLO"
    assert 2.8 <= aborted_after <= 6.0, aborted_after  # 3 s, on a loaded machine
    assert proc.returncode == ExitStatus.PUNCH_FAILED, err
    report = schemas.loads("punch", out.splitlines()[0])
    (attempt,) = report["attempt_log"]
    assert attempt["outcome"] == "unconfirmed"
    assert 2.9 <= attempt["duration_s"] <= 6.0, attempt
    assert "data did not pass both ways within 3 s" in err


# --- the broker: 1 s of silence, the 5 s first-line deadline, the connection cap -------

def test_list_answer_comes_after_1s_of_silence() -> None:
    with loopback_broker() as (_, port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            start = time.monotonic()
            data = s.recv(100)
            took = time.monotonic() - start
    assert data[:1] == b"\x01"  # the list: one entry, ours
    assert 0.95 <= took <= 3.0, took  # 1 s (not at once, not never)


def test_a_first_line_that_never_ends_is_cut_after_5s() -> None:
    with loopback_broker() as (_, port):
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            start = time.monotonic()
            s.sendall(b"SSYN1 REGISTER")  # no newline, ever: trickle more of it
            s.setblocking(False)
            closed = None
            while closed is None and time.monotonic() - start < 12:
                try:
                    if s.recv(100) == b"":
                        closed = time.monotonic() - start
                except BlockingIOError:
                    with contextlib.suppress(OSError):
                        s.send(b"x")
                    time.sleep(0.25)
                except ConnectionResetError:
                    closed = time.monotonic() - start
    assert closed is not None, "the broker kept a connection with no whole line for 12 s"
    assert 4.9 <= closed <= 6.5, closed


def _in_process_broker(services: dict[str, Any] | None = None, **options: Any
                       ) -> contextlib.AbstractContextManager[tuple[Any, int]]:
    """The real Broker on 127.0.0.1, run by an event loop in a thread of this process, so
    that a test can shrink its module constants."""
    from simulsyn_core._internal.broker import Broker
    from simulsyn_core._internal.endpoint import Endpoint

    @contextlib.contextmanager
    def run() -> Iterator[tuple[Any, int]]:
        loop = asyncio.new_event_loop()
        broker = Broker([Endpoint("127.0.0.1", 0)], log=lambda line: None,
                        services=dict(services or {}), **options)
        stop = asyncio.Event()
        started = threading.Event()

        async def main() -> None:
            await broker.start()
            started.set()
            try:
                await broker.serve_forever(stop)
            finally:
                await broker.close()
                # what services started (nat-check's watchers) ends with the loop
                others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in others:
                    task.cancel()
                await asyncio.gather(*others, return_exceptions=True)

        thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
        thread.start()
        assert started.wait(10), "the in-process broker did not start"
        try:
            yield broker, broker.listening[0].port
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)
            loop.close()

    return run()


def test_connection_cap_closes_the_next_at_accept() -> None:
    """At the cap, a newcomer from the network that holds them all is closed at accept
    (eviction only makes room for another network: tests/test_broker_abuse.py)."""
    from simulsyn_core._internal import broker as broker_mod

    assert broker_mod.MAX_CONNECTIONS == 20480  # the README's figure
    with _in_process_broker(max_connections=6) as (_, port):  # shrunk: same code path
        held = []
        try:
            for i in range(6):  # from 6 addresses, under the per-host cap
                s = socket.socket()
                s.bind((f"127.0.0.{2 + i}", 0))
                s.settimeout(5)
                s.connect(("127.0.0.1", port))
                s.sendall(b"SSYN1 REGISTER session=cap%d\n" % i)
                assert read_line(s).startswith(b"SSYN1 REGISTERED")  # accepted, held
                held.append(s)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
                start = time.monotonic()
                assert extra.recv(100) == b""  # closed at accept: not the list after 1 s
                assert time.monotonic() - start < 0.5
            held.pop().close()
            end = time.monotonic() + 5  # one slot free again: the next is served
            while True:  # until the broker has seen the close, a newcomer is still refused:
                # closed at accept, with our line unread, which the kernel answers with RST
                with socket.create_connection(("127.0.0.1", port), timeout=5) as again:
                    try:
                        again.sendall(b"SSYN1 REGISTER session=again\n")
                        if read_line(again).startswith(b"SSYN1 REGISTERED"):
                            break
                    except (ConnectionResetError, BrokenPipeError):
                        pass
                assert time.monotonic() < end, "no slot came free"
                time.sleep(0.05)
        finally:
            for s in held:
                s.close()


# --- nat-check on the broker: one check per address, four at once, the 310 s cap -------

def _hello(port: int, source_ip: str) -> tuple[socket.socket, dict[str, str]]:
    s = socket.socket()
    s.bind((source_ip, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(b"SSYN1 NC_HELLO\n")
    line = read_line(s).decode().split()
    assert line[:2] == ["SSYN1", "NC_INFO"], line
    return s, dict(f.split("=", 1) for f in line[2:])


def _text(value: str) -> str:
    """A key=value field's words (the wire puts no spaces in a value)."""
    return value.replace("_", " ").replace("+", " ")


def test_natcheck_one_check_per_address_four_at_once_and_a_310s_cap(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from synprobe.natcheck import protocol as P
    from synprobe.natcheck.server import ProbeServer

    assert P.CHECK_MAX_S == 310  # README: "A check ends after 310 s at most"
    monkeypatch.setattr(P, "CHECK_MAX_S", 2.0)  # shrunk: same code path
    server = ProbeServer(["127.0.0.1"], raw_reason="", log=lambda line: None)
    with _in_process_broker(server.services()) as (_, port):
        held = []
        try:
            first, info = _hello(port, "127.0.0.2")
            held.append(first)
            assert info["raw"] == "yes"
            again, info = _hello(port, "127.0.0.2")  # same address, first still open
            held.append(again)
            assert info["raw"] == "no" and "another check from this address" in _text(
                info["raw_reason"])
            for ip in ("127.0.0.3", "127.0.0.4", "127.0.0.5"):
                s, info = _hello(port, ip)
                held.append(s)
                assert info["raw"] == "yes", ip
            fifth, info = _hello(port, "127.0.0.6")  # four are running
            held.append(fifth)
            assert info["raw"] == "no" and "4 checks are running" in _text(info["raw_reason"])
            # After the cap the checks end although their connections stay open: the
            # same address gets a check again.
            end = time.monotonic() + 10
            while True:
                s, info = _hello(port, "127.0.0.2")
                held.append(s)
                if info["raw"] == "yes":
                    break
                assert time.monotonic() < end, "the checks did not end at the cap"
                time.sleep(0.25)
            assert all(c.fileno() != -1 for c in held[:1])  # the first is still connected
        finally:
            for s in held:
                s.close()
            server.close()


# --- --seed-broker takes the newest other endpoint --------------------------------------

def test_seed_broker_takes_the_newest_of_several_endpoints() -> None:
    list_port = _free_port()
    broker = subprocess.Popen([*ORIGINAL, "broker", "--bind", f"127.0.0.1:{list_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    listeners = []
    try:
        _wait_listening(list_port)  # (this probe is listed too: the oldest entry)
        for _ in range(3):  # three peers ask the list, oldest first; each also listens
            lst = _reusable()
            lst.listen(1)
            lst.settimeout(20)
            with _reusable(lst.getsockname()[1]) as ask:
                ask.settimeout(5)
                ask.connect(("127.0.0.1", list_port))
                while ask.recv(4096):
                    pass
            listeners.append(lst)
        newest = listeners[-1].getsockname()[1]
        proc = subprocess.Popen([*SYNPROBE, "punch", "--seed-broker",
                                 f"127.0.0.1:{list_port}", "--json", "--timeout", "10",
                                 "--retries", "1"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            conn, _ = listeners[-1].accept()  # the newest is the one it connects to
            with conn:
                conn.sendall(b"\x02hi")
                conn.shutdown(socket.SHUT_WR)
                out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    finally:
        for s in listeners:
            s.close()
        broker.kill()
        broker.wait(5)
    assert proc.returncode == 0, err
    report = schemas.loads("punch", out.splitlines()[0])
    assert report["mode"] == "seed-broker" and report["peer"] == f"127.0.0.1:{newest}"
    assert out.splitlines()[1:] == ["hi"]


# --- --pcap is closed on error exits (needs CAP_NET_RAW) --------------------------------

@pytest.mark.parametrize("case", ["broker refused (3)", "punch failed (5)"])
def test_pcap_is_closed_and_recorded_on_error_exits(tmp_path: Path, case: str) -> None:
    from .test_capture import _require_net_raw

    _require_net_raw()
    from synprobe.analyze.command import analyze_file

    pcap = tmp_path / "err.pcapng"
    env = {**os.environ, "SYNPROBE_STATE_DIR": str(tmp_path / "state")}
    if case.startswith("broker"):
        args = ["punch", "--broker", f"127.0.0.1:{_free_port()}", "--session", "s"]
        expect, attempts = ExitStatus.BROKER_UNREACHABLE, 1
    else:
        args = ["punch", "--peer", f"127.0.0.1:{_free_port()}", "--local-port",
                str(_free_port()), "--retries", "2"]
        expect, attempts = ExitStatus.PUNCH_FAILED, 2
    proc = _run([*args, "--json", "--timeout", "10", "--pcap", str(pcap)], env=env)
    assert proc.returncode == expect, proc.stderr
    assert "capture: " in proc.stderr and f"written to {pcap}" in proc.stderr
    result = analyze_file(str(pcap))
    assert result.problem is None or "no TCP" not in str(result.problem), result.problem
    assert len(result.attempts) == attempts
    assert all(a.kind == "syn-rejected" for a in result.attempts)
    assert json.loads((tmp_path / "state" / "pcaps.jsonl").read_text())["path"] == str(pcap)
