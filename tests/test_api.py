"""simulsyn_core's public API on loopback (docs/api.md): each documented exception
provoked, the Connection's byte stream, the docs' examples run as written."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import simulsyn_core
from simulsyn_core import aio
from simulsyn_core._internal.codes import make_words
from simulsyn_core._internal.exitcodes import ExitStatus
from simulsyn_core._internal.secure import DATA, END, Channel, Tampered
from simulsyn_core._internal.session import Established, PunchReport
from tests.helpers import scapy_modules_after

ROOT = Path(__file__).resolve().parent.parent
RUN_LIMIT_S = 60.0


class LoopBroker:
    """A public Broker served by an event loop in a thread of its own."""

    def __init__(self, relay: bool = False) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.broker = simulsyn_core.Broker(["127.0.0.1:0"], relay=relay)
        asyncio.run_coroutine_threadsafe(self.broker.start(), self.loop).result(10)
        self.address = self.broker.addresses[0]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.broker.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.loop.close()


@pytest.fixture
def broker() -> Iterator[LoopBroker]:
    # Both peers on one host: their SYNs cross no NAT, and the first one meets a port
    # that does not listen (an RST) before the other side's connect() is out; the punch
    # usually fails there, and the relay carries the session.
    b = LoopBroker(relay=True)
    yield b
    b.close()


def open_sockets() -> set[str]:
    """This process's sockets, as /proc/self/fd names them (``socket:[inode]``)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:"):
                found.add(target)
    return found


def assert_none_left(before: set[str], wait_s: float = 5.0) -> None:
    """No socket beyond ``before`` (the in-process broker closes its side of each client
    connection a moment after the client: polled, bounded)."""
    end = time.monotonic() + wait_s
    while (left := open_sockets() - before) and time.monotonic() < end:
        time.sleep(0.05)
    assert not left, f"sockets left open: {sorted(left)}"


def both(first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
    """Run two sides at once; each one's result or exception."""
    results: list[Any] = [None, None]

    def run(i: int, side: Callable[[], Any]) -> None:
        try:
            results[i] = side()
        except BaseException as exc:  # noqa: B036  # handed to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in
               enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RUN_LIMIT_S)
        assert not t.is_alive(), "a side hung"
    return results[0], results[1]


def test_public_names_resolve_and_are_typed() -> None:
    for name in simulsyn_core.__all__:
        assert getattr(simulsyn_core, name) is not None
    assert (ROOT / "src/simulsyn_core/py.typed").exists()
    with pytest.raises(AttributeError):
        simulsyn_core.session_table  # noqa: B018


def test_importing_the_api_loads_no_scapy() -> None:
    assert scapy_modules_after("import simulsyn_core; simulsyn_core.connect; "
                               "simulsyn_core.Broker; from simulsyn_core import aio") == []


def test_exceptions_carry_the_cli_exit_codes() -> None:
    table = {simulsyn_core.BrokerUnreachable: ExitStatus.BROKER_UNREACHABLE,
             simulsyn_core.NoPeer: ExitStatus.NO_PEER,
             simulsyn_core.PunchFailed: ExitStatus.PUNCH_FAILED,
             simulsyn_core.AddressInUse: ExitStatus.ADDRESS_IN_USE,
             simulsyn_core.PeerLost: ExitStatus.PEER_LOST,
             simulsyn_core.AuthFailed: ExitStatus.AUTH_FAILED,
             simulsyn_core.Tampered: ExitStatus.TAMPERED}
    for cls, status in table.items():
        assert issubclass(cls, simulsyn_core.SimulsynError)
        assert cls.exit_code == status


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="session=, code=, or on_code="):
        simulsyn_core.connect("127.0.0.1:1")
    with pytest.raises(ValueError, match="strategy"):
        simulsyn_core.connect("127.0.0.1:1", "s", strategy="fast")
    with pytest.raises(ValueError, match="code"):
        simulsyn_core.connect("127.0.0.1:1", code="not a code")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_broker_unreachable() -> None:
    with pytest.raises(simulsyn_core.BrokerUnreachable) as info:
        simulsyn_core.connect(f"127.0.0.1:{_closed_port()}", "nobody", timeout=3)
    assert info.value.report is not None and info.value.report.exit_code == 3


