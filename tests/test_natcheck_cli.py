"""nat-check without the lab: the command line, the broker's verbs on loopback, the
firewall bookkeeping with a fake iptables, and that scapy stays out of the fast paths."""

from __future__ import annotations

import asyncio
import shlex
import subprocess

from click.testing import CliRunner

from simulsyn_core._internal.broker import Broker
from simulsyn_core._internal.endpoint import Endpoint
from synprobe.cli import cli
from synprobe.natcheck import firewall as fw
from synprobe.natcheck.server import ProbeServer
from tests.helpers import scapy_modules_after


def test_help_lists_every_key_and_exit_code() -> None:
    result = CliRunner().invoke(cli, ["nat-check", "--help"])
    assert result.exit_code == 0
    for word in ("--server", "--timers", "--max-wait", "--pcap", "--json", "--port-samples",
                 "port_range", "unsolicited_syn",
                 "syn_sent_lifetime_s", "host_stack", "no-privilege", "broker-unreachable",
                 "--rfc5382", "--no-hairpin", "rfc5382", "schema_version"):
        assert word in result.output


def test_server_is_required_and_there_is_no_default() -> None:
    from synprobe.cli import main

    assert main(["nat-check"]) == 2


def test_unreachable_broker_exits_3() -> None:
    from synprobe.cli import main

    # a loopback port nothing listens on: connect() is refused at once
    assert main(["nat-check", "--server", "127.0.0.1:9", "--json"]) == 3


def test_family_flags_pick_and_check_the_servers_family() -> None:
    from synprobe.cli import main

    assert main(["nat-check", "-6", "--server", "127.0.0.1:9"]) == 2  # not IPv6: usage
    assert main(["nat-check", "-4", "--server", "[::1]:9"]) == 2
    assert main(["nat-check", "-6", "--server", "[::1]:9", "--json"]) == 3  # refused on ::1
    help_text = CliRunner().invoke(cli, ["nat-check", "--help"]).output
    assert "-4 " in help_text and "-6 " in help_text


def test_broker_side_and_nat_check_help_do_not_import_scapy() -> None:
    assert scapy_modules_after("import synprobe.natcheck.broker_side, synprobe.natcheck.cli, "
                               "synprobe.natcheck.client") == []


async def _first_answer(broker: Endpoint, lines: list[str]) -> str:
    """Send ``lines`` on a fresh connection; the first line back (5 s at most)."""
    reader, writer = await asyncio.open_connection(broker.ip, broker.port)
    try:
        for line in lines:
            writer.write(line.encode() + b"\n")
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 5)).decode()
    finally:
        writer.close()


def test_broker_verbs_on_loopback() -> None:
    async def scenario() -> list[str]:
        server = ProbeServer(["127.0.0.1"], raw_reason="raw probes off for this test",
                             log=lambda _line: None)
        broker = Broker([Endpoint("127.0.0.1", 0)], log=lambda _line: None,
                        services=server.services())
        await broker.start()
        port = broker.listening[0].port
        answers = []
        try:
            for lines in (["SSYN1 OBSERVE"], ["SSYN1 NC_HELLO"],
                          ["SSYN1 NC_PROBE unsolicited=40000 filter=40001"]):
                answers.append(await _first_answer(Endpoint("127.0.0.1", port), lines))
        finally:
            await broker.close()
        return answers

    observed, info, refused = asyncio.run(scenario())
    assert observed.startswith("SSYN1 OBSERVED public=127.0.0.1:")
    assert "raw=no" in info and "raw_reason=raw_probes_off_for_this_test" in info
    assert "addrs=127.0.0.1" in info
    assert refused.startswith("SSYN1 ERROR") and "refused" in refused


