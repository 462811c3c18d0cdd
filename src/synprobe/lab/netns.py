"""The lab's namespace builder: real Linux NATs (iptables/nftables, conntrack) in network
namespaces, brought up and torn down.

Topology (every address lives only inside the lab's namespaces)::

    hA --lan-- gA --wan-- rt --wan-- gB --lan-- hB
                          |
                          br  (broker: 192.0.2.10 and 192.0.2.11)

``gA``/``gB`` are the NATs (or firewalls), configured by a profile each (profiles.py);
``rt`` is the router hop between them, as on the internet.

Everything a lab creates lives in its namespaces, named ``ssyn-<id>-<node>``, so
deleting the namespaces removes links, rules, conntrack tables and sysctls with them.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from simulsyn_core._internal.exitcodes import ExitStatus, ToolError

from .profiles import (
    BROKER_IPS,
    BROKER_IPS6,
    NODES,
    PROFILES,
    PROFILES6,
    Profile,
    SideAddresses,
    SideAddresses6,
    side_addresses,
    side_addresses6,
)

PREFIX = "ssyn"
COMMAND_TIMEOUT_S = 10.0
KILL_GRACE_S = 2.0
DELAY_READY_TIMEOUT_S = 10.0  # a delay element (a helper) is a Python process: it imports first
DELAY_NODES = {"a": "da", "b": "db", "broker": "dr"}  # the namespace of each link's element


@dataclass(frozen=True)
class LinkDelays:
    """One-way delay (seconds, each direction) of the links to the router: side A's NAT,
    side B's NAT, the broker. ``jitter_s``: each frame's delay varies uniformly by up to
    that much, but never by more than the link's own delay (a 0.5 ms link stays within
    0-1 ms while the broker's 50 ms link varies by the whole jitter). Frames stay in order."""

    a: float = 0.0
    b: float = 0.0
    broker: float = 0.0
    jitter_s: float = 0.0
    # A man in the middle on side A's link (delay.py's tamper=): one bit flipped in the
    # first TCP segment, either way, that carries at least this many bytes; 0: none.
    tamper_a: int = 0

    def __post_init__(self) -> None:
        for name, value in (("a", self.a), ("b", self.b), ("broker", self.broker),
                            ("jitter", self.jitter_s)):
            if not 0.0 <= value <= 10.0:
                raise ValueError(f"link delay {name}: {value} s is not within 0-10 s")
        if self.tamper_a < 0:
            raise ValueError(f"tamper_a: {self.tamper_a} bytes is below 0")

    def of(self, link: str) -> tuple[float, float]:
        """(delay, jitter) of link "a", "b" or "broker"."""
        delay = {"a": self.a, "b": self.b, "broker": self.broker}[link]
        return delay, min(self.jitter_s, delay)

    def delayed(self) -> list[str]:
        return [link for link in ("a", "b", "broker") if self.of(link)[0] > 0]

    def elements(self) -> list[str]:
        """The links with an element between their veths: delayed, or tampered with."""
        return [link for link in ("a", "b", "broker")
                if self.of(link)[0] > 0 or (link == "a" and self.tamper_a)]


LAB_ID_RE = re.compile(r"[a-z0-9]{1,20}")


def check_lab_id(lab_id: str) -> None:
    """Lab ids are short and have no "-", so that one lab's names never match another's."""
    if not LAB_ID_RE.fullmatch(lab_id):
        raise ValueError(f"lab id {lab_id!r}: use 1-20 of a-z 0-9")


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ToolError(ExitStatus.MISSING_TOOL,
                        f"the lab needs {', '.join(missing)} (Debian: apt-get install "
                        f"{' '.join(_PACKAGE.get(t, t) for t in missing)})")


_PACKAGE = {"ip": "iproute2", "iptables-restore": "iptables", "nft": "nftables",
            "ethtool": "ethtool",
            "tcpdump": "tcpdump", "tshark": "tshark"}


def require_root() -> None:
    if os.geteuid() != 0:
        raise ToolError(ExitStatus.NO_PRIVILEGE,
                        "the NAT lab needs CAP_NET_ADMIN and CAP_SYS_ADMIN "
                        "(network namespaces): run it as root")


def _run(argv: Sequence[str], stdin: str | None = None, check: bool = True
         ) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        require_tools(argv[0])  # exit 10 naming its package (README), not a traceback
        raise
    if check and proc.returncode != 0:
        raise ToolError(ExitStatus.ERROR,
                        f"lab: {' '.join(argv)} failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def lab_namespaces(prefix: str = PREFIX) -> list[str]:
    proc = _run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix + "-"))


