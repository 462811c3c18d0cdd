"""Brokers sharing their sessions through Redis (broker --redis; docs/protocol.md,
"Scaling out on Redis"): a real redis-server and two or three broker processes on
loopback, all started and stopped here."""

from __future__ import annotations

import contextlib
import errno
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from simulsyn_core._internal.birthday import Offer
from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.rendezvous import Facts
from simulsyn_core._internal.shared import Entry

from .helpers import SYNPROBE, RedisServer, read_line, wait_for_stderr
from .helpers import stop_process as stop

redis = pytest.importorskip("redis")
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (scripts/setup.sh)")
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
READ_TIMEOUT_S = 5.0
ALIVE_GONE_S = 6.0  # a killed broker's alive key expires (shared.ALIVE_TTL_S) within this


@dataclass
class BrokerProc:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def brokers(tmp_path: Path, url: str, n: int, *extra: str) -> Iterator[list[BrokerProc]]:
    """``n`` brokers on 127.0.0.1 sharing ``url``; each stopped (and reaped) at the end."""
    started: list[BrokerProc] = []
    try:
        for i in range(n):
            log = tmp_path / f"broker{i}-{time.monotonic_ns()}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen([*SYNPROBE, "broker", "--bind", "127.0.0.1:0",
                                         "--redis", url, *extra], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=out)
            started.append(BrokerProc(proc, 0, log))  # stopped below even if it never listens
            end = time.monotonic() + 15
            while not started[-1].port:
                assert proc.poll() is None, f"broker exited: {log.read_text()}"
                assert time.monotonic() < end, f"broker did not listen: {log.read_text()}"
                m = LISTENING.search(log.read_text(errors="replace"))
                started[-1].port = int(m.group(1)) if m else 0
                time.sleep(0.02)
        yield started
    finally:
        for b in started:
            stop(b.proc)


def register(port: int, session: str, **fields: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S)
    more = "".join(f" {k}={v}" for k, v in fields.items())
    s.sendall(f"SSYN1 REGISTER session={session}{more}\n".encode())
    return s


def fields(line: bytes) -> dict[str, str]:
    return dict(p.split("=", 1) for p in line.decode().split()[2:])


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert server.proc is None


def test_entry_round_trip() -> None:
    """What one broker stores is what another reads back (and nothing else passes)."""
    facts = Facts(frozenset({"prime", "birthday"}), "varies", "drop", "pass",
                  Offer(sockets=64, port_range=(1024, 65535)))
    entry = Entry("ab12", 7, "#12", Endpoint("198.51.100.4", 4000),
                  Endpoint("10.0.0.2", 5000), facts)
    assert Entry.decode(entry.encode()) == entry
    for bad in ("", "ab12 1.2.3.4:5 {", "ab12 1.2.3.4:5 []", "ab12 1.2.3.4:5 {\"c\":1}"):
        with pytest.raises(ValueError):
            Entry.decode(bad)


def test_peers_at_two_brokers_are_paired_with_prime(tmp_path: Path, redis_server) -> None:
    """A at broker 1, B at broker 2: both get PEER with the other's endpoint, then the
    PRIMED -> GO exchange crosses the brokers (the pair is decided at broker 2)."""
    with brokers(tmp_path, redis_server.url, 2) as (b1, b2):
        a = register(b1.port, "cross", strategies="prime")
        assert read_line(a).startswith(b"SSYN1 REGISTERED session=cross")
        b = register(b2.port, "cross", strategies="prime")
        peer_b, peer_a = fields(read_line(b)), fields(read_line(a))
        assert peer_a["peer"] == peer_b["public"] and peer_b["peer"] == peer_a["public"]
        assert peer_a["strategy"] == peer_b["strategy"] == "prime"
        assert {peer_a["role"], peer_b["role"]} == {"first", "second"}
        a.sendall(b"SSYN1 PRIMED\n")
        b.sendall(b"SSYN1 PRIMED\n")
        assert read_line(a) == b"SSYN1 GO session=cross\n"
        assert read_line(b) == b"SSYN1 GO session=cross\n"
        assert read_line(a) == b"" and read_line(b) == b""  # closed after GO
        # A third client of that session waits: nobody is paired twice.
        c = register(b1.port, "cross")
        assert read_line(c).startswith(b"SSYN1 REGISTERED")
        for s in (a, b, c):
            s.close()


