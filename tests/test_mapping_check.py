"""The mapping check: the broker tells a client its public endpoint through each of its
addresses (WHOAMI -> YOUARE); a NAT that maps them differently is declared in REGISTER,
and a pair with such a NAT is refused at once, both told why."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Callable

from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.rendezvous import SessionTable
from simulsyn_core._internal.wire import encode_message, parse_line
from tests import schemas

from .helpers import SYNPROBE, loopback_broker, read_line

A = Endpoint("198.51.100.2", 40001)
B = Endpoint("203.0.113.2", 40002)


def told(replies: list) -> list[tuple[str, str, str]]:
    out = []
    for r in replies:
        msg = parse_line(r.data.rstrip(b"\n"))
        out.append((r.conn, msg.verb, msg.fields.get("code", "")))
    return out


def test_a_varying_mapping_on_either_side_refuses_the_pair_at_once() -> None:
    for mine, theirs in (("varies", "same"), ("same", "varies"), ("varies", None),
                         ("varies", "varies")):
        table = SessionTable()
        table.register("a", "s", A, None, 0.0, mapping=mine)
        replies = table.register("b", "s", B, None, 0.1, mapping=theirs)
        assert told(replies) == [("a", "ERROR", "untraversable"),
                                 ("b", "ERROR", "untraversable")]
        messages = [parse_line(r.data.rstrip(b"\n")).fields["message"] for r in replies]
        assert all("port-randomising" in m for m in messages)
        if mine != theirs:
            assert messages[0].startswith("your_NAT") == (mine == "varies")
        assert len(table) == 0 and all(r.close for r in replies)


def test_same_or_unknown_mappings_pair_as_before() -> None:
    for mine, theirs in (("same", "same"), (None, None), ("same", None)):
        table = SessionTable()
        table.register("a", "s", A, None, 0.0, mapping=mine)
        assert [v for _, v, _ in told(table.register("b", "s", B, None, 0.1,
                                                     mapping=theirs))] == ["PEER", "PEER"]


def test_the_broker_answers_whoami_with_its_other_address() -> None:
    with loopback_broker("--bind", "127.0.0.2:0") as (_, port):
        # the second --bind has its own port; the first address's alt is the second
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(encode_message("WHOAMI"))
            msg = parse_line(read_line(s).rstrip(b"\n"))
            assert msg.verb == "YOUARE"
            assert msg.endpoint("public") == Endpoint.from_sockaddr(s.getsockname())
            assert msg.endpoint("alt").ip == "127.0.0.2"
            # the connection stays open for REGISTER
            s.sendall(encode_message("REGISTER", session="w1"))
            assert parse_line(read_line(s).rstrip(b"\n")).verb == "REGISTERED"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(encode_message("WHOAMI", close="1"))
            assert parse_line(read_line(s).rstrip(b"\n")).verb == "YOUARE"
            assert s.recv(16) == b""  # closed by the broker: TIME_WAIT on its side


def test_a_punch_with_one_broker_address_skips_the_check() -> None:
    with loopback_broker() as (_, port):
        run = subprocess.run([*SYNPROBE, "punch", "--broker", f"127.0.0.1:{port}",
                              "--session", "alone", "--timeout", "1", "-v", "--json"],
                             capture_output=True, text=True, timeout=20)
    assert run.returncode == 4, run.stderr
    assert "mapping check skipped: the broker has one address" in run.stderr
    assert schemas.loads("punch", run.stdout.splitlines()[0])["error"].startswith("no peer joined")


class FakeBroker:
    """A broker on loopback that answers each connection's lines with ``answer``: an older
    broker, or one that advertises an address nobody can reach."""

    def __init__(self, answer: Callable[[str, socket.socket], bool]) -> None:
        self.answer = answer
        self.lines: list[str] = []
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.server.settimeout(10)
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            for _ in range(4):  # bounded: a run makes at most two connections here
                conn, _ = self.server.accept()
                threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn, contextlib.suppress(OSError):
            while True:
                line = read_line(conn).decode().strip()
                if not line:
                    return
                self.lines.append(line)
                if not self.answer(line, conn):
                    return

    def close(self) -> None:
        self.server.close()


def _public(conn: socket.socket) -> str:
    return str(Endpoint.from_sockaddr(conn.getpeername()))


def _punch_against(answer: Callable[[str, socket.socket], bool]
                   ) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """A punch against a FakeBroker answering with ``answer``: (the run, the lines the
    broker got)."""
    broker = FakeBroker(answer)
    try:
        run = subprocess.run([*SYNPROBE, "punch", "--broker", f"127.0.0.1:{broker.port}",
                              "--session", "s", "--timeout", "1.5", "-v", "--json"],
                             capture_output=True, text=True, timeout=30)
    finally:
        broker.close()
    return run, broker.lines


def _registered(line: str, conn: socket.socket) -> bool:
    if line.startswith("SSYN1 REGISTER "):
        conn.sendall(encode_message("REGISTERED", session="s", public=_public(conn)))
    return True  # keep the connection until the client leaves


def test_an_older_broker_that_refuses_whoami_still_pairs() -> None:
    def older(line: str, conn: socket.socket) -> bool:
        if line.startswith("SSYN1 WHOAMI"):
            conn.sendall(encode_message("ERROR", code="bad-request",
                                        message="unexpected WHOAMI from a client"))
            return False  # and closes, as an older broker does
        return _registered(line, conn)

    run, lines = _punch_against(older)
    # registered on a second connection from the same port, then waited for a peer
    assert run.returncode == 4, run.stderr
    assert "registered in session 's'" in run.stderr
    assert [line.split()[1] for line in lines] == ["WHOAMI", "REGISTER"]
    assert "mapping=" not in lines[1]


def test_an_unreachable_other_address_leaves_the_mapping_unknown() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connect() is refused
    alt = f"127.0.0.1:{closed.getsockname()[1]}"

    def unreachable_alt(line: str, conn: socket.socket) -> bool:
        if line.startswith("SSYN1 WHOAMI"):
            conn.sendall(encode_message("YOUARE", public=_public(conn), alt=alt))
            return True
        return _registered(line, conn)

    try:
        run, lines = _punch_against(unreachable_alt)
    finally:
        closed.close()
    assert run.returncode == 4, run.stderr
    assert f"mapping check skipped: the broker's other address: broker {alt}" in run.stderr
    register = next(line for line in lines if line.startswith("SSYN1 REGISTER"))
    assert "mapping=" not in register
