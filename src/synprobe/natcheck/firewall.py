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


def broker_rules(probe_port: int, icmp_port: int) -> list[Rule]:
    """Probe SYNs to probe_port are dropped before the broker's TCP answers them with
    RST; SYNs to icmp_port get ICMP port-unreachable (the host_stack probe)."""
    return [
        Rule("INPUT", ("-p", "tcp", "--dport", str(probe_port), "-j", "DROP")),
        Rule("INPUT", ("-p", "tcp", "--dport", str(icmp_port), "-j", "REJECT",
                       "--reject-with", "icmp-port-unreachable")),
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


Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]


def _default_runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT_S)


@dataclass
class Firewall:
    """iptables in the current network namespace (CAP_NET_ADMIN)."""

    binary: str = "iptables"
    run: Runner = _default_runner

    @property
    def available(self) -> bool:
        return shutil.which(self.binary) is not None

    def _iptables(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run([self.binary, "-w", "2", *args])

    def listing(self) -> str:
        proc = self._iptables("-S")
        if proc.returncode != 0:
            raise FirewallError(f"{self.binary} -S: {proc.stderr.strip()}")
        return proc.stdout

    def install(self, rules: Sequence[Rule], tag: str) -> None:
        done: list[Rule] = []
        try:
            for rule in rules:
                proc = self._iptables("-I", rule.chain, "1", *rule.argv(tag))
                if proc.returncode != 0:
                    raise FirewallError(f"{self.binary}: {proc.stderr.strip()}")
                done.append(rule)
        except BaseException:
            self.remove(tag)
            raise

    def remove(self, tag: str) -> int:
        """Delete every rule tagged exactly ``tag``; returns how many."""
        removed = 0
        for line in tagged_lines(self.listing(), tag):
            words = shlex.split(line)
            if words[:1] != ["-A"] or comment_of(line) != tag:
                continue
            proc = self._iptables("-D", *words[1:])
            removed += proc.returncode == 0
        return removed

    def sweep_stale_clients(self) -> int:
        """Remove client rules of nat-check runs whose process is gone (killed -9)."""
        removed = 0
        for line in tagged_lines(self.listing(), f"{TAG_PREFIX}:client:"):
            tag = comment_of(line)
            pid_text = tag.rsplit(":", 1)[1]
            if pid_text.isdigit() and not _alive(int(pid_text)):
                removed += self.remove(tag)
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
