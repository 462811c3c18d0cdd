"""The relayed chat's move to a direct connection (moving.py), over socket pairs: every
message of a numbered stream delivered once and in order on both sides, whenever the
move comes; a lost, repeated or misplaced message is caught."""

from __future__ import annotations

import io
import os
import socket
import threading
import time

import pytest

from simulsyn_core._internal.exitcodes import ExitStatus
from simulsyn_core._internal.moving import MovingChat, Upgrade, Upgrades
from simulsyn_core._internal.secure import MOVE, NUMBER, NUMBERED, Channel

KEY = bytes(range(32))


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one TCP connection on loopback (the chat sets TCP options)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
    return client, server


def channels(key: bytes = KEY) -> tuple[Channel, Channel]:
    """Both ends' channels for one connection (as after the PAKE: A's message, B's)."""
    a_msg, b_msg = os.urandom(33), os.urandom(33)
    return Channel(key, a_msg, b_msg), Channel(key, b_msg, a_msg)


class Side:
    """One peer's MovingChat in a thread, its stdin a pipe we write numbered lines to."""

    def __init__(self, name: str, relay: socket.socket, channel: Channel,
                 upgrades: Upgrades | None) -> None:
        self.name = name
        self.stdin_r, self.stdin_w = os.pipe()
        self.out = io.StringIO()
        self.events: list[str] = []
        self.moved: list[float] = []
        self.upgrades = upgrades
        self.chat = MovingChat(relay, channel, [], self.stdin_r, self.out, self.events.append,
                               upgrades, lambda: "relay gone",
                               lambda at, upgrade: self.moved.append(at))
        self.status: ExitStatus | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.status = self.chat.run()

    def feed(self, count: int, every_s: float, move_at: int | None = None,
             upgrade: Upgrade | None = None) -> None:
        for i in range(count):
            if i == move_at and upgrade is not None and self.upgrades is not None:
                assert self.upgrades.offer(upgrade)
            os.write(self.stdin_w, f"{self.name} {i}\n".encode())
            time.sleep(every_s)
        os.close(self.stdin_w)

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()


def started_sides() -> tuple[Side, Side, tuple[socket.socket, socket.socket],
                             tuple[Channel, Channel]]:
    """A and B chatting over a relay (a TCP pair), both running; the ends of a direct
    connection and their channels, not handed over yet."""
    relay_a, relay_b = tcp_pair()
    ra, rb = channels()
    a = Side("A", relay_a, ra, Upgrades())
    b = Side("B", relay_b, rb, Upgrades())
    a.thread.start()
    b.thread.start()
    return a, b, tcp_pair(), channels(bytes(32))


def run_pair(count: int, move_at_a: int | None, move_at_b: int | None,
             every_s: float = 0.002) -> tuple[Side, Side]:
    a, b, (direct_a, direct_b), (da, db) = started_sides()
    up_a = Upgrade(direct_a, da, [], "direct-a")
    up_b = Upgrade(direct_b, db, [], "direct-b")
    feeders = [threading.Thread(target=a.feed, args=(count, every_s, move_at_a, up_a)),
               threading.Thread(target=b.feed, args=(count, every_s, move_at_b, up_b))]
    for f in feeders:
        f.start()
    for f in feeders:
        f.join(30)
    for side in (a, b):
        side.thread.join(30)
        assert not side.thread.is_alive(), side.events
        os.close(side.stdin_r)
    return a, b


@pytest.mark.parametrize("move_a, move_b", [(100, 100), (30, 170), (0, 199), (None, None)])
def test_every_message_once_and_in_order_across_the_move(move_a: int | None,
                                                         move_b: int | None) -> None:
    count = 200
    a, b = run_pair(count, move_a, move_b)
    assert (a.status, b.status) == (ExitStatus.OK, ExitStatus.OK), (a.events, b.events)
    assert a.lines() == [f"B {i}" for i in range(count)], a.events
    assert b.lines() == [f"A {i}" for i in range(count)], b.events
    for side, move in ((a, move_a), (b, move_b)):
        assert bool(side.moved) == (move is not None), side.events
        if move is not None:
            # Offered before line ``move`` was written: the move comes at or after it.
            said = [e for e in side.events if e.startswith("moved to the direct")]
            assert len(said) == 1, side.events
            at = int(said[0].split("from #")[1].split()[0])
            assert move <= at <= count, side.events


def test_the_move_after_input_ended_moves_nothing_of_ours() -> None:
    """A's input ends before the direct connection comes: A's messages all went over the
    relay; B's move still reaches A (A reads B's rest over the direct connection)."""
    a, b, (direct_a, direct_b), (da, db) = started_sides()
    a.feed(5, 0.0)
    time.sleep(0.2)
    assert a.upgrades is not None and b.upgrades is not None
    a.upgrades.offer(Upgrade(direct_a, da, [], "direct-a"))
    b.feed(10, 0.01, move_at=3, upgrade=Upgrade(direct_b, db, [], "direct-b"))
    for side in (a, b):
        side.thread.join(30)
        os.close(side.stdin_r)
    assert (a.status, b.status) == (ExitStatus.OK, ExitStatus.OK), (a.events, b.events)
    assert a.lines() == [f"B {i}" for i in range(10)]
    assert b.lines() == [f"A {i}" for i in range(5)]
    assert not a.moved and b.moved


def _raw_peer(records: list[bytes]) -> tuple[Side, socket.socket]:
    relay_a, relay_b = tcp_pair()
    ra, rb = channels()
    a = Side("A", relay_a, ra, None)
    a.thread.start()
    os.close(a.stdin_w)
    relay_b.sendall(b"".join(rb.seal(NUMBERED, NUMBER.pack(n) + b"x") if kind == NUMBERED
                             else rb.seal(kind, NUMBER.pack(n)) for kind, n in records))
    return a, relay_b


