"""The NAT lab: real Linux NATs (iptables/nftables, conntrack) in network namespaces.

Topology (every address lives only inside the lab's namespaces)::

    hA --lan-- gA --wan-- rt --wan-- gB --lan-- hB
                          |
                          br  (broker: 192.0.2.10 and 192.0.2.11)

``gA``/``gB`` are the NATs (or firewalls), configured by a profile each; ``rt`` is the
router hop between them, as on the internet. The public side uses the documentation
ranges 198.51.100.0/24 (side A), 203.0.113.0/24 (side B) and 192.0.2.0/24 (broker);
NATed hosts sit in 10.1.0.0/24 and 10.2.0.0/24.

Everything a lab creates lives in its namespaces, named ``ssyn-<id>-<node>``, so
deleting the namespaces removes links, rules, conntrack tables and sysctls with them.
"""

from __future__ import annotations

import contextlib
import json
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

from simulsyn_core.exitcodes import ExitStatus, ToolError
from simulsyn_core.signals import sigterm_as_interrupt

PREFIX = "ssyn"
NODES = ("ha", "ga", "rt", "gb", "hb", "br")
BROKER_IPS = ("192.0.2.10", "192.0.2.11")
BROKER_PORT = 8086
COMMAND_TIMEOUT_S = 10.0
KILL_GRACE_S = 2.0

_FILTER_HEAD = """*filter
:INPUT {input} [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
"""
# A home router: the NAT itself answers nothing unsolicited, forwards only outbound
# connections and their replies (conntrack ESTABLISHED includes a reply-direction SYN).
_HOME_FILTER = _FILTER_HEAD.format(input="DROP") + """-A INPUT -i lo -j ACCEPT
-A INPUT -i lan -j ACCEPT
-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
{input_extra}-A FORWARD -o wan -j ACCEPT
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
{forward_extra}COMMIT
"""
_NAT = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -o wan -j MASQUERADE{masq_extra}
COMMIT
"""


def _home(input_extra: str = "", forward_extra: str = "", masq_extra: str = "",
          nat: bool = True, syn_first: str = "") -> str:
    rules = _HOME_FILTER.format(input_extra=input_extra, forward_extra=forward_extra)
    if syn_first:
        outbound = "-A FORWARD -o wan -j ACCEPT"
        rules = rules.replace(outbound, syn_first + outbound)
    return rules + (_NAT.format(masq_extra=masq_extra) if nat else "")


def _reject(how: str) -> str:
    return _home(input_extra=f"-A INPUT -i wan -p tcp -j REJECT --reject-with {how}\n",
                 forward_extra=f"-A FORWARD -i wan -p tcp -j REJECT --reject-with {how}\n")


def _dmz() -> str:
    """A home router with a "DMZ host": every unsolicited inbound TCP goes to the host, and
    the host reaches its own public address (hairpin NAT). @HOST@, @PUBLIC@ and @LAN@
    are filled in per side when the lab is built."""
    rules = _home(forward_extra="-A FORWARD -i wan -o lan -d @HOST@ -p tcp -j ACCEPT\n"
                                "-A FORWARD -i lan -o lan -j ACCEPT\n", nat=False)
    return rules + """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -d @PUBLIC@ -p tcp -j DNAT --to-destination @HOST@
