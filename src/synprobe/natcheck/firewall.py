"""Host firewall rules that nat-check installs, tagged so that they can always be found.

Each side stops its own kernel from spoiling a probe (a kernel answers a TCP segment for
which it has no socket with RST, RFC 9293 section 3.10.7.1, and an RST through a NAT
deletes the conntrack entry the probe is measuring). The rules are scoped to the probe
ports and carry a comment ``synprobe-natcheck:<role>:<key>``; ``remove`` deletes exactly
the rules with one tag, ``sweep_stale`` those a killed run left.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from simulsyn_core._internal.numbers import ascii_int

from .. import rawnet

TAG_PREFIX = "synprobe-natcheck"
IPTABLES_TIMEOUT_S = 5.0
CHAINS = ("INPUT", "OUTPUT")


class FirewallError(RuntimeError):
    """iptables refused or failed."""


@dataclass(frozen=True)
class Rule:
    chain: str  # INPUT or OUTPUT of the filter table
    spec: tuple[str, ...]  # match and target, without the comment

    def argv(self, tag: str) -> list[str]:
        return [*self.spec[:-2], "-m", "comment", "--comment", tag, *self.spec[-2:]]


def broker_rules(probe_port: int, icmp_port: int, v6: bool = False) -> list[Rule]:
    """Probe SYNs to probe_port are dropped before the broker's TCP answers them with
    RST; SYNs to icmp_port get ICMP port-unreachable (the host_stack probe; ICMPv6 type
    1 code 4 in ip6tables)."""
    return [
        Rule("INPUT", ("-p", "tcp", "--dport", str(probe_port), "-j", "DROP")),
        Rule("INPUT", ("-p", "tcp", "--dport", str(icmp_port), "-j", "REJECT",
                       "--reject-with",
                       "icmp6-port-unreachable" if v6 else "icmp-port-unreachable")),
    ]


def client_rules(ports: Sequence[int]) -> list[Rule]:
    """The client's kernel must not RST the flows it did not open itself (crafted SYNs)."""
    return [Rule("OUTPUT", ("-p", "tcp", "--sport", str(p), "--tcp-flags", "RST", "RST",
                            "-j", "DROP")) for p in ports]


def broker_tag(port: int) -> str:
    return f"{TAG_PREFIX}:broker:{port}"


def client_tag(pid: int) -> str:
    return f"{TAG_PREFIX}:client:{pid}"


def tagged_lines(listing: str, tag_prefix: str) -> list[str]:
    """The `iptables -S` lines whose comment starts with tag_prefix (pure)."""
    out = []
    for line in listing.splitlines():
        words = shlex.split(line)
        if "--comment" in words:
            comment = words[words.index("--comment") + 1]
            if comment.startswith(tag_prefix):
                out.append(line)
    return out


def comment_of(line: str) -> str:
    words = shlex.split(line)
    return words[words.index("--comment") + 1] if "--comment" in words else ""


Runner = Callable[[list[str], str | None], subprocess.CompletedProcess[str]]


def _default_runner(argv: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=IPTABLES_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"{argv[0]}: {exc}") from None


def restore_script(lines: Sequence[str]) -> str:
    """iptables-restore --noflush input applying ``lines`` atomically (pure)."""
    return "*filter\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"


def insert_lines(rules: Sequence[Rule], tag: str) -> list[str]:
    return [shlex.join(["-I", rule.chain, "1", *rule.argv(tag)]) for rule in rules]


def delete_lines(listing: str, tags: set[str]) -> list[str]:
    """`-D ...` for every `-A` line of an `iptables -S` listing tagged with one of tags."""
    out = []
    for line in tagged_lines(listing, TAG_PREFIX):
        words = shlex.split(line)
        if words[:1] == ["-A"] and comment_of(line) in tags:
            out.append(shlex.join(["-D", *words[1:]]))
    return out


@dataclass
class Firewall:
    """iptables in the current network namespace (CAP_NET_ADMIN). Each change is one
    iptables-restore --noflush call: all of its rules apply, or none."""

    binary: str = "iptables"
    run: Runner = _default_runner

    @classmethod
    def for_family(cls, v6: bool, run: Runner = _default_runner) -> Firewall:
        """ip6tables for IPv6 probes (its rules never see IPv4 packets), else iptables."""
        return cls("ip6tables" if v6 else "iptables", run)

    @property
    def v6(self) -> bool:
        return self.binary.startswith("ip6")

    @property
    def available(self) -> bool:
        return shutil.which(self.binary) is not None and \
            shutil.which(self.binary + "-restore") is not None

    def raw_probe_problem(self) -> tuple[list[str], str]:
        """The one check before raw probes, on either side: (the capabilities this
        process lacks, the tool that is missing); both empty when probes can run."""
        missing = rawnet.missing_capabilities(rawnet.CAP_NET_RAW, rawnet.CAP_NET_ADMIN)
        if missing:
            return missing, ""
        return [], "" if self.available else self.binary

    def listing(self) -> str:
        proc = self.run([self.binary, "-w", "2", "-S"], None)
        if proc.returncode != 0:
            raise FirewallError(f"{self.binary} -S: {proc.stderr.strip()}")
        return proc.stdout

    def _restore(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        proc = self.run([self.binary + "-restore", "-w", "2", "--noflush"],
                        restore_script(lines))
        if proc.returncode != 0:
            raise FirewallError(f"{self.binary}-restore: {proc.stderr.strip()}")

    def install(self, rules: Sequence[Rule], tag: str) -> None:
        self._restore(insert_lines(rules, tag))

    def remove(self, tag: str) -> int:
        """Delete every rule tagged exactly ``tag``; returns how many."""
        lines = delete_lines(self.listing(), {tag})
        self._restore(lines)
        return len(lines)

    def sweep_stale_clients(self) -> int:
        """Remove client rules of nat-check runs whose process is gone (killed -9)."""
        stale = set()
        for line in tagged_lines(self.listing(), f"{TAG_PREFIX}:client:"):
            tag = comment_of(line)
            pid = ascii_int(tag.rsplit(":", 1)[1], max_digits=10)
            if pid is not None and not _alive(pid):
                stale.add(tag)
        lines = delete_lines(self.listing(), stale) if stale else []
        self._restore(lines)
        return len(lines)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