def test_a_peer_that_leaves_the_exchange_is_told_across_brokers(tmp_path: Path,
                                                                redis_server) -> None:
    with brokers(tmp_path, redis_server.url, 2) as (b1, b2):
        a = register(b1.port, "gone", strategies="prime")
        read_line(a)
        b = register(b2.port, "gone", strategies="prime")
        read_line(b)
        read_line(a)
        a.close()  # at broker 1; the pair is held by broker 2
        assert read_line(b).startswith(b"SSYN1 ERROR code=peer-gone")
        b.close()


def test_relay_is_at_the_deciding_broker(tmp_path: Path, redis_server) -> None:
    """Both peers are sent to one relay (PEER relay_at=): the broker that issued the
    token, which joins them."""
    with brokers(tmp_path, redis_server.url, 2, "--relay") as (b1, b2):
        a = register(b1.port, "relayed", strategies="relay", mapping="varies")
        read_line(a)
        b = register(b2.port, "relayed", strategies="relay", mapping="varies")
        peer_b, peer_a = fields(read_line(b)), fields(read_line(a))
        assert peer_a["strategy"] == "relay" and peer_a["relay"] == peer_b["relay"]
        assert peer_a["relay_at"] == peer_b["relay_at"] == f"127.0.0.1:{b2.port}"
        at = Endpoint.parse(peer_a["relay_at"])
        sides = [socket.create_connection((at.ip, at.port), timeout=READ_TIMEOUT_S)
                 for _ in range(2)]
        for s in sides:
            s.sendall(f"SSYN1 RELAY token={peer_a['relay']}\n".encode())
        for s in sides:
            assert read_line(s).startswith(b"SSYN1 RELAYED")
        sides[0].sendall(b"hello")
        assert sides[1].recv(5) == b"hello"
        for s in (a, b, *sides):
            s.close()


def test_a_broker_killed_mid_wait_loses_only_its_own_clients(tmp_path: Path,
                                                             redis_server) -> None:
    with brokers(tmp_path, redis_server.url, 3) as (b1, b2, b3):
        lost = register(b1.port, "lost")
        stale = register(b1.port, "stale")
        kept = register(b2.port, "kept")
        assert read_line(lost).startswith(b"SSYN1 REGISTERED")
        assert read_line(stale).startswith(b"SSYN1 REGISTERED")
        assert read_line(kept).startswith(b"SSYN1 REGISTERED")
        stop(b1.proc, kill=True)  # SIGKILL: no goodbye to Redis
        assert read_line(lost) == b"" and read_line(stale) == b""  # died with it
        dead = re.search(r"broker id ([0-9a-f]+)", b1.text())
        assert dead is not None
        store = redis.Redis.from_url(redis_server.url, socket_timeout=2)
        try:  # Redis has seen the dead broker's connections close (bounded)
            end = time.monotonic() + 5
            while store.pubsub_numsub(f"ssyn:broker:{dead.group(1)}")[0][1]:
                assert time.monotonic() < end
                time.sleep(0.05)
            assert store.exists(f"ssyn:alive:{dead.group(1)}")  # (still alive for Redis)
        finally:
            store.close()
        # A peer of the dead broker's client is not paired with a dead connection: its
        # broker sees nobody listening on the dead broker's channel, and it waits.
        early = register(b3.port, "lost")
        assert read_line(early).startswith(b"SSYN1 REGISTERED")
        early.close()
        joined = register(b3.port, "kept")  # the other brokers' clients are untouched
        pj, pk = fields(read_line(joined)), fields(read_line(kept))
        assert pj["peer"] == pk["public"] and pk["peer"] == pj["public"]
        # Once the dead broker's alive key has expired, its clients' entries are stale:
        # a late peer is never paired with a dead connection, it waits itself.
        store = redis.Redis.from_url(redis_server.url, socket_timeout=2)
        try:
            end = time.monotonic() + ALIVE_GONE_S
            while len(store.keys("ssyn:alive:*")) != 2:
                assert time.monotonic() < end, store.keys("ssyn:alive:*")
                time.sleep(0.1)
            assert store.exists("ssyn:s:stale")  # still there: stale, not yet expired
        finally:
            store.close()
        late = register(b2.port, "stale")
        assert read_line(late).startswith(b"SSYN1 REGISTERED")
        for s in (lost, stale, kept, joined, late):
            s.close()