def kill_namespace_processes(ns: str) -> None:
    """SIGTERM every process in ns, then SIGKILL what is left after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 0.0)):
        pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.kill(int(pid), sig)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if not _run(["ip", "netns", "pids", ns], check=False).stdout.split():
                return
            time.sleep(0.05)


def delete_namespaces(names: Sequence[str]) -> None:
    for ns in names:
        kill_namespace_processes(ns)
    for ns in names:
        _run(["ip", "netns", "del", ns], check=False)


def sweep(lab_id: str | None = None, prefix: str = PREFIX, id_prefix: bool = False
          ) -> list[str]:
    """Remove the namespaces of one lab (or of all labs): also after a crashed run.

    With ``id_prefix``, every lab whose id starts with ``lab_id`` (a test run's labs).
    """
    if lab_id is None:
        want = f"{prefix}-"
    elif id_prefix:
        want = f"{prefix}-{lab_id}"
    else:
        want = f"{prefix}-{lab_id}-"
    names = [n for n in lab_namespaces(prefix) if n.startswith(want)]
    delete_namespaces(names)
    return names


@dataclass
class Lab:
    """Two hosts, each behind its own NAT profile, a router, and a broker host.

    Use as a context manager; ``down()`` runs on every exit path.
    """

    profile_a: str = "home"
    profile_b: str = "home"
    lab_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    prefix: str = PREFIX
    links: LinkDelays = field(default_factory=lambda: LinkDelays())
    # IPv6 beside IPv4: the IPv6 profile (profiles.PROFILES6) of A's and B's gateways;
    # None: an IPv4-only lab.
    v6: tuple[str, str] | None = None
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _tamperer: subprocess.Popen[bytes] | None = None
    _tamper_said: bytes = b""

    def __post_init__(self) -> None:
        check_lab_id(self.lab_id)
        for p in (self.profile_a, self.profile_b):
            if p not in PROFILES:
                raise ValueError(f"unknown profile {p!r}; known: {', '.join(PROFILES)}")
        for p in self.v6 or ():
            if p not in PROFILES6:
                raise ValueError(f"unknown IPv6 profile {p!r}; known: {', '.join(PROFILES6)}")
        if self.v6 and any(PROFILES[p].carrier for p in (self.profile_a, self.profile_b)):
            raise ValueError("IPv6 beside a carrier profile is not built (no CGN in IPv6)")

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{self.lab_id}-{node}"

    @property
    def nodes(self) -> tuple[str, ...]:
        """NODES, plus c<side> for a side behind a carrier NAT and a delay node for each
        delayed link."""
        extra = tuple("c" + side for side, name in (("a", self.profile_a), ("b", self.profile_b))
                      if PROFILES[name].carrier)
        return NODES + extra + tuple(DELAY_NODES[link] for link in self.links.elements())

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(n) for n in self.nodes]

    def side(self, side: str) -> SideAddresses:
        return side_addresses(side, PROFILES[self.profile_a if side == "a" else self.profile_b])

    def side6(self, side: str) -> SideAddresses6:
        assert self.v6 is not None, "an IPv4-only lab"
        return side_addresses6(side, PROFILES6[self.v6[0 if side == "a" else 1]])

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- building ---------------------------------------------------------------------

    def _ip(self, node: str, *args: str) -> None:
        _run(["ip", "-n", self.ns(node), *args])

    def _sysctl(self, node: str, key: str, value: str) -> None:
        _run(["ip", "netns", "exec", self.ns(node), "sysctl", "-qw", f"{key}={value}"])

    def _link(self, node1: str, if1: str, node2: str, if2: str) -> None:
        _run(["ip", "link", "add", "name", if1, "netns", self.ns(node1), "type", "veth",
              "peer", "name", if2, "netns", self.ns(node2)])
        self._ip(node1, "link", "set", "dev", if1, "up")
        self._ip(node2, "link", "set", "dev", if2, "up")

    def _wire(self, link: str, node1: str, if1: str, node2: str, if2: str) -> None:
        """node1's if1 and node2's if2 on one Ethernet segment: a veth pair, or, when the
        link is delayed, two veths and the user-space delay element (delay.py) between."""
        delay_s, jitter_s = self.links.of(link)
        tamper = self.links.tamper_a if link == "a" else 0
        if link not in self.links.elements():
            self._link(node1, if1, node2, if2)
            return
        middle = DELAY_NODES[link]
        self._link(node1, if1, middle, "in")
        self._link(middle, "out", node2, if2)
        for node, dev in ((node1, if1), (middle, "in"), (middle, "out"), (node2, if2)):
            # A packet socket forwards frames as it reads them: the checksums must already
            # be in them, and no frame may be larger than the MTU.
            _run(["ip", "netns", "exec", self.ns(node), "ethtool", "-K", dev, "tx", "off",
                  "tso", "off", "gso", "off", "gro", "off"])
        proc = self._start_helper(
            middle, ["synprobe.lab.delay", "in", "out", repr(delay_s), repr(jitter_s)]
            + ([f"tamper={tamper}"] if tamper else []), f"the delay element of link {link}")
        if tamper:
            self._tamperer = proc

    def _start_helper(self, node: str, module_argv: Sequence[str], what: str
                      ) -> subprocess.Popen[bytes]:
        """A Python helper (``python -m ...``) in node's namespace, once it says "ready";
        it goes with the lab (down() kills it, and the namespace's processes)."""
        proc = self.popen(node, [sys.executable, "-m", *module_argv],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL)  # `lab up | tee` must not wait for it
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], DELAY_READY_TIMEOUT_S)
        if not ready or proc.stdout.readline().strip() != b"ready":
            raise ToolError(ExitStatus.ERROR, f"lab: {what} did not start within "
                                              f"{DELAY_READY_TIMEOUT_S:.0f} s")
        return proc

    def tampered(self) -> int:
        """How many segments side A's link element has altered so far (``tamper_a``)."""
        proc = self._tamperer
        if proc is None or proc.stdout is None:
            return 0
        os.set_blocking(proc.stdout.fileno(), False)
        self._tamper_said += proc.stdout.read() or b""
        return self._tamper_said.count(b"tampered\n")

    def up(self) -> Lab:
        require_root()
        tools = ["ip", "sysctl"] + (["ethtool"] if self.links.elements() else []) + (
            ["ip6tables-restore"] if self.v6 else [])
        for name in (self.profile_a, self.profile_b):
            tools.append("nft" if PROFILES[name].nft else "iptables-restore")
        require_tools(*tools)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        for node in self.nodes:
            _run(["ip", "netns", "add", self.ns(node)])
            if self.v6:  # addresses usable at once (no duplicate address detection)
                self._sysctl(node, "net.ipv6.conf.default.accept_dad", "0")
                self._sysctl(node, "net.ipv6.conf.all.accept_dad", "0")
            self._ip(node, "link", "set", "dev", "lo", "up")
        for node in ("ga", "gb", "rt"):
            self._sysctl(node, "net.ipv4.ip_forward", "1")
            if self.v6:
                self._sysctl(node, "net.ipv6.conf.all.forwarding", "1")
        self._wire("broker", "rt", "brk", "br", "eth0")
        self._ip("rt", "addr", "add", "192.0.2.1/24", "dev", "brk")
        for ip in BROKER_IPS:
            self._ip("br", "addr", "add", f"{ip}/24", "dev", "eth0")
        self._ip("br", "route", "add", "default", "via", "192.0.2.1", "src", BROKER_IPS[0])
        if self.v6:
            self._ip("rt", "-6", "addr", "add", "2001:db8:c::1/64", "dev", "brk", "nodad")
            for ip in BROKER_IPS6:
                self._ip("br", "-6", "addr", "add", f"{ip}/64", "dev", "eth0", "nodad")
            self._ip("br", "-6", "route", "add", "default", "via", "2001:db8:c::1")
        for side, profile_name in (("a", self.profile_a), ("b", self.profile_b)):
            self._build_side(side, PROFILES[profile_name])
            if self.v6:
                self._build_side6(side)

    def _build_side6(self, side: str) -> None:
        """The side's IPv6, on the links its IPv4 built: addresses, routes, the gateway's
        ip6tables (its IPv6 profile)."""
        assert self.v6 is not None
        h, g = "h" + side, "g" + side
        profile = PROFILES6[self.v6[0 if side == "a" else 1]]
        addr = side_addresses6(side, profile)
        for node, ip, dev in (("rt", addr.router, "w" + side), (g, addr.gateway_wan, "wan"),
                              (g, addr.gateway_lan, "lan"), (h, addr.host, "eth0")):
            self._ip(node, "-6", "addr", "add", f"{ip}/64", "dev", dev, "nodad")
        self._ip(g, "-6", "route", "add", "default", "via", addr.router)
        self._ip(h, "-6", "route", "add", "default", "via", addr.gateway_lan)
        for net in filter(None, (addr.lan, addr.mapped)):
            self._ip("rt", "-6", "route", "add", net, "via", addr.gateway_wan)
        rules = profile.ip6tables.replace("@LAN6@", addr.lan).replace("@MAPPED6@", addr.mapped)
        _run(["ip", "netns", "exec", self.ns(g), "ip6tables-restore"], stdin=rules)

    def _build_side(self, side: str, profile: Profile) -> None:
        h, g = "h" + side, "g" + side
        addr = side_addresses(side, profile)
        if profile.carrier:
            self._build_carrier_side(side, profile, addr)
            return
        self._link(h, "eth0", g, "lan")
        self._wire(side, g, "wan", "rt", "w" + side)
        self._ip("rt", "addr", "add", f"{addr.router}/25", "dev", "w" + side)
        self._ip(g, "addr", "add", f"{addr.gateway_wan}/25", "dev", "wan")
        self._ip(g, "addr", "add", f"{addr.gateway_lan}/{addr.lan_prefix}", "dev", "lan")
        self._ip(h, "addr", "add", f"{addr.host}/{addr.lan_prefix}", "dev", "eth0")
        # `src` on every route: scapy keeps its own routing table and needs it.
        self._ip(g, "route", "add", "default", "via", addr.router, "src", addr.gateway_wan)
        self._ip(h, "route", "add", "default", "via", addr.gateway_lan, "src", addr.host)
        if not profile.nat:
            self._ip("rt", "route", "add", f"{addr.host.rsplit('.', 1)[0]}.128/25", "via",
                     addr.gateway_wan)
        for key, value in profile.sysctls:
            self._sysctl(g, key, value)
        if profile.nft:
            _run(["ip", "netns", "exec", self.ns(g), "nft", "-f", "-"], stdin=profile.nft)
        else:
            rules = (profile.iptables.replace("@HOST@", addr.host)
                     .replace("@PUBLIC@", addr.public)
                     .replace("@LAN@", f"{addr.host.rsplit('.', 1)[0]}.0/{addr.lan_prefix}"))
            _run(["ip", "netns", "exec", self.ns(g), "iptables-restore"], stdin=rules)
        if profile.helper:
            self._start_helper(g, profile.helper, f"the {profile.name} helper of side {side}")

    def _build_carrier_side(self, side: str, profile: Profile, addr: SideAddresses) -> None:
        """h --lan-- g (home NAT) --wan-- c (carrier NAT) --wan-- rt."""
        h, g, c = "h" + side, "g" + side, "c" + side
        inner = addr.gateway_wan.rsplit(".", 1)[0]
        self._sysctl(c, "net.ipv4.ip_forward", "1")
        self._link(h, "eth0", g, "lan")
        self._link(g, "wan", c, "lan")
        self._wire(side, c, "wan", "rt", "w" + side)
        self._ip("rt", "addr", "add", f"{addr.router}/25", "dev", "w" + side)
        self._ip(c, "addr", "add", f"{addr.public}/25", "dev", "wan")
        self._ip(c, "addr", "add", f"{inner}.1/24", "dev", "lan")
        self._ip(g, "addr", "add", f"{addr.gateway_wan}/24", "dev", "wan")
        self._ip(g, "addr", "add", f"{addr.gateway_lan}/{addr.lan_prefix}", "dev", "lan")
        self._ip(h, "addr", "add", f"{addr.host}/{addr.lan_prefix}", "dev", "eth0")
        self._ip(c, "route", "add", "default", "via", addr.router, "src", addr.public)
        self._ip(g, "route", "add", "default", "via", f"{inner}.1", "src", addr.gateway_wan)
        self._ip(h, "route", "add", "default", "via", addr.gateway_lan, "src", addr.host)
        for node in (g, c):
            for key, value in profile.sysctls:
                self._sysctl(node, key, value)
            _run(["ip", "netns", "exec", self.ns(node), "iptables-restore"],
                 stdin=profile.iptables)

    # --- running ----------------------------------------------------------------------

    def argv(self, node: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(node), *argv]

    def popen(self, node: str, argv: Sequence[str], **kwargs: object
              ) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.argv(node, argv),
                                                         **kwargs)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    def run(self, node: str, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT_S,
            **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(node, argv), capture_output=True, text=True,
                              timeout=timeout, **kwargs)  # type: ignore[call-overload]

    def conntrack(self, side: str) -> str:
        """The gateway's conntrack table, as /proc shows it (for diagnostics)."""
        proc = self.run("g" + side, ["cat", "/proc/net/nf_conntrack"], check=False)
        return proc.stdout

    def down(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        end = time.monotonic() + KILL_GRACE_S
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, end - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(KILL_GRACE_S)
        self._procs.clear()
        existing = set(lab_namespaces(self.prefix))
        delete_namespaces([ns for ns in self.namespaces if ns in existing])
