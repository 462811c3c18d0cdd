"""The mapping check: the broker tells a client its public endpoint through each of its
addresses (WHOAMI -> YOUARE); a NAT that maps them differently is declared in REGISTER,
and a pair with such a NAT is refused at once, both told why."""

from __future__ import annotations

import json
import socket
import subprocess

from simulsyn_core.endpoint import Endpoint
from simulsyn_core.rendezvous import SessionTable
from simulsyn_core.wire import encode_message, parse_line

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
    assert json.loads(run.stdout.splitlines()[0])["error"].startswith("no peer joined")