def test_redis_stopped_and_started_again(tmp_path: Path, redis_server) -> None:
    """Redis down: one log line a broker, ERROR code=unavailable to new registrations;
    back: registrations resume by themselves, and a client that waited through the
    outage (its entry stored again) is still found."""
    with brokers(tmp_path, redis_server.url, 2) as (b1, b2):
        waiting = register(b1.port, "through")
        assert read_line(waiting).startswith(b"SSYN1 REGISTERED")
        redis_server.stop()
        for i in range(5):
            s = register(b2.port, f"during{i}")
            assert read_line(s).startswith(b"SSYN1 ERROR code=unavailable"), i
            s.close()
        redis_server.start()
        end = time.monotonic() + 10
        while True:
            s = register(b2.port, "after")
            line = read_line(s)
            s.close()
            if line.startswith(b"SSYN1 REGISTERED"):
                break
            assert line.startswith(b"SSYN1 ERROR code=unavailable"), line
            assert time.monotonic() < end, "registrations did not resume"
            time.sleep(0.2)
        # The peer comes and stays: whether b1 has stored its waiting client again yet
        # (the joiner takes it) or not (b1's restore finds the joiner), they are paired.
        joiner = register(b2.port, "through")
        joiner.settimeout(READ_TIMEOUT_S)
        line = read_line(joiner)
        if line.startswith(b"SSYN1 REGISTERED"):
            line = read_line(joiner)
        assert line.startswith(b"SSYN1 PEER"), f"the waiting client was lost: {line!r}"
        assert read_line(waiting).startswith(b"SSYN1 PEER")
        waiting.close()
        joiner.close()
        for b in (b1, b2):
            end = time.monotonic() + 5.0  # the log is written by a batching thread
            while "reachable again" not in (text := b.text()) and time.monotonic() < end:
                time.sleep(0.05)
            assert text.count("unreachable") == 1, text
            assert "reachable again" in text, text
            assert "Traceback" not in text, text
        redis_server.stop()  # and a broker stops on SIGTERM (exit 0) with Redis gone
        time.sleep(1.5)
        for b in (b1, b2):
            stop(b.proc)
            assert b.proc.returncode == 0, b.text()


def wait_in_log(text: str, *logs: BrokerProc, within_s: float = 5.0) -> None:
    """``text`` in the log of one of ``logs`` (bounded: each log is written by a batching
    thread)."""
    end = time.monotonic() + within_s
    while not any(text in b.text() for b in logs):
        assert time.monotonic() < end, f"{text!r} in no log: " + "\n".join(
            b.text() for b in logs)
        time.sleep(0.05)


def test_a_client_that_registered_during_the_restore_is_paired(tmp_path: Path,
                                                               redis_server) -> None:
    """Redis restarted empty: before b1 stores its waiting client again, the peer
    registers on b2 and waits there. b1's restore finds it and pairs the two (before:
    b1's SET NX failed quietly and both waited for each other until they gave up).
    b1 is stopped (SIGSTOP) from the outage until the peer waits, so that it cannot
    restore first: the joiner waits in Redis before b1's entry is back."""
    with brokers(tmp_path, redis_server.url, 2) as (b1, b2):
        waiting = register(b1.port, "meanwhile")
        assert read_line(waiting).startswith(b"SSYN1 REGISTERED")
        redis_server.stop()
        wait_in_log("unreachable", b1)  # b1 knows its entries went with Redis
        b1.proc.send_signal(signal.SIGSTOP)
        try:
            redis_server.start()
            end = time.monotonic() + 10
            while True:
                joiner = register(b2.port, "meanwhile")
                line = read_line(joiner)
                if not line.startswith(b"SSYN1 ERROR code=unavailable"):
                    break
                joiner.close()
                assert time.monotonic() < end, "registrations did not resume"
                time.sleep(0.1)
            assert line.startswith(b"SSYN1 REGISTERED"), line  # b1's entry is not there
        finally:
            b1.proc.send_signal(signal.SIGCONT)
        joiner.settimeout(READ_TIMEOUT_S)
        waiting.settimeout(READ_TIMEOUT_S)
        assert read_line(joiner).startswith(b"SSYN1 PEER")
        assert read_line(waiting).startswith(b"SSYN1 PEER")
        # Decided by a restore: b1's (its entry met the joiner's), or b2's (b2 had the
        # outage too, and stores its joiner again on its own next tick).
        wait_in_log("session meanwhile: paired after Redis came back", b1, b2)
        joiner.close()
        waiting.close()


