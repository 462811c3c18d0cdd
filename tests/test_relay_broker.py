"""The broker's relay (issue 12, docs/protocol.md "Relay") on loopback, against a broker
subprocess: tokens in PEER, strategy=relay for untraversable pairs, bytes both ways and
half-close through the relay, and every limit.

127.0.0.0/8 is all loopback on Linux: clients bind source addresses 127.a.b.c to stand
for several hosts (the per-address limit)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from .helpers import loopback_broker, read_line, wait_for_stderr
from .test_broker_abuse import BrokerProc, broker

# run_broker with RelayLimits built from cfg["relay"] (None: a broker without --relay).
_LAUNCHER = """
import json, sys
import simulsyn_core._internal.broker as B
from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.relay import RelayLimits
cfg = json.loads(sys.argv[1])
relay = cfg.pop("relay", None)
sys.exit(B.run_broker([Endpoint("127.0.0.1", 0)],
                      relay=RelayLimits(**relay) if relay is not None else None, **cfg))
"""
TOKEN = re.compile(rb" relay=([0-9a-f]{32})(?: |\n)")
IO_TIMEOUT_S = 10.0


@contextlib.contextmanager
def relay_broker(**limits: object) -> Iterator[BrokerProc]:
    cfg = {"relay": limits}
    with broker(argv=[sys.executable, "-c", _LAUNCHER, json.dumps(cfg)]) as bp:
        yield bp


def connect(port: int, src: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S,
                                    source_address=(src, 0))


def pair(port: int, session: str, first: str = "relay", second: str = "relay",
         facts: str = "", srcs: tuple[str, str] = ("127.0.0.1", "127.0.0.1")
         ) -> tuple[bytes, bytes]:
    """Register two clients in ``session`` (``strategies=``, and REGISTER ``facts`` for
    both); the line each gets at pairing."""
    a = connect(port, srcs[0])
    b = connect(port, srcs[1])
    with a, b:
        a.sendall(f"SSYN1 REGISTER session={session} strategies={first} {facts}\n"
                  .replace(" \n", "\n").encode())
        assert read_line(a).startswith(b"SSYN1 REGISTERED")
        b.sendall(f"SSYN1 REGISTER session={session} strategies={second} {facts}\n"
                  .replace(" \n", "\n").encode())
        to_b, to_a = read_line(b), read_line(a)
        # A plain PEER closes both connections.
        assert a.recv(1) == b"" and b.recv(1) == b""
    return to_a, to_b


def token_of(line: bytes) -> str:
    m = TOKEN.search(line)
    assert m is not None, line
    return m.group(1).decode()


def new_token(port: int, session: str, srcs: tuple[str, str] = ("127.0.0.1", "127.0.0.1")
              ) -> str:
    to_a, to_b = pair(port, session, srcs=srcs)
    assert token_of(to_a) == token_of(to_b)
    return token_of(to_a)


def relay(port: int, token: str, src: str = "127.0.0.1", early: bytes = b"") -> socket.socket:
    s = connect(port, src)
    s.sendall(f"SSYN1 RELAY token={token}\n".encode() + early)
    return s


def relayed_pair(port: int, token: str, srcs: tuple[str, str] = ("127.0.0.1", "127.0.0.1")
                 ) -> tuple[socket.socket, socket.socket]:
    a = relay(port, token, srcs[0])
    b = relay(port, token, srcs[1])
    assert read_line(a) == b"SSYN1 RELAYED\n"
    assert read_line(b) == b"SSYN1 RELAYED\n"
    return a, b


def status(port: int, token: str) -> bytes:
    with connect(port) as s:
        s.sendall(f"SSYN1 RELAY_STATUS token={token}\n".encode())
        line = read_line(s)
        assert s.recv(1) == b""
    return line


def read_to_end(s: socket.socket) -> tuple[bytes, BaseException | None]:
    """Everything until EOF, or until the connection is reset (then the error)."""
    chunks = []
    try:
        while chunk := s.recv(1 << 20):
            chunks.append(chunk)
    except OSError as exc:
        return b"".join(chunks), exc
    return b"".join(chunks), None


def echo_check(a: socket.socket, b: socket.socket, data: bytes = b"ping") -> None:
    a.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = b.recv(65536)
        assert chunk, "closed"
        got += chunk
    assert got == data


# --- PEER ------------------------------------------------------------------------------


def test_peer_carries_one_token_to_both_only_when_both_offer_relay() -> None:
    # Through the CLI: --relay and its flags parse.
    with loopback_broker("--relay", "--relay-rate", "0", "--relay-idle", "5") as (proc, port):
        to_a, to_b = pair(port, "both", "sync,relay", "relay,sync")
        assert token_of(to_a) == token_of(to_b) and b"strategy=sync" in to_a
        assert to_a.startswith(b"SSYN1 PEER session=both") and b"role=first" in to_a
        again = pair(port, "both", "relay", "relay")
        assert token_of(again[0]) != token_of(to_a)  # a new token per pair
        one, other = pair(port, "one", "sync,relay", "sync")
        assert b"relay=" not in one + other and b"strategy=sync" in one
        token = token_of(to_a)
        log = wait_for_stderr(proc, f"relay={token[:8]}...", 5)
        assert token not in log  # the log shows a token's first 8 characters only
    with broker() as bp:  # no --relay: no relay= at all, even when both offer it
        to_a, to_b = pair(bp.port, "both", "relay", "relay")
        assert b"relay=" not in to_a + to_b and to_a.startswith(b"SSYN1 PEER")


@pytest.mark.parametrize("facts", ["mapping=varies", "reply_syn=blocked"])
def test_untraversable_pair_gets_strategy_relay(facts: str) -> None:
    with relay_broker() as bp:
        to_a, to_b = pair(bp.port, "stuck", "sync,relay", "relay", facts)
        for line, role in ((to_a, b"first"), (to_b, b"second")):
            assert line.startswith(b"SSYN1 PEER session=stuck public=127.0.0.1:")
            assert b" strategy=relay why=" in line and b"role=" + role in line
        assert token_of(to_a) == token_of(to_b)
        why = b"_map_each_destination_" if "mapping" in facts else b"drop_a_SYN_even_when"
        assert why in to_a and why in to_b
        # Either side not offering relay: refused as before.
        to_a, to_b = pair(bp.port, "stuck", "sync", "relay", facts)
        assert to_a.startswith(b"SSYN1 ERROR code=untraversable")
        assert to_b.startswith(b"SSYN1 ERROR code=untraversable")


# --- bytes through the relay ---------------------------------------------------------


def test_bytes_both_ways_intact_and_half_close_propagates() -> None:
    size = 4 << 20
    with relay_broker(rate=0) as bp:
        token = new_token(bp.port, "data")
        # A's first bytes ride on its RELAY line, before B even came.
        early = b"early bytes, before RELAYED\n"
        a = relay(bp.port, token, early=early)
        time.sleep(0.2)  # (a must be waiting when b comes: not a wait for a condition)
        b = relay(bp.port, token)
        with a, b:
            assert read_line(a) == b"SSYN1 RELAYED\n"
            assert read_line(b) == b"SSYN1 RELAYED\n"
            a_data, b_data = os.urandom(size), os.urandom(size)
            got: dict[str, tuple[bytes, BaseException | None]] = {}

            def a_side() -> None:
                a.sendall(a_data)
                a.shutdown(socket.SHUT_WR)  # A is done; it still reads B's bytes
                got["a"] = read_to_end(a)

            def b_side() -> None:
                got["b"] = read_to_end(b)  # A's bytes, then A's FIN: EOF
                b.sendall(b_data)  # B talks after A's FIN: the other direction is open
                b.shutdown(socket.SHUT_WR)

            threads = [threading.Thread(target=f) for f in (a_side, b_side)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not any(t.is_alive() for t in threads)
            assert got["b"][1] is None and got["a"][1] is None  # FINs, no resets
            assert hashlib.sha256(got["b"][0]).digest() == hashlib.sha256(
                early + a_data).digest()
            assert hashlib.sha256(got["a"][0]).digest() == hashlib.sha256(b_data).digest()
        end = time.monotonic() + IO_TIMEOUT_S
        while b"reason=closed" not in (line := status(bp.port, token)):
            assert time.monotonic() < end, line
            time.sleep(0.05)
    log = bp.stderr()
    assert re.search(rf"relay {token[:8]}: 127\.0\.0\.1:\d+ <-> 127\.0\.0\.1:\d+: relaying",
                     log), log
    assert re.search(rf"relay {token[:8]}: ended \(closed: both sides finished\): "
                     rf"{len(early) + size} bytes \S+ -> \S+, {size} back", log), log


def test_rate_limit_slows_a_session_down() -> None:
    size = 2_000_000
    with relay_broker(rate=1_000_000) as bp:
        a, b = relayed_pair(bp.port, new_token(bp.port, "slow"))
        with a, b:
            start = time.monotonic()
            threading.Thread(target=lambda: (a.sendall(b"x" * size),
                                             a.shutdown(socket.SHUT_WR)), daemon=True).start()
            data, err = read_to_end(b)
            took = time.monotonic() - start
        assert err is None and len(data) == size
        # 1 MB/s, a bucket of 0.25 s: 2 MB take 1.75 s at least (a lower bound only).
        assert took >= 1.5, took


# --- limits ----------------------------------------------------------------------------


def refused(s: socket.socket) -> bytes:
    with s:
        line = read_line(s)
        assert s.recv(1) == b""
    return line


def test_relay_full_and_relay_busy() -> None:
    with relay_broker(sessions=2, per_ip=1) as bp:
        port = bp.port
        t1 = new_token(port, "s1")
        t2 = new_token(port, "s2")
        t3 = new_token(port, "s3")
        w1 = relay(port, t1, "127.0.1.1")  # waits: 127.0.1.1 takes part in one session
        busy = refused(relay(port, t2, "127.0.1.1"))
        assert busy.startswith(b"SSYN1 ERROR code=relay-busy"), busy
        w2 = relay(port, t2, "127.0.2.1")
        time.sleep(0.2)  # (both must be waiting before the third comes)
        full = refused(relay(port, t3, "127.0.3.1"))
        assert full.startswith(b"SSYN1 ERROR code=relay-full"), full
        # The second side of a waiting session from a busy address is refused too...
        busy2 = refused(relay(port, t1, "127.0.2.1"))
        assert busy2.startswith(b"SSYN1 ERROR code=relay-busy"), busy2
        # ... but one from the same address as its first side, or a free one, is not.
        p1 = relay(port, t1, "127.0.1.1")
        p2 = relay(port, t2, "127.0.4.1")
        with w1, w2, p1, p2:
            for s in (w1, w2, p1, p2):
                assert read_line(s) == b"SSYN1 RELAYED\n"
            echo_check(w1, p1)
            echo_check(p2, w2)
    assert "relay refused to 127.0.3.1" in bp.stderr()


def test_unknown_token_never_issued_reused_or_in_use() -> None:
    with relay_broker() as bp:
        port = bp.port
        line = refused(relay(port, "0" * 32))
        assert line.startswith(b"SSYN1 ERROR code=unknown-token"), line
        assert refused(relay(port, "not-hex")).startswith(b"SSYN1 ERROR code=unknown-token")
        with connect(port) as s:
            s.sendall(b"SSYN1 RELAY\n")  # no token=
            assert read_line(s).startswith(b"SSYN1 ERROR code=bad-request")
        token = new_token(port, "once")
        a, b = relayed_pair(port, token)
        with a, b:
            third = refused(relay(port, token))
            assert third.startswith(b"SSYN1 ERROR code=unknown-token"), third
            assert status(port, token).startswith(b"SSYN1 RELAY_ENDED reason=active")
            echo_check(a, b)  # the third did not disturb the session
            a.shutdown(socket.SHUT_WR)
            b.shutdown(socket.SHUT_WR)
            assert read_to_end(a) == (b"", None) and read_to_end(b) == (b"", None)
        again = refused(relay(port, token))
        assert again.startswith(b"SSYN1 ERROR code=unknown-token"), again
        assert status(port, "f" * 32).startswith(b"SSYN1 RELAY_ENDED reason=unknown")


def test_waiting_side_times_out_and_the_token_stays_usable() -> None:
    with relay_broker(wait_s=0.5) as bp:
        token = new_token(bp.port, "late")
        start = time.monotonic()
        line = refused(relay(bp.port, token))
        took = time.monotonic() - start
        assert line.startswith(b"SSYN1 ERROR code=timeout"), line
        assert 0.4 <= took < 5, took
        a, b = relayed_pair(bp.port, token)  # both in time now
        with a, b:
            echo_check(a, b)


def test_budget_cut_resets_both_while_others_keep_working() -> None:
    with relay_broker(rate=0, budget=1_000_000) as bp:
        port = bp.port
        other_a, other_b = relayed_pair(port, new_token(port, "other"))
        token = new_token(port, "big")
        a, b = relayed_pair(port, token)
        with a, b, other_a, other_b:
            send_err: list[OSError] = []

            def send() -> None:
                try:
                    a.sendall(b"y" * 3_000_000)
                except OSError as exc:  # reset midway: the cut
                    send_err.append(exc)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            got_b, err_b = read_to_end(b)
            got_a, err_a = read_to_end(a)
            sender.join(IO_TIMEOUT_S)
            assert isinstance(err_b, ConnectionResetError), (len(got_b), err_b)
            # A's reset is told once: to its reader, or to its sender (then EOF or EPIPE).
            assert ConnectionResetError in {type(e) for e in [err_a, *send_err]}, (
                len(got_a), err_a, send_err)
            assert len(got_b) <= 1_000_000
            line = status(port, token)
            assert line.startswith(b"SSYN1 RELAY_ENDED reason=budget message="), line
            assert b"1000000_bytes" in line
            # The other relayed session, and a fresh pair, work on.
            echo_check(other_a, other_b, b"still here")
            echo_check(other_b, other_a, b"and back")
            to_a, to_b = pair(port, "fresh", "sync", "sync")
            assert to_a.startswith(b"SSYN1 PEER") and to_b.startswith(b"SSYN1 PEER")
    assert re.search(rf"relay {token[:8]}: ended \(budget: .*1000000 bytes\)", bp.stderr())


def test_idle_session_is_cut() -> None:
    with relay_broker(idle_s=0.5) as bp:
        token = new_token(bp.port, "quiet")
        a, b = relayed_pair(bp.port, token)
        with a, b:
            echo_check(a, b)
            start = time.monotonic()
            _, err = read_to_end(b)
            assert isinstance(err, ConnectionResetError), err
            assert 0.3 < time.monotonic() - start < 5
            assert isinstance(read_to_end(a)[1], ConnectionResetError)
        line = status(bp.port, token)
        assert line.startswith(b"SSYN1 RELAY_ENDED reason=idle message="), line
        assert b"0.5_s" in line


def test_broker_without_relay_says_relay_off() -> None:
    with broker() as bp:
        line = refused(relay(bp.port, "a" * 32))
        assert line.startswith(b"SSYN1 ERROR code=relay-off"), line


def test_a_reader_that_stops_holds_the_sender_back_memory_bounded() -> None:
    """B reads nothing: the broker stops reading A once ~1 MiB waits for B, so A's
    sends block (its bytes stay in the kernels' buffers), and the broker's memory does
    not grow with what A tries to send."""
    from .test_broker_abuse import rss_kb

    with relay_broker(rate=0, budget=0) as bp:
        a, b = relayed_pair(bp.port, new_token(bp.port, "stuck"))
        with a, b:
            rss0 = rss_kb(bp.proc.pid)
            a.settimeout(0.5)
            sent = 0
            chunk = b"z" * (1 << 20)
            end = time.monotonic() + IO_TIMEOUT_S
            with contextlib.suppress(TimeoutError):
                while sent < 200 << 20 and time.monotonic() < end:
                    sent += a.send(chunk)
            grew_mb = (rss_kb(bp.proc.pid) - rss0) / 1024
            # Loopback's socket buffers hold a few MB each (A's send, B's receive, and the
            # broker's two): all of them, plus the relay's ~1.25 MiB, are far below 200 MB.
            print(f"\n[back-pressure] sent {sent / 1e6:.1f} MB, broker RSS +{grew_mb:.1f} MB")
            assert sent < 64 << 20, sent
            assert grew_mb < 16, grew_mb
            # Then B reads: everything A sent arrives, in order and whole.
            a.shutdown(socket.SHUT_WR)
            data, err = read_to_end(b)
            assert err is None and data == b"z" * sent


def test_broker_stop_resets_relayed_sessions() -> None:
    with relay_broker() as bp:
        token = new_token(bp.port, "stop")
        a, b = relayed_pair(bp.port, token)
        with a, b:
            echo_check(a, b)
            bp.proc.terminate()
            assert bp.proc.wait(10) == 0
            assert isinstance(read_to_end(a)[1], ConnectionResetError)
            assert isinstance(read_to_end(b)[1], ConnectionResetError)
    assert f"relay {token[:8]}: ended (shutdown: the broker stopped)" in bp.stderr()


def test_relayed_connections_are_never_evicted_as_idle() -> None:
    """At the broker's connection cap a newcomer evicts an idle connection of the
    network holding the most; relayed ones (here all four of 127.0.5.0/24's) are not
    idle, whatever their silence."""
    cfg = {"relay": {}, "max_connections": 5}
    with broker(argv=[sys.executable, "-c", _LAUNCHER, json.dumps(cfg)]) as bp:
        port = bp.port
        sessions = [relayed_pair(port, new_token(port, f"e{i}", srcs=("127.0.6.1",) * 2),
                                 srcs=(f"127.0.5.{2 * i + 1}", f"127.0.5.{2 * i + 2}"))
                    for i in range(2)]
        newcomers = [connect(port, "127.0.9.1") for _ in range(3)]
        try:
            # One took the last slot; the others found nothing idle to evict.
            closed = 0
            for s in newcomers[1:]:
                s.settimeout(2)
                with contextlib.suppress(ConnectionResetError):
                    closed += s.recv(1) == b""
            assert closed == 2
            for a, b in sessions:
                echo_check(a, b)
                echo_check(b, a)
        finally:
            for s in newcomers + [s for p in sessions for s in p]:
                s.close()
    assert "evicted" not in bp.stderr()


def test_waiting_side_that_resets_frees_the_token() -> None:
    with relay_broker() as bp:
        token = new_token(bp.port, "reset")
        w = relay(bp.port, token)
        time.sleep(0.2)  # (w must be waiting: not a wait for a condition)
        w.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        w.close()  # an RST
        end = time.monotonic() + IO_TIMEOUT_S
        while b"reason=unknown" not in (line := status(bp.port, token)):
            assert time.monotonic() < end, line
            time.sleep(0.05)
        a, b = relayed_pair(bp.port, token)  # a new wait, then a pair
        with a, b:
            echo_check(a, b)
