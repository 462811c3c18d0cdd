"""A dual-stack broker (`--bind [::]:PORT`) on loopback: IPv6 clients pair with IPv6
clients and IPv4 clients with IPv4 clients, at the same time, under the same session
names; an IPv4 client is never given an IPv6 endpoint (nor the other way round); the
original list protocol stays IPv4."""

from __future__ import annotations

import re
import socket
import subprocess

import pytest

from simulsyn_core._internal.endpoint import Endpoint
from tests.helpers import SYNPROBE, read_line, wait_for_stderr

TIMEOUT_S = 5.0


@pytest.fixture
def broker():
    if not socket.has_ipv6:
        pytest.fail("this Python has no IPv6")
    proc = subprocess.Popen([*SYNPROBE, "broker", "--bind", "[::]:0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = wait_for_stderr(proc, re.compile(r"listening on \[::\]:(\d+)"), 10)
        m = re.search(r"listening on \[::\]:(\d+)", seen)
        assert m, seen
        yield int(m.group(1))
    finally:
        proc.terminate()
        proc.wait(5)


def client(port: int, v6: bool) -> socket.socket:
    s = socket.create_connection(("::1" if v6 else "127.0.0.1", port), timeout=TIMEOUT_S)
    return s


def register(s: socket.socket, session: str) -> None:
    s.sendall(f"SSYN1 REGISTER session={session}\n".encode())


def fields(line: bytes) -> dict[str, str]:
    return dict(w.split("=", 1) for w in line.decode().split()[2:] if "=" in w)


def test_two_ipv6_pairs_and_two_ipv4_pairs_at_once_each_within_its_family(broker) -> None:
    socks = {(fam, n): client(broker, fam == 6) for fam in (4, 6) for n in (0, 1)}
    try:
        for fam in (4, 6):
            register(socks[(fam, 0)], "both")
        for fam in (4, 6):
            assert read_line(socks[(fam, 0)]).startswith(b"SSYN1 REGISTERED")
        for fam in (4, 6):
            register(socks[(fam, 1)], "both")
        for fam in (4, 6):
            for n in (0, 1):
                line = read_line(socks[(fam, n)])
                assert line.startswith(b"SSYN1 PEER"), line
                f = fields(line)
                assert f["session"] == "both"
                peer, public = Endpoint.parse(f["peer"]), Endpoint.parse(f["public"])
                assert peer.is_v6 == public.is_v6 == (fam == 6), line
                assert peer.ip == ("::1" if fam == 6 else "127.0.0.1"), line
    finally:
        for s in socks.values():
            s.close()


def test_an_ipv4_client_is_never_paired_with_an_ipv6_one(broker) -> None:
    v6, v4 = client(broker, True), client(broker, False)
    with v6, v4:
        register(v6, "apart")
        assert read_line(v6).startswith(b"SSYN1 REGISTERED")
        register(v4, "apart")
        line = read_line(v4)
        assert line.startswith(b"SSYN1 REGISTERED"), line  # waits: a session of its own
        assert fields(line)["public"].startswith("127.0.0.1:")
        # Neither got a PEER meanwhile.
        for s in (v6, v4):
            s.settimeout(0.5)
            with pytest.raises(TimeoutError):
                s.recv(1)


@pytest.mark.parametrize("session", ["x@6", "#1@6"])
def test_a_session_name_cannot_reach_into_the_ipv6_keys(broker, session: str) -> None:
    with client(broker, False) as s:
        register(s, session)
        assert b"code=bad-session" in read_line(s)


def test_codes_are_numbered_per_family(broker) -> None:
    v6, v4 = client(broker, True), client(broker, False)
    with v6, v4:
        for s in (v6, v4):
            s.sendall(b"SSYN1 REGISTER nameplate=new\n")
            assert fields(read_line(s))["nameplate"] == "1"


def test_the_list_protocol_stays_ipv4(broker) -> None:
    with client(broker, False) as s:
        s.shutdown(socket.SHUT_WR)
        data = s.recv(64)
        assert data and data[0] >= 1  # the list, with us in it
    with client(broker, True) as s:
        s.shutdown(socket.SHUT_WR)
        assert s.recv(64) == b""  # closed without a list


def test_a_name_with_both_families_resolves_as_minus_4_or_minus_6_say(monkeypatch) -> None:
    """A broker's name: its IPv4 address unless -6; -4/-6 refuse an address of the other
    family, and a name without one, with a usage error (exit 2)."""
    import click

    from synprobe.cliutil import parse_server

    def fake(host, port, family=0, *args, **kwargs):
        if host != "dual.test":
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        ip = "2001:db8:c::10" if family == socket.AF_INET6 else "192.0.2.10"
        return [(family, socket.SOCK_STREAM, 6, "", (ip, port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    assert parse_server("dual.test:8086") == Endpoint("192.0.2.10", 8086)
    assert parse_server("dual.test:8086", v6=False) == Endpoint("192.0.2.10", 8086)
    assert parse_server("dual.test:8086", v6=True) == Endpoint("2001:db8:c::10", 8086)
    with pytest.raises(click.BadParameter, match="has no IPv6 address"):
        parse_server("other.test:8086", v6=True)


@pytest.mark.parametrize("args, said", [
    (["-6", "--broker", "127.0.0.1:9"], "is not an IPv6 address"),
    (["--broker", "[::1]:9", "-4"], "is not an IPv4 address"),  # -4 after: eager all the same
])
def test_punch_minus_4_and_minus_6_refuse_the_other_family(args: list[str], said: str) -> None:
    proc = subprocess.run([*SYNPROBE, "punch", *args, "--session", "x"], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and said in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_punch_minus_6_reaches_an_ipv6_broker() -> None:
    """-6 with an IPv6 broker address goes there (nobody listens: exit 3, named)."""
    proc = subprocess.run([*SYNPROBE, "punch", "-6", "--broker", "[::1]:9", "--session", "x",
                           "--timeout", "2"], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 3 and "broker [::1]:9" in proc.stderr, proc.stderr


def test_an_ipv6_natcheck_names_its_public_address_without_brackets() -> None:
    """The punch uses a nat-check's facts when the broker sees it at the same address:
    the address of "[2001:db8:1a::2]:4000" is 2001:db8:1a::2 (it was "[2001:db8:1a::2]",
    never equal to what the broker saw, so an IPv6 nat-check was never used)."""
    from simulsyn_core._internal.client import facts_from_natcheck

    facts = facts_from_natcheck({"public": ["[2001:db8:1a::2]:4000"], "unsolicited_syn": "rst",
                                 "reply_syn": "pass", "recommendation": {"ttl": {"value": 2}}})
    assert facts is not None and facts.public_ip == "2001:db8:1a::2"
    assert (facts.unsolicited, facts.reply_syn, facts.ttl) == ("reject", "pass", 2)
    v4 = facts_from_natcheck({"public": ["10.1.0.2:4000"]})
    assert v4 is not None and v4.public_ip == "10.1.0.2"
    assert facts_from_natcheck({"public": [], "error": None}) is None
    assert facts_from_natcheck({"public": ["x"], "error": "failed"}) is None
