"""The broker and the punch on loopback with real sockets (no root needed)."""

from __future__ import annotations

import socket
import subprocess
import time

from simulsyn_core._internal.wire import decode_seed_list
from tests import schemas
from tests.helpers import free_port

from .helpers import SYNPROBE, loopback_broker, read_line, stop_process, wait_for_stderr


def _list_request(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data


def _line_client(port: int, payload: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(payload)
    return s


def test_silent_client_gets_the_original_list() -> None:
    with loopback_broker() as (_, port):
        first = decode_seed_list(_list_request(port))
        second = decode_seed_list(_list_request(port))
    assert len(first) == 1 and first[0].ip == "127.0.0.1"
    assert len(second) == 2 and second[0] == first[0]


def test_bad_clients_do_not_disturb_the_others() -> None:
    with loopback_broker() as (proc, port):
        waiting = _line_client(port, b"SSYN1 REGISTER session=keep\n")
        assert read_line(waiting).startswith(b"SSYN1 REGISTERED session=keep public=127.0.0.1:")
        garbage = _line_client(port, b"SSYN1 REGISTER \xff\xfe\n")
        assert read_line(garbage).startswith(b"SSYN1 ERROR code=bad-request")
        longline = _line_client(port, b"SSYN1 " + b"A" * 2000)
        assert read_line(longline).startswith(b"SSYN1 ERROR code=bad-request")
        other = _line_client(port, b"GET / HTTP/1.0\r\n\r\n")
        assert other.recv(100) == b""
        # The waiting client is still served: its peer comes and both are told.
        peer = _line_client(port, b"SSYN1 REGISTER session=keep\n")
        to_peer = read_line(peer)
        to_waiting = read_line(waiting)
        assert to_peer.startswith(b"SSYN1 PEER session=keep") and b"role=second" in to_peer
        assert to_waiting.startswith(b"SSYN1 PEER session=keep") and b"role=first" in to_waiting
        for s in (waiting, garbage, longline, other, peer):
            s.close()
        assert proc.poll() is None


def test_punch_chats_with_a_peer_that_listens() -> None:
    """The punch, the JSON and the chat on loopback, against a plain listening peer that
    speaks the original framing. (Two punches on loopback do not meet: the host answers
    each early SYN with RST inside the connect() call itself, so the SYN-SENT windows never
    overlap; simultaneous open is tested in the NAT lab.)"""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(10)
    port = srv.getsockname()[1]
    local_port = _closed_port()
    proc = subprocess.Popen([*SYNPROBE, "punch", "--peer", f"127.0.0.1:{port}", "--local-port",
                             str(local_port), "--json", "--timeout", "10", "-v"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    conn, addr = srv.accept()
    assert addr == ("127.0.0.1", local_port)
    with conn:
        conn.settimeout(10)
        conn.sendall(b"\x05hello" + bytes([300 - 255]) + b"x" * 45)
        conn.shutdown(socket.SHUT_WR)  # the peer is done talking: the chat ends at its EOF
        out, err = proc.communicate("first line\n" + "é" * 200 + "\n", timeout=30)
        received = b""
        while chunk := conn.recv(4096):
            received += chunk
    srv.close()
    assert proc.returncode == 0, err
    report = schemas.loads("punch", out.splitlines()[0])
    assert report["established"] and report["mode"] == "direct"
    assert report["local"] == f"127.0.0.1:{local_port}" and report["attempts"] == 1
    assert out.splitlines()[1:] == ["hello", "x" * 45]
    # 400 bytes of "é" are split on a character boundary into 254 + 146 bytes.
    assert received == b"\x0afirst line" + bytes([254]) + "é".encode() * 127 + bytes(
        [146]) + "é".encode() * 73
    assert "attempt 1: connected" in err


def _closed_port() -> int:
    """A free port below the ephemeral range: one the kernel hands out (bind to 0) can be
    taken meanwhile by a broker of a parallel test listening on 127.0.0.1:0, and the
    punch's --local-port bind then fails (CI saw the accept here wait 10 s in vain)."""
    return free_port()


def test_lonely_punch_gives_up_with_no_peer() -> None:
    with loopback_broker() as (_, port):
        proc = subprocess.Popen([*SYNPROBE, "punch", "--broker", f"127.0.0.1:{port}",
                                 "--session", "alone", "--json", "--timeout", "1", "-v"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            wait_for_stderr(proc, "local port", 30)  # the run (and its --timeout) starts
            start = time.monotonic()
            out, _ = proc.communicate(timeout=30)
            took = time.monotonic() - start
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    assert proc.returncode == 4
    assert schemas.loads("punch", out)["error"] == "no peer joined session 'alone' in time"
    # bounded by --timeout 1 (measured from the run's first line, so the interpreter's
    # start-up on a loaded machine does not count), plus exiting
    assert took < 3.0, f"{took:.2f} s for --timeout 1"


def test_no_chat_with_a_peer_that_is_not_synprobe_exchanges_one_hello() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(10)
    port = srv.getsockname()[1]
    local_port = _closed_port()
    proc = subprocess.Popen([*SYNPROBE, "punch", "--peer", f"127.0.0.1:{port}", "--local-port",
                             str(local_port), "--no-chat", "-v", "--timeout", "10"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # The accept's 10 s are for the connect, not for the interpreter's start-up on a
        # loaded machine: first the run's first line (bounded, as the lonely punch's). A
        # punch that ends before it (its --local-port taken meanwhile) fails here, with
        # its stderr, instead of the accept waiting 10 s in vain.
        seen = wait_for_stderr(proc, f"local port {local_port} (bound", 30)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(10)
            conn.sendall(b"\x03hey")
            received = b""
            while chunk := conn.recv(4096):  # until synprobe half-closes
                received += chunk
        _, err = proc.communicate(timeout=30)
    finally:
        srv.close()
        stop_process(proc)
    err = seen + err
    assert proc.returncode == 0, err
    assert received == b"\x0esimulsyn hello"
    assert "peer said 'hey'" in err


def test_one_host_cannot_take_every_connection() -> None:
    from simulsyn_core._internal.broker import MAX_CONNECTIONS_PER_IP

    with loopback_broker() as (proc, port):
        hogs = [_line_client(port, b"S") for _ in range(MAX_CONNECTIONS_PER_IP)]
        try:
            extra = socket.create_connection(("127.0.0.1", port), timeout=5)
            with extra:
                assert extra.recv(100) == b""  # closed at accept: over the per-host cap
        finally:
            for s in hogs:
                s.close()
        # Once the broker has seen the hogs go, the host is served again (polled: the
        # broker notices each close in its own time).
        end = time.monotonic() + 10
        while not (answer := _list_request(port)):
            assert time.monotonic() < end, "still over the cap 10 s after the hogs went"
            time.sleep(0.05)
        assert len(decode_seed_list(answer)) == 1
        assert proc.poll() is None


def test_stopping_the_broker_with_clients_connected_is_quiet() -> None:
    with loopback_broker() as (proc, port):
        waiting = _line_client(port, b"SSYN1 REGISTER session=w\n")
        assert read_line(waiting).startswith(b"SSYN1 REGISTERED")
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        waiting.close()
    assert proc.returncode == 0
    assert "Traceback" not in err and "Exception" not in err
    assert err.rstrip().endswith("stopped")


def test_a_stderr_nobody_reads_does_not_stall_the_broker() -> None:
    # loopback_broker reads the broker's stderr only up to the "listening" line: after
    # that the pipe fills (3000 log lines > 64 KiB) and nobody drains it.
    with loopback_broker() as (proc, port):
        for _ in range(3000):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /\r\n")
                assert s.recv(10) == b""
        client = _line_client(port, b"SSYN1 REGISTER session=still\n")
        with client:
            assert read_line(client).startswith(b"SSYN1 REGISTERED session=still")
        assert proc.poll() is None


def test_a_silent_client_that_half_closes_gets_the_list_at_once() -> None:
    with loopback_broker() as (_, port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            start = time.monotonic()
            s.shutdown(socket.SHUT_WR)  # EOF before a byte: no need to wait the 1 s
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            took = time.monotonic() - start
    assert len(decode_seed_list(data)) == 1
    assert took < 0.9, took


def test_lines_after_a_probed_register_wait_their_turn() -> None:
    """With --syn-probe, REGISTER waits for the probe; a line sent behind it in the same
    segment is answered after REGISTERED, not before."""
    with loopback_broker("--syn-probe") as (proc, port):
        first = _line_client(port, b"SSYN1 REGISTER session=probed strategies=order\n"
                                   b"SSYN1 WHOAMI\n")
        with first:
            assert read_line(first).startswith(b"SSYN1 REGISTERED session=probed")
            assert read_line(first).startswith(b"SSYN1 YOUARE public=127.0.0.1:")
            with _line_client(port, b"SSYN1 REGISTER session=probed\n") as second:
                assert read_line(second).startswith(b"SSYN1 PEER session=probed")
            assert read_line(first).startswith(b"SSYN1 PEER session=probed")
        assert proc.poll() is None