class FakeIptables:
    """`iptables -S` and `iptables-restore --noflush` over a list of rules."""

    def __init__(self) -> None:
        self.rules: list[list[str]] = []  # each: chain, then match and target words
        self.calls = 0

    def listing(self) -> str:
        return "-P INPUT ACCEPT\n" + "".join(
            " ".join(["-A", *(f'"{w}"' if w.startswith(fw.TAG_PREFIX) else w for w in r)])
            + "\n" for r in self.rules)

    def __call__(self, argv: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        self.calls += 1
        if argv[1:] == ["-w", "2", "-S"]:
            return subprocess.CompletedProcess(argv, 0, self.listing(), "")
        assert argv[0].endswith("-restore") and "--noflush" in argv and stdin is not None
        lines = stdin.splitlines()
        assert lines[0] == "*filter" and lines[-1] == "COMMIT"
        for line in lines[1:-1]:
            words = shlex.split(line)
            if words[0] == "-I":
                self.rules.insert(0, [words[1], *words[3:]])
            elif words[0] == "-D":
                self.rules.remove(words[1:])
        return subprocess.CompletedProcess(argv, 0, "", "")


def test_firewall_installs_tagged_rules_and_removes_exactly_its_own() -> None:
    fake = FakeIptables()
    firewall = fw.Firewall(run=fake)
    firewall.install(fw.broker_rules(8088, 8089), fw.broker_tag(8086))
    firewall.install(fw.client_rules([5000, 5001]), fw.client_tag(999999999))
    assert len(fake.rules) == 4 and fake.calls == 2  # one iptables-restore per install
    assert all(any(w.startswith(fw.TAG_PREFIX) for w in r) for r in fake.rules)
    assert firewall.remove(fw.broker_tag(808)) == 0  # a prefix of another tag is not it
    assert firewall.remove(fw.broker_tag(8086)) == 2
    assert firewall.sweep_stale_clients() == 2  # pid 999999999 is not running
    assert fake.rules == []


def test_tagged_lines_reads_iptables_s() -> None:
    listing = ('-P INPUT ACCEPT\n-A INPUT -p tcp -m tcp --dport 8088 -m comment --comment '
               '"synprobe-natcheck:broker:8086" -j DROP\n-A INPUT -p tcp -j ACCEPT\n')
    lines = fw.tagged_lines(listing, fw.TAG_PREFIX)
    assert len(lines) == 1 and fw.comment_of(lines[0]) == "synprobe-natcheck:broker:8086"


def test_hello_lists_only_the_clients_family() -> None:
    """A dual-stack broker tells an IPv6 client its IPv6 addresses only, an IPv4 client
    its IPv4 ones (the second address of the mapping probe must be reachable alike)."""
    async def scenario() -> list[str]:
        server = ProbeServer(["127.0.0.1", "::1", "127.0.0.2"],
                             raw_reason="raw probes off for this test", log=lambda _l: None)
        broker = Broker([Endpoint("127.0.0.1", 0), Endpoint("::1", 0)],
                        log=lambda _line: None, services=server.services())
        await broker.start()
        answers = []
        try:
            for where in broker.listening:
                answers.append(await _first_answer(where, ["SSYN1 NC_HELLO"]))
        finally:
            await broker.close()
        return answers

    v4, v6 = asyncio.run(scenario())
    assert "addrs=127.0.0.1,127.0.0.2 " in v4
    assert "addrs=::1 " in v6 and "public=[::1]:" in v6


def test_ipv6_probe_rules_go_to_ip6tables_with_icmpv6_reject() -> None:
    fake = FakeIptables()
    calls: list[str] = []

    def runner(argv: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        calls.append(argv[0])
        return fake(argv, stdin)

    firewall = fw.Firewall.for_family(True, runner)
    assert firewall.v6 and not fw.Firewall.for_family(False).v6
    firewall.install(fw.broker_rules(8088, 8089, firewall.v6), fw.broker_tag(8086))
    assert calls == ["ip6tables-restore"]
    assert [r[-2:] for r in fake.rules if "REJECT" in r] == [["--reject-with",
                                                        "icmp6-port-unreachable"]]
    assert firewall.remove(fw.broker_tag(8086)) == 2 and fake.rules == []
    assert calls[-2:] == ["ip6tables", "ip6tables-restore"]


def test_bind_families() -> None:
    from synprobe.natcheck.broker_side import bind_families

    assert bind_families([Endpoint("0.0.0.0", 3478)]) == [False]
    assert bind_families([Endpoint("2001:db8:c::10", 3478)]) == [True]
    assert bind_families([Endpoint("::", 3478)]) == [False, True]  # dual stack
    assert bind_families([Endpoint("10.0.0.1", 1), Endpoint("2001:db8::1", 1)]) == [False, True]
