"""The broker's probe side of nat-check: a Service for the broker's verbs.

Safety (README "Safety of the probe server"): a raw probe packet goes only to the
public address of the control connection that asked for it, only while that connection
is open (checked again before every packet), at most ``PROBE_BUDGET`` packets per check,
one check per client address and ``MAX_CONCURRENT_CHECKS`` at once. The firewall rules
that keep the broker's kernel quiet on the probe ports are installed by ``probe_firewall``
(scoped to those ports, removed on every exit; a restart removes a killed run's).

scapy is imported only when a check first sends a raw probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from simulsyn_core._internal.broker import Broker, Log, Service
from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.wire import Message, ProtocolError

from .. import rawnet
from ..packets.live import Capture
from ..packets.seen import Seen
from . import protocol as P
from . import unsolicited
from .filtering import FilteringProbe
from .filtering import build as build_filtering
from .firewall import Firewall, broker_rules, broker_tag
from .unsolicited import UnsolicitedProbe


@dataclass
class Check:
    conn: int
    client_ip: str
    local: Endpoint  # the broker address and port the client reached
    other_ip: str | None
    started: float
    sent: int = 0
    capture: Capture | None = None
    unsolicited: unsolicited.UnsolicitedProbe | None = None
    unsolicited_at: float = 0.0
    window_s: float = P.ANSWER_WINDOW_MAX_S
    watch_s: float = 0.0  # NC_PROBE watch_ms= (REQ-4): how long to watch for answers
    followed: UnsolicitedProbe | None = None  # REQ-4's followed SYN
    icmp_keep: Endpoint | None = None  # REQ-10: the source of the SYN it answered
    reply_seen: list[Endpoint] = field(default_factory=list)
    timer_waits: list[float] = field(default_factory=list)
    timer_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    probed: bool = False


@dataclass
class ProbeServer:
    """Serves OBSERVE always; raw probes when ``raw_reason`` is empty."""

    addrs: list[str]  # the broker's own addresses, as listed to the client
    raw_reason: str = ""  # why raw probes are off ("" = on)
    log: Log = print
    checks: dict[int, Check] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None

    def services(self) -> dict[str, Service]:
        return {P.Observe.VERB: self.observe, P.Hello.VERB: self.hello,
                P.Probe.VERB: self.probe, P.Reflect.VERB: self.reflect,
                P.Timers.VERB: self.timers, P.Done.VERB: self.done}

    # --- verbs -------------------------------------------------------------------------

    async def observe(self, broker: Broker, conn: int, public: Endpoint, msg: Message) -> None:
        # The broker closes: the client's close costs it no RST and the log no line.
        broker.send(conn, bytes(P.Observed(public)), close=True)

    async def hello(self, broker: Broker, conn: int, public: Endpoint, msg: Message) -> None:
        local = broker.local_endpoint(conn)
        if local is None:
            return
        self._expire(broker)
        raw_reason = self.raw_reason
        if not raw_reason and any(c.client_ip == public.ip for c in self.checks.values()):
            raw_reason = "another check from this address is running"
        if not raw_reason and len(self.checks) >= P.MAX_CONCURRENT_CHECKS:
            raw_reason = f"{P.MAX_CONCURRENT_CHECKS} checks are running: try again later"
        # Only the client's own family: its probes and the mapping's second address must
        # reach the broker the way the control connection did.
        addrs = [local.ip] + [a for a in self.addrs
                              if a != local.ip and (":" in a) == local.is_v6]
        if not raw_reason:
            from . import craft

            craft.preload_in_background()  # scapy, while the client runs its mapping probes
            self.checks[conn] = Check(conn, public.ip, local,
                                      addrs[1] if len(addrs) > 1 else None, time.monotonic())
            self._loop = asyncio.get_running_loop()
            self._loop.create_task(self._watch(broker, conn))
        broker.send(conn, bytes(P.ServerInfo(public, tuple(addrs), local.port, not raw_reason,
                                             raw_reason, P.PROBE_BUDGET)))

    async def probe(self, broker: Broker, conn: int, public: Endpoint, msg: Message) -> None:
        check = self._check(conn, msg)
        if check.probed:
            raise ProtocolError("one NC_PROBE per check")
        check.probed = True
        request = P.Probe.decode(msg)
        if request.window_ms is not None:
            check.window_s = min(P.ANSWER_WINDOW_MAX_S, max(P.ANSWER_WINDOW_MIN_S,
                                                            request.window_ms / 1000))
        if request.watch_ms is not None:
            check.watch_s = min(P.WATCH_MAX_S, max(0.0, request.watch_ms / 1000))
        probe_port = check.local.port + P.PROBE_PORT_OFFSET
        await asyncio.to_thread(self._start_capture, check, probe_port)
        check.unsolicited = unsolicited.UnsolicitedProbe(
            check.local.ip, probe_port, check.client_ip, request.unsolicited, P.Seq.UNSOLICITED)
        packets = [unsolicited.build(check.unsolicited)]
        packets += build_filtering(FilteringProbe(check.local.ip, check.other_ip, probe_port,
                                                  check.client_ip, request.filter,
                                                  P.Seq.FILTERING))
        if request.followed is not None:
            check.followed = unsolicited.UnsolicitedProbe(
                check.local.ip, probe_port, check.client_ip, request.followed, P.Seq.FOLLOWED)
            packets.append(unsolicited.build(check.followed))
        self._send(broker, check, packets)
        check.unsolicited_at = time.monotonic()
        broker.send(conn, bytes(P.Armed(len(packets))))

    async def reflect(self, broker: Broker, conn: int, public: Endpoint, msg: Message) -> None:
        check = self._check(conn, msg)
        request = P.Reflect.decode(msg)
        probe_port = check.local.port + P.PROBE_PORT_OFFSET
        packets = [_syn(check.local.ip, check.client_ip, probe_port, p, P.Seq.REFLECT + i)
                   for i, p in enumerate(request.ports)]
        self._send(broker, check, packets)
        broker.send(conn, bytes(P.Reflected(len(packets))))

    async def timers(self, broker: Broker, conn: int, public: Endpoint, msg: Message) -> None:
        check = self._check(conn, msg)
        if check.timer_waits:
            raise ProtocolError("one NC_TIMERS per check")
        check.timer_waits = list(P.Timers.decode(msg).waits)
        if check.capture is None:
            await asyncio.to_thread(self._start_capture, check,
                                    check.local.port + P.PROBE_PORT_OFFSET)
        broker.send(conn, bytes(P.TimersArmed(len(check.timer_waits))))

    async def done(self, broker: Broker, conn: int, public: Endpoint, msg: Message) -> None:
        check = self._check(conn, msg)
        watch_s = max(check.window_s, check.watch_s)
        wait = check.unsolicited_at + watch_s - time.monotonic()
        if check.unsolicited_at and wait > 0:
            await asyncio.sleep(min(wait, P.WATCH_MAX_S))
        seen = check.capture.snapshot() if check.capture else []
        answer, after_ms = (unsolicited.timed(check.unsolicited, seen) if check.unsolicited
                            else (None, None))
        followed, followed_ms = (unsolicited.timed(check.followed, seen) if check.followed
                                 else (None, None))
        broker.send(conn, bytes(P.Result(
            answer, check.sent, tuple(check.reply_seen), after_ms, followed, followed_ms,
            round(watch_s * 1000) if check.watch_s else None)), close=True)
        self.log(f"nat-check {check.client_ip}: {check.sent} probe packet(s) sent, "
                 f"unsolicited_syn={answer}")
        self._end(conn)

    # --- the one place raw packets leave ------------------------------------------------

    def _send(self, broker: Broker, check: Check, packets: list[bytes]) -> None:
        for pkt in packets:
            if rawnet.destination(pkt) != check.client_ip or not broker.is_open(check.conn):
                raise ProtocolError("refused: probes go only to the address of a client "
                                    "connected now")
            if check.sent >= P.PROBE_BUDGET:
                raise ProtocolError(f"refused: probe budget of {P.PROBE_BUDGET} packets spent")
            rawnet.send_packets([pkt])
            check.sent += 1

    # --- capture and the SYNs that ask for an answer ------------------------------------

    def _start_capture(self, check: Check, probe_port: int) -> None:
        from . import craft

        craft.load_scapy()
        iface = rawnet.interface_of(rawnet.local_ip_towards(check.client_ip))
        client_ip = check.client_ip
        ours = {check.local.ip, *( [check.other_ip] if check.other_ip else [])}

        def keep(s: Seen) -> bool:
            if s.is_icmp_error:
                return s.inner_dst == client_ip and s.inner_src in ours
            return (s.src == client_ip and s.dport == probe_port) or (
                s.dst == client_ip and s.sport == probe_port)

        def on_packet(s: Seen) -> None:
            if s.outgoing or not s.is_syn or s.src != client_ip or s.dport != probe_port:
                return
            loop = self._loop
            if loop is not None:
                loop.call_soon_threadsafe(self._client_syn, check, s)

        check.capture = Capture(iface, keep, on_packet).start()

    def _client_syn(self, check: Check, s: Seen) -> None:
        broker = self._broker
        if broker is None or self.checks.get(check.conn) is not check:
            return
        source = Endpoint(s.src, s.sport)
        try:
            if s.seq == P.Seq.REPLY and source not in check.reply_seen:
                check.reply_seen.append(source)
                self._send(broker, check, [_syn(check.local.ip, s.src, s.dport, s.sport,
                                                P.Seq.REPLY_ANSWER)])
            if s.seq == P.Seq.ICMP_KEEP and check.icmp_keep is None:
                check.icmp_keep = source
                from . import craft

                quoted = craft.syn(s.src, s.dst, s.sport, s.dport, s.seq)
                self._send(broker, check, [craft.icmp_port_unreachable(
                    check.local.ip, s.src, quoted)])
                check.timer_tasks.append(asyncio.get_running_loop().create_task(
                    self._answer_later(broker, check, source, s.dport, P.ICMP_KEEP_GAP_S,
                                       P.Seq.ICMP_KEEP_ANSWER)))
            index = s.seq - P.Seq.TIMER
            timer_tasks = len(check.timer_tasks) - (check.icmp_keep is not None)
            if 0 <= index < len(check.timer_waits) and timer_tasks < P.MAX_TIMERS:
                check.timer_tasks.append(asyncio.get_running_loop().create_task(
                    self._answer_later(broker, check, source, s.dport,
                                       check.timer_waits[index], P.Seq.TIMER_ANSWER + index)))
        except ProtocolError as exc:
            self.log(f"nat-check {check.client_ip}: {exc}")

    async def _answer_later(self, broker: Broker, check: Check, source: Endpoint,
                            probe_port: int, wait_s: float, seq: int) -> None:
        """A SYN from the probe port to ``source`` after ``wait_s`` (timers, REQ-10)."""
        await asyncio.sleep(wait_s)
        try:
            self._send(broker, check, [_syn(check.local.ip, source.ip, probe_port, source.port,
                                            seq)])
        except ProtocolError as exc:
            self.log(f"nat-check {check.client_ip}: {exc}")

    # --- lifetime ------------------------------------------------------------------------

    _broker: Broker | None = None

    async def _watch(self, broker: Broker, conn: int) -> None:
        """End the check when its control connection closes or it runs too long."""
        self._broker = broker
        end = time.monotonic() + P.CHECK_MAX_S
        while conn in self.checks and broker.is_open(conn) and time.monotonic() < end:
            await asyncio.sleep(0.2)
        self._end(conn)

    def _expire(self, broker: Broker) -> None:
        for conn in [c for c in self.checks if not broker.is_open(c)]:
            self._end(conn)

    def _end(self, conn: int) -> None:
        check = self.checks.pop(conn, None)
        if check is None:
            return
        for task in check.timer_tasks:
            task.cancel()
        if check.capture is not None:
            check.capture.stop()

    def close(self) -> None:
        from . import craft

        for conn in list(self.checks):
            self._end(conn)
        craft.wait_preload(20.0)

    def _check(self, conn: int, msg: Message) -> Check:
        check = self.checks.get(conn)
        if check is None:
            raise ProtocolError(f"refused: {msg.verb} needs a nat-check control connection "
                                "(NC_HELLO with raw=yes) from the address to probe")
        target = msg.get("target")
        if target is not None and target != check.client_ip:
            raise ProtocolError("refused: probes go only to the address of a client "
                                "connected now")
        return check


def _syn(src: str, dst: str, sport: int, dport: int, seq: int) -> bytes:
    from . import craft

    return craft.syn(src, dst, sport, dport, seq)


# --- setting the probe side up in the broker command --------------------------------------

def raw_probe_problem(firewall: Firewall) -> str:
    """Why this process cannot run raw probes ("" if it can)."""
    missing, tool = firewall.raw_probe_problem()
    if missing:
        return f"needs {' and '.join(missing)}"
    if tool:
        return f"needs {tool} (Debian: apt-get install iptables)"
    return ""


@contextlib.contextmanager
def probe_firewall(firewall: Firewall, ports: list[int], log: Log) -> Iterator[None]:
    """Install the probe ports' rules for the broker ports given; remove them on exit.

    Rules a killed broker left on the same ports are removed first (same tag).
    """
    tags = []
    try:
        for port in ports:
            tag = broker_tag(port)
            stale = firewall.remove(tag)
            if stale:
                log(f"nat-check: removed {stale} firewall rule(s) a previous run left ({tag})")
            tags.append(tag)
            firewall.install(broker_rules(port + P.PROBE_PORT_OFFSET,
                                          port + P.ICMP_PORT_OFFSET, firewall.v6), tag)
        yield
    finally:
        for tag in tags:
            with contextlib.suppress(Exception):
                firewall.remove(tag)