def plain_punch(port: int, session: str) -> subprocess.Popen[bytes]:
    """A verbose plain punch at the broker on ``port`` (its stderr piped)."""
    return subprocess.Popen([*SYNPROBE, "punch", "--broker", f"127.0.0.1:{port}",
                             "--session", session, "--plain", "--no-nat-check",
                             "--timeout", "20", "-v"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_the_punch_registers_again_while_the_broker_is_unavailable(
        tmp_path: Path, redis_server) -> None:
    with brokers(tmp_path, redis_server.url, 1) as (b1,):
        redis_server.stop()
        proc = plain_punch(b1.port, "retry")
        try:
            wait_for_stderr(proc, "registering again in 0.5 s", 10)
            redis_server.start()
            wait_for_stderr(proc, "waiting for the peer", 15)
        finally:
            stop(proc)


def test_no_other_program_gets_the_punch_port_while_it_waits_to_register_again(
        tmp_path: Path, redis_server) -> None:
    """Between two registrations no connection of the punch is on its port: it stays
    bound all the same, so that a parallel bind(0) or connect() is not handed it (the
    next registration then ended the run with EADDRINUSE)."""
    with brokers(tmp_path, redis_server.url, 1) as (b1,):
        redis_server.stop()
        proc = plain_punch(b1.port, "held")
        try:
            seen = wait_for_stderr(proc, "registering again in 0.5 s", 10)
            m = re.search(r"local port (\d+) \(bound", seen)
            assert m, seen
            with socket.socket() as other, pytest.raises(OSError) as taken:
                other.bind(("127.0.0.1", int(m.group(1))))
            assert taken.value.errno == errno.EADDRINUSE
            redis_server.start()
            wait_for_stderr(proc, "waiting for the peer", 15)
        finally:
            stop(proc)


def test_bad_redis_url_is_a_clear_error() -> None:
    proc = subprocess.run([*SYNPROBE, "broker", "--bind", "127.0.0.1:0", "--redis",
                           "http://nowhere"], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2 and "Invalid value for --redis" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_broker_without_redis_does_not_import_it() -> None:
    code = ("import sys, simulsyn_core._internal.broker, synprobe.cli; "
            "sys.exit('redis' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=20).returncode == 0


# --- load: 10 000 sessions over 3 brokers, every PEER counted -------------------------

LOAD_SESSIONS = 10_000
LOAD_BATCH = 200  # sessions in flight at once (400 connections)
LOAD_TIMEOUT_S = 60.0


def _source(i: int) -> str:
    """A loopback source address per client, spread over 250 /24s: the brokers' rate
    limits per address and per network (README "Broker limits") stay as they are."""
    return f"127.{1 + i % 250}.{(i // 250) % 250 + 1}.{i % 97 + 1}"


def test_no_session_paired_twice_or_lost_under_load(tmp_path: Path, redis_server) -> None:
    """10 000 sessions, each peer at a different broker of three (A at broker i % 3, B at
    (i + 1) % 3): every client gets exactly one PEER, naming its own session and its
    peer's endpoint."""
    with brokers(tmp_path, redis_server.url, 3) as procs:
        ports = [b.port for b in procs]
        peers = 0
        started = time.monotonic()
        for base in range(0, LOAD_SESSIONS, LOAD_BATCH):
            peers += _load_batch(ports, range(base, min(base + LOAD_BATCH, LOAD_SESSIONS)),
                                 started + LOAD_TIMEOUT_S)
        elapsed = time.monotonic() - started
        print(f"\n{LOAD_SESSIONS} sessions over 3 brokers: {peers} PEER lines in "
              f"{elapsed:.1f} s ({LOAD_SESSIONS / elapsed:.0f} pairs/s)")
        assert peers == 2 * LOAD_SESSIONS


def _load_batch(ports: list[int], sessions: range, deadline: float) -> int:
    """Register both sides of each session (A first, then B) and read every line; returns
    the PEER lines seen, asserting each is the only one of its client and right."""
    sel = selectors.DefaultSelector()
    socks: dict[socket.socket, tuple[str, str]] = {}  # -> (session, side)
    got: dict[tuple[str, str], dict[str, str]] = {}
    buffers: dict[socket.socket, bytes] = {}
    registered: set[socket.socket] = set()
    try:
        for side in "ab":
            for i in sessions:
                s = socket.socket()
                s.bind((_source(2 * i + (side == "b")), 0))
                s.connect(("127.0.0.1", ports[(i + (side == "b")) % 3]))
                s.sendall(f"SSYN1 REGISTER session=load{i}\n".encode())
                s.setblocking(False)
                socks[s] = (f"load{i}", side)
                buffers[s] = b""
                sel.register(s, selectors.EVENT_READ)
            if side == "a":  # every A waits before its B comes: read the REGISTERED lines
                _drain(sel, socks, buffers, got, registered, deadline,
                       until=lambda: len(registered) == len(sessions))
        _drain(sel, socks, buffers, got, registered, deadline, until=lambda: not sel.get_map())
    finally:
        for s in socks:
            s.close()
        sel.close()
    peers = 0
    for i in sessions:
        a, b = got.get((f"load{i}", "a")), got.get((f"load{i}", "b"))
        assert a is not None and b is not None, (i, a, b)
        assert a["session"] == b["session"] == f"load{i}"
        assert a["peer"] == b["public"] and b["peer"] == a["public"], (a, b)
        peers += 2
    return peers


def _drain(sel: selectors.BaseSelector, socks: dict[socket.socket, tuple[str, str]],
           buffers: dict[socket.socket, bytes], got: dict[tuple[str, str], dict[str, str]],
           registered: set[socket.socket], deadline: float, until: Callable[[], bool]
           ) -> None:
    while not until():
        assert time.monotonic() < deadline, "the load did not finish in time"
        for key, _ in sel.select(min(1.0, max(0.0, deadline - time.monotonic()))):
            s: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                chunk = s.recv(4096)
            except BlockingIOError:
                continue
            buffers[s] += chunk
            *lines, buffers[s] = buffers[s].split(b"\n")
            for line in lines:
                verb = line.split(b" ")[1]
                if verb == b"PEER":
                    assert socks[s] not in got, f"{socks[s]} got a second PEER"
                    got[socks[s]] = fields(line)
                else:
                    assert verb == b"REGISTERED", line
                    registered.add(s)
            if not chunk:
                sel.unregister(s)


def test_ipv6_codes_are_shared_and_numbered_apart(tmp_path: Path, redis_server) -> None:
    """Two brokers on Redis, each also on [::1]: an IPv6 client's new code is joined over
    IPv6 at the other broker; IPv4 numbers its codes on its own (the same number 1 is
    handed out to both families at once, and each pairs within its family)."""
    with brokers(tmp_path, redis_server.url, 2, "--bind", "[::1]:0") as (b1, b2):
        ports6 = []
        for b in (b1, b2):
            m = re.search(r"listening on \[::1\]:(\d+)", b.text())
            assert m is not None, b.text()
            ports6.append(int(m.group(1)))
        a6 = socket.create_connection(("::1", ports6[0]), timeout=READ_TIMEOUT_S)
        a6.sendall(b"SSYN1 REGISTER nameplate=new\n")
        registered = fields(read_line(a6))
        assert registered["public"].startswith("[::1]:"), registered
        a4 = socket.create_connection(("127.0.0.1", b1.port), timeout=READ_TIMEOUT_S)
        a4.sendall(b"SSYN1 REGISTER nameplate=new\n")
        number = fields(read_line(a4))["nameplate"]
        assert number == registered["nameplate"] == "1"  # numbered apart
        b6 = socket.create_connection(("::1", ports6[1]), timeout=READ_TIMEOUT_S)
        b6.sendall(f"SSYN1 REGISTER nameplate={number}\n".encode())
        pb, pa = fields(read_line(b6)), fields(read_line(a6))
        assert pa["peer"] == pb["public"] and pb["peer"] == pa["public"], (pa, pb)
        assert pa["peer"].startswith("[::1]:") and pb["peer"].startswith("[::1]:")
        b4 = socket.create_connection(("127.0.0.1", b2.port), timeout=READ_TIMEOUT_S)
        b4.sendall(f"SSYN1 REGISTER nameplate={number}\n".encode())
        pb4, pa4 = fields(read_line(b4)), fields(read_line(a4))
        assert pa4["peer"] == pb4["public"] and pa4["peer"].startswith("127.0.0.1:")
        for s in (a6, b6, a4, b4):
            s.close()


def test_codes_are_shared_and_bad_bus_messages_are_ignored(tmp_path: Path,
                                                           redis_server) -> None:
    """A code handed out at one broker is joined at another; messages on a broker's
    channel that are not ours are logged and ignored, and it keeps serving."""
    with brokers(tmp_path, redis_server.url, 2) as (b1, b2):
        bid = re.search(r"broker id ([0-9a-f]+)", b1.text())
        assert bid is not None
        store = redis.Redis.from_url(redis_server.url, socket_timeout=2)
        try:
            for junk in ("not json", "[1]", '{"op":"reply"}', '{"op":"step","conn":"x"}',
                         '{"op":"launch","conn":1}'):
                assert store.publish(f"ssyn:broker:{bid.group(1)}", junk) == 1
        finally:
            store.close()
        a = socket.create_connection(("127.0.0.1", b1.port), timeout=READ_TIMEOUT_S)
        a.sendall(b"SSYN1 REGISTER nameplate=new\n")
        number = fields(read_line(a))["nameplate"]
        b = socket.create_connection(("127.0.0.1", b2.port), timeout=READ_TIMEOUT_S)
        b.sendall(f"SSYN1 REGISTER nameplate={number}\n".encode())
        pb, pa = fields(read_line(b)), fields(read_line(a))
        assert pa["peer"] == pb["public"] and pb["peer"] == pa["public"]
        assert pa["nameplate"] == pb["nameplate"] == number
        c = socket.create_connection(("127.0.0.1", b2.port), timeout=READ_TIMEOUT_S)
        c.sendall(b"SSYN1 REGISTER nameplate=new\n")  # the number is free again
        assert fields(read_line(c))["nameplate"] == number
        for s in (a, b, c):
            s.close()
        # The log is written by a batching thread: wait for its lines (bounded).
        end = time.monotonic() + 5.0
        while (text := b1.text()).count("ignored a") < 4 and time.monotonic() < end:
            time.sleep(0.05)
        assert text.count("ignored a") >= 4 and "Traceback" not in text, text


def test_advertise_needs_redis() -> None:
    proc = subprocess.run([*SYNPROBE, "broker", "--bind", "127.0.0.1:0", "--advertise",
                           "192.0.2.1:8086"], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2 and "--advertise is for --redis" in proc.stderr, proc.stderr


def test_the_same_endpoint_registering_again_at_another_broker_replaces_itself(
        tmp_path: Path, redis_server) -> None:
    """A client that restarts (the same public endpoint) and reaches another broker
    replaces its old registration: the old one is told, the new one is paired."""
    with brokers(tmp_path, redis_server.url, 2) as (b1, b2):
        old, new = socket.socket(), socket.socket()
        for s in (old, new):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.settimeout(READ_TIMEOUT_S)
        old.bind(("127.0.0.1", 0))
        new.bind(old.getsockname())
        old.connect(("127.0.0.1", b1.port))
        old.sendall(b"SSYN1 REGISTER session=again\n")
        assert read_line(old).startswith(b"SSYN1 REGISTERED")
        new.connect(("127.0.0.1", b2.port))
        new.sendall(b"SSYN1 REGISTER session=again\n")
        assert read_line(new).startswith(b"SSYN1 REGISTERED")
        assert read_line(old).startswith(b"SSYN1 ERROR code=replaced")
        peer = register(b1.port, "again")
        assert fields(read_line(peer))["peer"] == fields(read_line(new))["public"]
        for s in (old, new, peer):
            s.close()