def test_no_peer(broker: LoopBroker) -> None:
    before = open_sockets()
    started = time.monotonic()
    with pytest.raises(simulsyn_core.NoPeer):
        simulsyn_core.connect(broker.address, "alone", timeout=1.5)
    assert time.monotonic() - started < 10
    assert_none_left(before)


def test_address_in_use(broker: LoopBroker) -> None:
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        with pytest.raises(simulsyn_core.AddressInUse):
            simulsyn_core.connect(broker.address, "busy", timeout=3,
                                  local_port=listener.getsockname()[1])


def test_punch_failed_when_only_the_relay_may_carry_it() -> None:
    broker = LoopBroker(relay=False)
    before = open_sockets()

    def side() -> Any:
        return simulsyn_core.connect(broker.address, "norelay", relay="only", timeout=10)

    try:
        a, b = both(side, side)
    finally:
        broker.close()
    assert isinstance(a, simulsyn_core.PunchFailed), a
    assert isinstance(b, simulsyn_core.PunchFailed), b
    assert_none_left(before)


def test_auth_failed_with_a_wrong_code(broker: LoopBroker) -> None:
    before = open_sockets()
    codes: list[str] = []

    def alice() -> Any:
        return simulsyn_core.connect(broker.address, on_code=codes.append, timeout=15)

    def bob() -> Any:
        end = time.monotonic() + 10
        while not codes and time.monotonic() < end:
            time.sleep(0.02)
        number, words = codes[0].split("-", 1)
        other = next(w for w in iter(make_words, None) if w != words)  # valid, not alice's
        return simulsyn_core.connect(broker.address, code=f"{number}-{other}", timeout=15)

    a, b = both(alice, bob)
    assert isinstance(a, simulsyn_core.AuthFailed), a
    assert isinstance(b, simulsyn_core.AuthFailed), b
    assert_none_left(before)


def test_a_code_connects_and_carries_bytes_both_ways(broker: LoopBroker) -> None:
    codes: list[str] = []
    payload = bytes(range(256)) * 300  # several records, not lines

    def alice() -> Any:
        with simulsyn_core.connect(broker.address, on_code=codes.append, timeout=15) as c:
            c.sendall(payload)
            c.shutdown_write()
            return c.recv(), c.verifier, c.recv()

    def bob() -> Any:
        end = time.monotonic() + 10
        while not codes and time.monotonic() < end:
            time.sleep(0.02)
        with simulsyn_core.connect(broker.address, code=codes[0], timeout=15) as c:
            got = b""
            while chunk := c.recv(1000):
                assert len(chunk) <= 1000
                got += chunk
            c.sendall(b"thanks")
            return got, c.verifier, c.report

    a, b = both(alice, bob)
    assert not isinstance(a, BaseException), a
    assert not isinstance(b, BaseException), b
    assert b[0] == payload
    assert a[0] == b"thanks" and a[2] == b""
    assert a[1] == b[1] is not None
    assert b[2].established and b[2].security["authenticated"]


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        ours = socket.create_connection(server.getsockname(), timeout=5)
        theirs, _ = server.accept()
    return ours, theirs


def _sealed(sock: socket.socket) -> tuple[simulsyn_core.Connection, Channel]:
    """A Connection over ``sock`` and the peer's Channel for its other end."""
    key, mine, theirs = b"k" * 32, b"a" * 32, b"b" * 32
    est = Established(sock, PunchReport(), 0.0, Channel(key, mine, theirs))
    return simulsyn_core.Connection(est), Channel(key, theirs, mine)


@contextlib.contextmanager
def _sealed_pair() -> Iterator[tuple[simulsyn_core.Connection, Channel, socket.socket]]:
    ours, theirs = _tcp_pair()
    conn, peer = _sealed(ours)
    conn.settimeout(5)
    try:
        yield conn, peer, theirs
    finally:
        ours.close()
        theirs.close()


