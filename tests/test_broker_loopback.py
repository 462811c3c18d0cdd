"""The broker and the punch on loopback with real sockets (no root needed)."""

from __future__ import annotations

import json
import socket
import subprocess
import time

from simulsyn_core.wire import decode_seed_list

from .helpers import SYNPROBE, loopback_broker


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


def _read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def test_silent_client_gets_the_original_list() -> None:
    with loopback_broker() as (_, port):
        first = decode_seed_list(_list_request(port))
        second = decode_seed_list(_list_request(port))
    assert len(first) == 1 and first[0].ip == "127.0.0.1"
    assert len(second) == 2 and second[0] == first[0]


def test_bad_clients_do_not_disturb_the_others() -> None:
    with loopback_broker() as (proc, port):
        waiting = _line_client(port, b"SSYN1 REGISTER session=keep\n")
        assert _read_line(waiting).startswith(b"SSYN1 REGISTERED session=keep public=127.0.0.1:")
        garbage = _line_client(port, b"SSYN1 REGISTER \xff\xfe\n")
        assert _read_line(garbage).startswith(b"SSYN1 ERROR code=bad-request")
        longline = _line_client(port, b"SSYN1 " + b"A" * 2000)
        assert _read_line(longline).startswith(b"SSYN1 ERROR code=bad-request")
        other = _line_client(port, b"GET / HTTP/1.0\r\n\r\n")
        assert other.recv(100) == b""
        # The waiting client is still served: its peer comes and both are told.
        peer = _line_client(port, b"SSYN1 REGISTER session=keep\n")
        to_peer = _read_line(peer)
        to_waiting = _read_line(waiting)
        assert to_peer.startswith(b"SSYN1 PEER session=keep") and b"role=second" in to_peer
        assert to_waiting.startswith(b"SSYN1 PEER session=keep") and b"role=first" in to_waiting
        for s in (waiting, garbage, longline, other, peer):
            s.close()
        assert proc.poll() is None


def test_punch_on_loopback_connects_and_says_hello() -> None:
    with loopback_broker() as (_, port):
        procs = [subprocess.Popen([*SYNPROBE, "punch", "--broker", f"127.0.0.1:{port}",
                                   "--session", "lo", "--no-chat", "--json", "--timeout", "10"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=30) for p in procs]
    reports = [json.loads(out.splitlines()[0]) for out, _ in outs]
    assert [p.returncode for p in procs] == [0, 0], outs
    a, b = reports
    assert a["established"] and b["established"]
    assert a["peer"] == b["public"] and b["peer"] == a["public"]
    assert {a["role"], b["role"]} == {"first", "second"}
    assert a["attempts"] >= 1 and a["error"] is None


def test_lonely_punch_gives_up_with_no_peer() -> None:
    with loopback_broker() as (_, port):
        start = time.monotonic()
        proc = subprocess.run([*SYNPROBE, "punch", "--broker", f"127.0.0.1:{port}",
                               "--session", "alone", "--json", "--timeout", "1"],
                              capture_output=True, text=True, timeout=30)
        took = time.monotonic() - start
    assert proc.returncode == 4
    assert json.loads(proc.stdout)["error"] == "no peer joined session 'alone' in time"
    assert took < 10  # bounded by --timeout (plus interpreter start), not hanging