@pytest.mark.parametrize("records, status, said", [
    ([(NUMBERED, 0), (NUMBERED, 2)], ExitStatus.TAMPERED, "#2 came when #1 was due"),
    ([(NUMBERED, 0), (MOVE, 3)], ExitStatus.TAMPERED, "moved at message #3, #1 was due"),
])
def test_a_lost_or_misplaced_message_is_caught(records: list[tuple[int, int]],
                                               status: ExitStatus, said: str) -> None:
    a, peer = _raw_peer(records)
    a.thread.join(10)
    peer.close()
    os.close(a.stdin_r)
    assert a.status == status, a.events
    assert any(said in e for e in a.events), a.events


def test_a_repeated_message_is_dropped_and_said() -> None:
    a, peer = _raw_peer([(NUMBERED, 0), (NUMBERED, 1), (NUMBERED, 1), (NUMBERED, 2)])
    time.sleep(0.3)
    peer.close()  # no END: truncated, but the duplicate was dropped first
    a.thread.join(10)
    os.close(a.stdin_r)
    assert a.lines() == ["x", "x", "x"]
    assert any("#1 came again: dropped" in e for e in a.events), a.events


def test_a_move_to_a_direct_connection_that_never_comes_here_is_bounded(monkeypatch) -> None:
    """A moved (it has the direct connection), B's end never comes up: B gives up after
    DIRECT_WAIT_S with PEER_LOST, it does not hang."""
    monkeypatch.setattr("simulsyn_core._internal.moving.DIRECT_WAIT_S", 1.0)
    a, b, (direct_a, direct_b), (da, _) = started_sides()
    feeder = threading.Thread(target=a.feed, args=(3, 0.01, 1, Upgrade(direct_a, da, [], "d")))
    feeder.start()
    started = time.monotonic()
    b.thread.join(10)
    assert not b.thread.is_alive() and time.monotonic() - started < 5
    assert b.status == ExitStatus.PEER_LOST, b.events
    assert any("did not come up here" in e for e in b.events), b.events
    os.close(b.stdin_w)
    feeder.join(5)
    a.thread.join(10)
    direct_b.close()
    for side in (a, b):
        os.close(side.stdin_r)


def _app_engine(relay: socket.socket, channel: Channel, upgrades: Upgrades,
                moved: list[float]) -> tuple[socket.socket, MovingChat, threading.Thread]:
    """The library's moving session (app mode): our end of the app's socketpair, the
    engine, its thread (running)."""
    ours, theirs = socket.socketpair()
    engine = MovingChat(relay, channel, [], 0, None, lambda text: None, upgrades,
                        lambda: "relay gone", lambda at, up: moved.append(at), app=theirs)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    return ours, engine, thread


@pytest.mark.parametrize("move_after", [0, 300_000, 2_000_000])
def test_a_byte_stream_moves_without_loss_or_reorder(move_after: int) -> None:
    """App mode (the library's relayed Connection): 3 MB each way as a byte stream, the
    direct connection handed over after ``move_after`` bytes were written on each side:
    both sides read exactly what the other wrote, and both moved."""
    relay_a, relay_b = tcp_pair()
    ra, rb = channels()
    direct_a, direct_b = tcp_pair()
    da, db = channels(bytes(32))
    ups = (Upgrades(), Upgrades())
    moved: tuple[list[float], list[float]] = ([], [])
    app_a, eng_a, th_a = _app_engine(relay_a, ra, ups[0], moved[0])
    app_b, eng_b, th_b = _app_engine(relay_b, rb, ups[1], moved[1])
    size = 3_000_000
    data = {"a": os.urandom(size), "b": os.urandom(size)}
    got: dict[str, bytearray] = {"a": bytearray(), "b": bytearray()}

    def write(app: socket.socket, blob: bytes, upgrades: Upgrades, up: Upgrade) -> None:
        app.sendall(blob[:move_after])
        assert upgrades.offer(up)
        app.sendall(blob[move_after:])
        app.shutdown(socket.SHUT_WR)

    def read(app: socket.socket, into: bytearray) -> None:
        while chunk := app.recv(65536):
            into += chunk

    threads = [threading.Thread(target=write, args=(app_a, data["a"], ups[0],
                                                    Upgrade(direct_a, da, [], "a"))),
               threading.Thread(target=write, args=(app_b, data["b"], ups[1],
                                                    Upgrade(direct_b, db, [], "b"))),
               threading.Thread(target=read, args=(app_a, got["a"])),
               threading.Thread(target=read, args=(app_b, got["b"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    for t in (th_a, th_b):
        t.join(30)
        assert not t.is_alive()
    assert bytes(got["a"]) == data["b"] and bytes(got["b"]) == data["a"]
    assert (eng_a.status, eng_b.status) == (None, None), (eng_a.failure, eng_b.failure)
    assert moved[0] and moved[1]
    app_a.close()
    app_b.close()


def test_an_abandoned_byte_stream_resets_the_relay() -> None:
    relay_a, relay_b = tcp_pair()
    ra, _ = channels()
    app_a, eng_a, th_a = _app_engine(relay_a, ra, Upgrades(), [])
    eng_a.abandon()
    th_a.join(10)
    assert not th_a.is_alive() and eng_a.status == ExitStatus.PEER_LOST
    relay_b.settimeout(5)
    with pytest.raises(ConnectionResetError):
        while relay_b.recv(65536):
            pass
    relay_b.close()
    app_a.close()