def test_tampered_record_raises_tampered() -> None:
    with _sealed_pair() as (conn, peer, theirs):
        theirs.sendall(peer.seal(DATA, b"fine"))
        assert conn.recv() == b"fine"
        record = bytearray(peer.seal(DATA, b"changed on the way"))
        record[-1] ^= 1
        theirs.sendall(bytes(record))
        with pytest.raises(simulsyn_core.Tampered, match="altered"):
            conn.recv()


def test_an_altered_record_is_reported_to_the_peer_before_the_reset() -> None:
    with _sealed_pair() as (conn, peer, theirs):
        record = bytearray(peer.seal(DATA, b"changed on the way"))
        record[-1] ^= 1
        theirs.sendall(bytes(record))
        with pytest.raises(simulsyn_core.Tampered, match="record 0 fails its authentication"):
            conn.recv()
        theirs.settimeout(5)
        alert = theirs.recv(4096)  # the ALERT came before the reset
        with pytest.raises(Tampered, match="reported: record 0 fails its authentication"):
            list(peer.feed(alert))


def test_a_send_that_fails_on_the_peers_reset_says_what_its_alert_said() -> None:
    with _sealed_pair() as (conn, peer, theirs):
        theirs.sendall(peer.alert(Tampered("replayed", "record 4 again")))
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00"
                          b"\x00\x00\x00\x00")
        theirs.close()  # SO_LINGER 0: an RST behind the ALERT
        time.sleep(0.2)
        with pytest.raises(simulsyn_core.Tampered, match="the peer found our stream "
                           r"tampered with on the way \(record 4 again \(replayed\)\)"):
            for _ in range(100):  # the first send may still be taken before the RST counts
                conn.sendall(b"x" * 65536)


def test_stream_cut_without_its_end_raises_tampered() -> None:
    with _sealed_pair() as (conn, peer, theirs):
        theirs.sendall(peer.seal(DATA, b"part"))
        theirs.shutdown(socket.SHUT_WR)
        assert conn.recv() == b"part"
        with pytest.raises(simulsyn_core.Tampered, match="truncated"):
            conn.recv()


def test_end_record_reads_as_end_of_stream() -> None:
    with _sealed_pair() as (conn, peer, theirs):
        theirs.sendall(peer.seal(DATA, b"all") + peer.seal(END))
        assert conn.recv() == b"all"
        assert conn.recv() == b""


def test_reset_connection_raises_peer_lost() -> None:
    with _sealed_pair() as (conn, _peer, theirs):
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00"
                          b"\x00\x00\x00\x00")
        theirs.close()  # SO_LINGER 0: an RST
        with pytest.raises(simulsyn_core.PeerLost):
            conn.recv()


def test_a_peer_that_leaves_with_an_error_raises_peer_lost(broker: LoopBroker) -> None:
    """Through connect() (on loopback: relayed, the punch going on): B's program fails
    inside its ``with`` block, its Connection resets; A's recv raises PeerLost, naming
    the broker's reason."""
    ready = threading.Event()

    def a_side() -> Any:
        with simulsyn_core.connect(broker.address, "leaves", timeout=15) as c:
            c.settimeout(20)
            ready.set()
            return c.recv()

    def b_side() -> Any:
        class Boom(Exception):
            pass

        with contextlib.suppress(Boom), \
                simulsyn_core.connect(broker.address, "leaves", timeout=15) as c:
            ready.wait(15)
            assert c.path in ("relay", "direct")
            raise Boom
        return "left"

    a, b = both(a_side, b_side)
    assert b == "left", b
    assert isinstance(a, simulsyn_core.PeerLost), a
    assert a.exit_code == 9 and a.report is not None


def test_aio_connect_carries_bytes(broker: LoopBroker) -> None:
    async def side() -> tuple[bytes, str | None]:
        reader, writer, report = await aio.connect(broker.address, "aio-bytes", timeout=15)
        writer.write(b"x" * 100000)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        return got, report.path

    async def main() -> list[tuple[bytes, str | None]]:
        return list(await asyncio.gather(side(), side()))

    for got, path in asyncio.run(asyncio.wait_for(main(), RUN_LIMIT_S)):
        assert got == b"x" * 100000
        assert path in ("direct", "relay")