-A POSTROUTING -o wan -j MASQUERADE
-A POSTROUTING -o lan -s @LAN@ -d @HOST@ -j MASQUERADE
COMMIT
"""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    iptables: str = ""  # iptables-restore input for the gateway
    nft: str = ""  # or an nft ruleset
    nat: bool = True  # False: the host has a public address behind a stateful firewall
    carrier: bool = False  # True: a second NAT (a carrier's, node c<side>) behind the first
    sysctls: tuple[tuple[str, str], ...] = ()


_NFT_HOME = """table inet ssyn_filter {
  chain input { type filter hook input priority 0; policy drop;
    iif "lo" accept; iifname "lan" accept; ct state established,related accept; }
  chain forward { type filter hook forward priority 0; policy drop;
    oifname "wan" accept; ct state established,related accept; }
}
table ip ssyn_nat {
  chain postrouting { type nat hook postrouting priority 100; oifname "wan" masquerade; }
}
"""

PROFILES: dict[str, Profile] = {p.name: p for p in [
    Profile("home", "home router: MASQUERADE, outbound and replies only, everything "
                    "unsolicited dropped silently", _home()),
    Profile("home-nft", "the home profile written for nftables instead of iptables",
            nft=_NFT_HOME),
    Profile("original", "the original README's rules exactly: nothing on INPUT, so the NAT's "
                        "own kernel answers an unsolicited SYN with RST",
            _FILTER_HEAD.format(input="ACCEPT") + "-A FORWARD -o wan -j ACCEPT\n"
            "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\nCOMMIT\n"
            + _NAT.format(masq_extra="")),
    Profile("reject-rst", "unsolicited inbound TCP rejected with a TCP reset",
            _reject("tcp-reset")),
    Profile("reject-icmp-port", "unsolicited inbound TCP rejected with ICMP port-unreachable",
            _reject("icmp-port-unreachable")),
    Profile("reject-icmp-admin", "unsolicited inbound TCP rejected with ICMP admin-prohibited",
            _reject("icmp-admin-prohibited")),
    Profile("random", "a random external port for every new connection "
                      "(MASQUERADE --random-fully)", _home(masq_extra=" --random-fully")),
    Profile("syn-drop-all", "every inbound SYN dropped, replies to our own SYNs included",
            _home(syn_first="-A FORWARD -i wan -p tcp --syn -j DROP\n")),
    Profile("syn-sent-5s", "home, with conntrack's SYN_SENT timeout cut to 5 s",
            _home(), sysctls=(("net.netfilter.nf_conntrack_tcp_timeout_syn_sent", "5"),)),
    Profile("firewall", "no NAT: a public address behind a stateful firewall that drops "
                        "unsolicited inbound", _home(nat=False), nat=False),
    Profile("dmz", "home router with a DMZ host: every unsolicited inbound TCP is forwarded "
                   "to the host (endpoint-independent filtering), hairpin NAT on", _dmz()),
    Profile("carrier", "home router behind a carrier-grade NAT (two NATs, both as home; the "
                       "home router's wan in 100.64.0.0/10, RFC 6598)", _home(), carrier=True),
]}


@dataclass(frozen=True)
class SideAddresses:
    host: str  # the host's own address
    gateway_lan: str
    gateway_wan: str
    router: str
    lan_prefix: int
    public: str  # what the world sees: the NAT's wan address, or the host itself


def side_addresses(side: str, profile: Profile) -> SideAddresses:
    wan_net = {"a": "198.51.100", "b": "203.0.113"}[side]
    if profile.carrier:  # gateway_wan: the home router's, inside the carrier's network
        lan = {"a": "10.1.0", "b": "10.2.0"}[side]
        inner = {"a": "100.64.1", "b": "100.64.2"}[side]
        return SideAddresses(f"{lan}.2", f"{lan}.1", f"{inner}.2", f"{wan_net}.1", 24,
                             f"{wan_net}.2")
    if profile.nat:
        lan = {"a": "10.1.0", "b": "10.2.0"}[side]
        return SideAddresses(f"{lan}.2", f"{lan}.1", f"{wan_net}.2", f"{wan_net}.1", 24,
                             f"{wan_net}.2")
    return SideAddresses(f"{wan_net}.130", f"{wan_net}.129", f"{wan_net}.2", f"{wan_net}.1", 25,
                         f"{wan_net}.130")


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
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _created: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_lab_id(self.lab_id)
        for p in (self.profile_a, self.profile_b):
            if p not in PROFILES:
                raise ValueError(f"unknown profile {p!r}; known: {', '.join(PROFILES)}")

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{self.lab_id}-{node}"

    @property
    def nodes(self) -> tuple[str, ...]:
        """NODES, plus c<side> for a side behind a carrier NAT."""
        extra = tuple("c" + side for side, name in (("a", self.profile_a), ("b", self.profile_b))
                      if PROFILES[name].carrier)
        return NODES + extra

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(n) for n in self.nodes]

    def side(self, side: str) -> SideAddresses:
        return side_addresses(side, PROFILES[self.profile_a if side == "a" else self.profile_b])

    @property
    def broker_ips(self) -> tuple[str, ...]:
        return BROKER_IPS

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

    def up(self) -> Lab:
        require_root()
        tools = ["ip", "sysctl"]
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
            self._created.append(self.ns(node))
            self._ip(node, "link", "set", "dev", "lo", "up")
        for node in ("ga", "gb", "rt"):
            self._sysctl(node, "net.ipv4.ip_forward", "1")
        self._link("rt", "brk", "br", "eth0")
        self._ip("rt", "addr", "add", "192.0.2.1/24", "dev", "brk")
        for ip in BROKER_IPS:
            self._ip("br", "addr", "add", f"{ip}/24", "dev", "eth0")
        self._ip("br", "route", "add", "default", "via", "192.0.2.1", "src", BROKER_IPS[0])
        for side, profile_name in (("a", self.profile_a), ("b", self.profile_b)):
            self._build_side(side, PROFILES[profile_name])

    def _build_side(self, side: str, profile: Profile) -> None:
        h, g = "h" + side, "g" + side
        addr = side_addresses(side, profile)
        if profile.carrier:
            self._build_carrier_side(side, profile, addr)
            return
        self._link(h, "eth0", g, "lan")
        self._link(g, "wan", "rt", "w" + side)
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

    def _build_carrier_side(self, side: str, profile: Profile, addr: SideAddresses) -> None:
        """h --lan-- g (home NAT) --wan-- c (carrier NAT) --wan-- rt."""
        h, g, c = "h" + side, "g" + side, "c" + side
        inner = addr.gateway_wan.rsplit(".", 1)[0]
        self._sysctl(c, "net.ipv4.ip_forward", "1")
        self._link(h, "eth0", g, "lan")
        self._link(g, "wan", c, "lan")
        self._link(c, "wan", "rt", "w" + side)
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
        self._created.clear()


terminate_on_sigterm = sigterm_as_interrupt  # the lab's name for it


# --- running the project's own commands in a lab ------------------------------------------

SYNPROBE = [sys.executable, "-m", "synprobe"]
BROKER_READY_TIMEOUT_S = 5.0


def wait_for_listen(lab: Lab, node: str, ip: str, port: int, timeout_s: float) -> None:
    """Wait (bounded) until a TCP socket listens on ip:port inside node."""
    end = time.monotonic() + timeout_s
    needle = f"{ip}:{port}"
    while time.monotonic() < end:
        out = lab.run(node, ["ss", "-Htln"], check=False).stdout
        if needle in out:
            return
        time.sleep(0.05)
    raise ToolError(ExitStatus.ERROR, f"lab: nothing listens on {needle} in {node} after "
                                      f"{timeout_s:.0f} s")


def start_broker(lab: Lab, extra: Sequence[str] = (), port: int = BROKER_PORT,
                 stderr: object = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    binds: list[str] = []
    for ip in BROKER_IPS:
        binds += ["--bind", f"{ip}:{port}"]
    proc = lab.popen("br", [*SYNPROBE, "broker", *binds, *extra], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=stderr)
    wait_for_listen(lab, "br", BROKER_IPS[0], port, BROKER_READY_TIMEOUT_S)
    return proc


@dataclass
class PeerRun:
    side: str
    returncode: int | None
    stdout: str
    stderr: str
    elapsed_s: float = 0.0  # from its start (imports done, see punch_pair) to its exit

    @property
    def report(self) -> dict[str, object] | None:
        """The --json object (the first stdout line), if there is one."""
        first = self.stdout.split("\n", 1)[0]
        try:
            value = json.loads(first)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    @property
    def chat_lines(self) -> list[str]:
        lines = self.stdout.splitlines()
        return lines[1:] if self.report is not None else lines


# A peer of punch_pair imports everything first, says so on fd W, and runs only once a
# byte comes on fd R: --timeout covers waiting for the peer, and an interpreter that
# starts slowly on a loaded machine must not eat into it.
_GATED = ("import os, sys\nfrom synprobe.cli import main\nimport simulsyn_core.session\n"
          "r, w = int(sys.argv[1]), int(sys.argv[2])\nos.write(w, b'r')\nos.close(w)\n"
          "os.read(r, 1)\nsys.exit(main(sys.argv[3:]))")
GATE_TIMEOUT_S = 30.0


def punch_pair(lab: Lab, session: str, *, messages: tuple[str, str] = ("", ""),
               args: Sequence[str] = (), first: str = "a", stagger_s: float = 0.3,
               timeout_s: float = 30.0, broker: str | None = None) -> tuple[PeerRun, PeerRun]:
    """Run `synprobe punch` on hA and hB at once; returns (A's run, B's run).

    Both are started and their imports done before either runs; then ``first`` runs
    ``stagger_s`` before the other, so the order of start is known.
    """
    target = broker or f"{BROKER_IPS[0]}:{BROKER_PORT}"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    gates: dict[str, int] = {}
    started: dict[str, float] = {}
    order = [first, "b" if first == "a" else "a"]
    try:
        for side in order:
            go_r, go_w = os.pipe()
            ready_r, ready_w = os.pipe()
            procs[side] = lab.popen("h" + side, [
                sys.executable, "-c", _GATED, str(go_r), str(ready_w), "punch", "--broker",
                target, "--session", session, "--json", "--timeout", str(timeout_s), *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(go_r, ready_w))
            os.close(go_r)
            os.close(ready_w)
            gates[side] = go_w
            ready = select.select([ready_r], [], [], GATE_TIMEOUT_S)[0]
            ok = bool(ready) and os.read(ready_r, 1) == b"r"
            os.close(ready_r)
            if not ok:
                raise ToolError(ExitStatus.ERROR, f"lab: the punch on h{side} did not start")
        for i, side in enumerate(order):
            if i:
                time.sleep(stagger_s)
            started[side] = time.monotonic()
            os.write(gates[side], b"g")
    except BaseException:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        raise
    finally:
        for fd in gates.values():
            os.close(fd)
    results: dict[str, PeerRun] = {}
    inputs = {"a": messages[0], "b": messages[1]}
    # Feed each side its message and close stdin; collect both (bounded).
    from concurrent.futures import ThreadPoolExecutor

    def finish(side: str) -> PeerRun:
        proc = procs[side]
        try:
            out, err = proc.communicate(inputs[side].encode(), timeout=timeout_s + 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=5)
        return PeerRun(side, proc.returncode, out.decode(errors="replace"),
                       err.decode(errors="replace"), time.monotonic() - started[side])

    pool = ThreadPoolExecutor(2)
    try:
        for side, run in zip(order, pool.map(finish, order), strict=True):
            results[side] = run
    except BaseException:
        # Ctrl-C/SIGTERM: stop the peers first, or the pool would wait for them.
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        raise
    finally:
        pool.shutdown(wait=True)
    return results["a"], results["b"]