EXIT_AFTER_WRITING = """
import asyncio, sys
from simulsyn_core import aio

async def main():
    reader, writer, report = await aio.connect(sys.argv[1], "exit-early", timeout=15)
    writer.write(b"z" * 2_000_000)
    writer.write_eof()
    writer.close()
    await writer.wait_closed()  # in the socketpair; the program ends: the bridge delivers it

asyncio.run(main())
"""


def test_aio_data_written_before_exit_reaches_the_peer(broker: LoopBroker) -> None:
    child = subprocess.Popen([sys.executable, "-c", EXIT_AFTER_WRITING, broker.address],
                             stderr=subprocess.PIPE)
    try:
        with simulsyn_core.connect(broker.address, "exit-early", timeout=15) as conn:
            conn.settimeout(20)
            got = bytearray()
            while chunk := conn.recv():
                got += chunk
        _, err = child.communicate(timeout=RUN_LIMIT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert child.returncode == 0, err
    assert bytes(got) == b"z" * 2_000_000


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.S)


def test_the_docs_examples_run_as_written(tmp_path: Path) -> None:
    blocks = _python_blocks((ROOT / "docs/api.md").read_text())
    assert len(blocks) == 2
    expected = ["hello from alice / hello from bob",
                "bob got b'hello from alice'"]
    for block, want in zip(blocks, expected, strict=True):
        script = tmp_path / "example.py"
        script.write_text(block)
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             timeout=RUN_LIMIT_S)
        assert run.returncode == 0, run.stderr
        assert want in run.stdout, run.stdout
    assert "alice got b'hello from bob'" in run.stdout


def test_the_commands_arguments_are_the_apis() -> None:
    """connect() takes what `synprobe punch` takes, under the same rules, named its way."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "give exactly one of broker=, seed_broker= or peer="),
        ({"peer": "127.0.0.1:9"}, "peer= needs local_port="),
        ({"peer": "127.0.0.1:9", "local_port": 5, "role": "third"}, "role=: one of first"),
        ({"broker": "127.0.0.1:9", "session": "s", "role": "first"},
         "role= goes with peer= or seed_broker="),
        ({"seed_broker": "127.0.0.1:9", "secret": "x"}, "secret= goes with session= or peer="),
        ({"peer": "127.0.0.1:9", "local_port": 5, "natcheck": {"public": ["1.2.3.4:5"]}},
         "natcheck= goes with broker="),
        ({"peer": "127.0.0.1:9", "local_port": 5,
          "tuning": simulsyn_core.Tuning(retries=0)}, "retries=: a number from 1 to 100000"),
        ({"peer": "127.0.0.1:9", "local_port": 5,
          "tuning": simulsyn_core.Tuning(birthday_rate=float("nan"))}, "birthday_rate="),
        ({"peer": "127.0.0.1:9", "local_port": 70000}, "local_port=: a port"),
        ({"peer": "1.2.3:4", "local_port": 5}, "peer=: "),
        ({"broker": "127.0.0.1:9", "session": "a b"}, "session=: 1-64 of"),
        ({"broker": "127.0.0.1:9", "session": "s", "timeout": float("inf")}, "timeout="),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as info:
            simulsyn_core.connect(**kwargs)
        assert message in str(info.value), (kwargs, str(info.value))


def test_a_natcheck_result_is_told_to_the_broker(broker: LoopBroker) -> None:
    """natcheck= takes `synprobe nat-check --json`'s object: used when the broker sees us
    at its public address (here 127.0.0.1), as the command uses its last nat-check."""
    result = {"public": ["127.0.0.1:4000"], "unsolicited_syn": "drop", "reply_syn": "pass",
              "recommendation": {"ttl": {"value": 3}}}
    events: list[str] = []

    def first() -> Any:
        with simulsyn_core.connect(broker.address, "facts", natcheck=result, timeout=20,
                                   on_event=events.append, relay="never") as c:
            return c.report

    def second() -> Any:
        time.sleep(0.3)
        with simulsyn_core.connect(broker.address, "facts", timeout=20, relay="never") as c:
            return c.report

    a, b = both(first, second)
    said = "\n".join(events)
    assert "nat-check of 127.0.0.1" in said, said
