"""The client side of nat-check: runs every probe against a broker and builds the report.

Order (about 1 s in the lab): the control connection and the mapping connections (plain
sockets); then, with CAP_NET_RAW and CAP_NET_ADMIN, one capture for every raw probe:
the broker's unsolicited and filtering SYNs, our reply_syn, hops and hairpin SYNs, the
host_stack connects; with --timers, the hole lifetime. Then, when the mapping is
endpoint-dependent, the port samples (port_samples: fresh plain connections, after the
capture has stopped, so the pcap holds the probes only). Everything opened here
(sockets, the capture, the firewall rules scoped to our probe ports) is closed in
``finally``.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.exitcodes import ExitStatus, ToolError
from simulsyn_core._internal.wire import LineDecoder, ProtocolError

from .. import rawnet
from ..packets.live import Capture
from ..packets.seen import Seen
from . import (
    craft,
    hairpin,
    hops,
    host_stack,
    mapping,
    port_range,
    port_samples,
    reply_syn,
    rfc5382,
    timers,
)
from . import protocol as P
from .evidence import Evidence, RawEvidence, decide, plan, probes_of, reflects
from .firewall import Firewall, FirewallError, client_rules, client_tag
from .port_samples import DEFAULT_PORT_SAMPLES
from .recommend import recommend, verdict
from .report import NatCheckReport

Event = Callable[[str], None]
SETTLE_S = 0.05  # after the broker's result, for its last SYNs to reach our capture
TIMERS_MARGIN_S = 0.5
REQ4_WATCH_S = P.REQ4_SILENCE_S + 1.0  # --rfc5382: how long the broker watches (REQ-4)
PRELOAD_JOIN_S = 20.0


@dataclass(frozen=True)
class CheckConfig:
    server: Endpoint
    timers: bool = False
    max_wait_s: float = 150.0
    pcap: str | None = None
    port_samples: int = DEFAULT_PORT_SAMPLES  # 0: never sample the public port range
    rfc5382: bool = False  # REQ-4's 6 s watch and the followed SYN, REQ-10's ICMP probe
    hairpin: bool = True  # False: --no-hairpin, no SYN to our own public endpoint


Progress = Callable[[float, float], None]


@dataclass
class _State:
    sockets: list[socket.socket] = field(default_factory=list)
    reserved: list[socket.socket] = field(default_factory=list)
    capture: Capture | None = None
    rules_tag: str | None = None
    preload: threading.Thread | None = None


@dataclass
class _Run:
    """One check's I/O context: what it was asked, where it reports, what it holds."""

    cfg: CheckConfig
    firewall: Firewall
    event: Event
    progress: Progress | None
    state: _State = field(default_factory=_State)
    sample_progress: Progress | None = None


def _reserve(state: _State, n: int, family: socket.AddressFamily = socket.AF_INET
             ) -> list[int]:
    """n local ports nobody else may take while the check runs (bound, never used), in
    the family the probes use."""
    ports = []
    for _ in range(n):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        state.reserved.append(sock)
        ports.append(sock.getsockname()[1])
    return ports


def raw_problem(firewall: Firewall) -> tuple[str, ExitStatus]:
    missing, tool = firewall.raw_probe_problem()
    if missing:
        return (f"raw probes need {' and '.join(missing)} (run as root, or "
                "setcap cap_net_raw,cap_net_admin+ep on the Python binary)",
                ExitStatus.NO_PRIVILEGE)
    if tool:
        return (f"raw probes need {tool} (Debian: apt-get install iptables)",
                ExitStatus.MISSING_TOOL)
    return "", ExitStatus.OK


def run_natcheck(cfg: CheckConfig, event: Event = lambda _m: None,
                 progress: Progress | None = None,
                 firewall: Firewall | None = None,
                 sample_progress: Progress | None = None) -> NatCheckReport:
    run = _Run(cfg, firewall or Firewall.for_family(cfg.server.is_v6), event, progress,
               sample_progress=sample_progress)
    start = time.monotonic()
    problem, problem_status = raw_problem(run.firewall)
    if not problem:
        run.state.preload = craft.preload_in_background()  # ~0.7 s, while plain sockets work
    try:
        evidence = _gather(run, problem)
        _close_sockets(run.state)  # the closing segments count among the check's packets
        capture = run.state.capture
        seen = capture.snapshot() if capture else []
        packets = {"sent_by_client": sum(1 for s in seen if s.outgoing),
                   "received_by_client": sum(1 for s in seen if not s.outgoing),
                   "sent_by_server_raw": evidence.raw.broker.sent if evidence.raw else 0}
        if capture is not None:
            capture.stop()  # the pcap and the counts end here: the samples are not probes
        evidence = _sample_ports(run, evidence)
        decision = decide(evidence)
        f = decision.findings
        if evidence.raw is not None:
            event(f"raw probes: filtering {f.filtering}, unsolicited {f.unsolicited_syn}, "
                  f"reply {f.reply_syn}, hairpin {f.hairpin}, hops {f.hops}")
        status = problem_status if problem else ExitStatus.OK
        requirements = rfc5382.assess(evidence, f)
        said = verdict(f)
        if cfg.rfc5382:
            said += " " + rfc5382.summary(requirements)
        return NatCheckReport(
            server=str(cfg.server), findings=f, recommendation=recommend(f),
            verdict=said, duration_s=time.monotonic() - start,
            rfc5382=requirements, rfc5382_asked=cfg.rfc5382,
            packets=packets if capture else {}, path=decision.path, pcap=cfg.pcap,
            probes=probes_of(evidence), exit_code=int(status), error=problem or None,
            evidence=evidence)
    finally:
        _cleanup(run.state, run.firewall, cfg.pcap)


def _gather(run: _Run, problem: str) -> Evidence:
    """The I/O: the mapping probes, then (when this host and the broker can) the raw
    probes; what was sent and seen, nothing decided but what to send."""
    cfg, state, event = run.cfg, run.state, run.event
    try:
        host_ip = rawnet.local_ip_towards(cfg.server.ip)
    except OSError as exc:
        raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                        f"no route to {cfg.server}: {exc}") from None
    servers = {cfg.server.ip}
    if not problem:
        state.capture = Capture(rawnet.interface_of(host_ip),
                                    lambda s: _keep(s, host_ip, servers)).start()
    control, info = _hello(cfg.server)
    servers.update(info.addrs)
    state.sockets.append(control)
    event(f"broker {cfg.server}: public {info.public}, addresses {','.join(info.addrs)}, "
          f"raw probes {'on' if info.raw else 'off: ' + info.raw_reason}")
    control_obs = mapping.Observation(Endpoint.from_sockaddr(control.getsockname()),
                                      cfg.server, info.public)
    try:
        same, fresh = mapping.run(mapping.build(info), control_obs.local.port, state.sockets)
    except (OSError, TimeoutError, ProtocolError) as exc:
        raise ToolError(ExitStatus.BROKER_UNREACHABLE, f"mapping probe: {exc}") from None
    m = mapping.classify(control_obs, same, fresh, [host_ip])
    event(f"mapping {m.mapping}, preservation {m.port_preservation}, "
          f"allocation {m.port_allocation}")
    raw_off = problem or ("" if info.raw else info.raw_reason)
    raw = None
    if not problem and info.raw:
        raw = _raw_probes(run, control, info, host_ip, fresh[0], reflects(m))
    return Evidence(host_ip, info, control_obs, tuple(same), tuple(fresh), cfg.timers,
                    raw_off, raw, rfc5382_asked=cfg.rfc5382)


def _sample_ports(run: _Run, ev: Evidence) -> Evidence:
    """The public ports of fresh connections, when the mapping is endpoint-dependent (the
    rule is port_range.skip_reason's; decide() gives the reason when not)."""
    m = mapping.classify(ev.control, ev.same_port, ev.fresh, [ev.host_ip])
    asked = run.cfg.port_samples
    ev = replace(ev, port_samples_asked=asked)
    if port_range.skip_reason(m.behind_nat, m.mapping, asked) is not None:
        return ev
    run.event(f"port samples: {asked} fresh connections to {run.cfg.server}, at most "
              f"{port_samples.RATE_PER_S:.0f}/s, {port_samples.MAX_OPEN} at once")
    sampled = port_samples.run(run.cfg.server, asked, run.sample_progress)
    run.event("port samples: " + sampled.summary())
    return replace(ev, port_samples=sampled)


def _keep(s: Seen, host_ip: str, servers: set[str]) -> bool:
    """Packets of the check: to or from the broker, ICMP errors, SYNs and RSTs of ours."""
    if s.proto in (1, 58):
        return s.is_icmp_error and (s.inner_src == host_ip or s.dst == host_ip)
    return s.src in servers or s.dst in servers or (
        host_ip in (s.src, s.dst) and bool(s.flags & 0x06))


def _hello(server: Endpoint) -> tuple[socket.socket, P.ServerInfo]:
    try:
        sock = mapping.connect(0, server)
    except (OSError, ConnectionError) as exc:
        raise ToolError(ExitStatus.BROKER_UNREACHABLE, f"broker {server}: {exc}") from None
    try:
        sock.sendall(bytes(P.Hello()))
        info = mapping.read_message(sock, LineDecoder(), P.ServerInfo)
    except (OSError, TimeoutError, ProtocolError) as exc:
        sock.close()
        raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                        f"broker {server} does not serve nat-check ({exc}); run "
                        "`synprobe broker --probe` there") from None
    return sock, info


def _request(control: socket.socket, request: P.NcMessage, kind: type[mapping.Answer],
             timeout_s: float = mapping.OBSERVE_TIMEOUT_S) -> mapping.Answer:
    control.sendall(bytes(request))
    return mapping.read_message(control, LineDecoder(), kind, timeout_s)


def _raw_probes(run: _Run, control: socket.socket, info: P.ServerInfo, host_ip: str,
                filter_obs: mapping.Observation, reflect: bool) -> RawEvidence:
    """Send every raw probe, wait for the answers, return what was sent and seen."""
    cfg, state, event = run.cfg, run.state, run.event
    assert state.capture is not None
    capture = state.capture
    waits = tuple(timers.waits_for(cfg.max_wait_s)) if cfg.timers else ()
    unsol_port, reply_port, hairpin_port, followed_port, keep_port, *rest = _reserve(
        state, 5 + hops.MAX_TTL + len(waits), cfg.server.family)
    hop_ports, timer_ports = tuple(rest[:hops.MAX_TTL]), tuple(rest[hops.MAX_TTL:])
    reply_probe, hops_probe, hairpin_probe, timer_probe = plan(
        host_ip, info, filter_obs, reply_port, hairpin_port, hop_ports, timer_ports, waits)
    # REQ-4's followed SYN aims at the public port of our own later SYN: known only when
    # the NAT keeps port numbers (as for the hops probe).
    followed = followed_port if cfg.rfc5382 and reflect else None
    icmp_keep = keep_port if cfg.rfc5382 else None
    run.firewall.sweep_stale_clients()
    state.rules_tag = client_tag(os.getpid())
    run.firewall.install(client_rules([filter_obs.local.port, unsol_port, reply_port,
                                       hairpin_port, followed_port, keep_port, *hop_ports,
                                       *timer_ports]),
                         state.rules_tag)
    stack_trials = host_stack.build(info.addrs[0], info.rst_port, info.icmp_port)
    stack_out: list[host_stack.StackOutcome] = []
    stack_thread = threading.Thread(
        target=lambda: stack_out.extend(host_stack.run(stack_trials)), daemon=True)
    stack_thread.start()
    # The broker's SYNs need nothing crafted here: ask for them while scapy still loads.
    window_s = P.answer_window(rawnet.tcp_rtt_s(control))
    watch_s = REQ4_WATCH_S if cfg.rfc5382 else 0.0
    _request(control, P.Probe(unsol_port, filter_obs.public.port, int(window_s * 1000),
                              int(watch_s * 1000) if watch_s else None, followed), P.Armed)
    armed_at = time.monotonic()
    event("the broker sent its unsolicited and filtering SYNs"
          + (f"; it watches for their answers for {watch_s:g} s (REQ-4)" if watch_s else ""))
    craft.load_scapy()  # waits for the import the background thread started
    event("scapy loaded")
    server_ip, probe_port = info.addrs[0], info.probe_port
    rawnet.send_packets([
        reply_syn.build(reply_probe), *hops.build(hops_probe),
        *([hairpin.build(hairpin_probe)] if cfg.hairpin else []),
        *([craft.syn(host_ip, server_ip, followed, probe_port, P.Seq.FOLLOW)]
          if followed is not None else []),
        *([craft.syn(host_ip, server_ip, icmp_keep, probe_port, P.Seq.ICMP_KEEP)]
          if icmp_keep is not None else [])])
    if reflect:
        _request(control, P.Reflect(hop_ports), P.Reflected)
    timers_deadline = None
    if timer_probe is not None:
        _request(control, P.Timers(waits), P.TimersArmed)
        rawnet.send_packets(timers.build(timer_probe))
        _wait_for_holes(run, timer_probe)
        timers_deadline = time.time()  # the capture's clock: later answers do not count
    event("reply_syn, hops" + (", hairpin" if cfg.hairpin else "")
          + (", REQ-4 and REQ-10" if cfg.rfc5382 else "") + " SYNs sent; waiting for the answers")
    time.sleep(window_s)
    # NC_DONE's answer comes when the broker's watch is over (bounded by WATCH_MAX_S).
    left_s = max(0.0, armed_at + watch_s - time.monotonic())
    result = _request(control, P.Done(), P.Result, mapping.OBSERVE_TIMEOUT_S + left_s)
    time.sleep(SETTLE_S)
    stack_thread.join(host_stack.WAIT_S + 2.5)
    return RawEvidence(unsol_port, reply_probe, hops_probe, hairpin_probe, timer_probe,
                       timers_deadline, window_s, result, tuple(stack_out),
                       tuple(capture.snapshot()), cfg.hairpin, followed, icmp_keep)


def _wait_for_holes(run: _Run, probe: timers.TimersProbe) -> None:
    """Until every hole has had its answer, or the longest wait is over."""
    assert run.state.capture is not None
    progress = run.progress
    begin = time.monotonic()
    end = begin + max(probe.waits) + TIMERS_MARGIN_S
    while time.monotonic() < end:
        if progress is not None:
            progress(time.monotonic() - begin, end - begin)
        if all(timers.passed(probe, run.state.capture.snapshot())):
            break
        time.sleep(0.2)
    if progress is not None:
        progress(end - begin, end - begin)


def _close_sockets(state: _State) -> None:
    if not state.sockets:
        return
    for sock in state.sockets:
        sock.close()
    state.sockets.clear()
    if state.capture is not None:
        time.sleep(SETTLE_S)  # for the FIN exchanges to show in the capture


def _cleanup(state: _State, firewall: Firewall, pcap: str | None) -> None:
    if state.rules_tag is not None:
        try:
            firewall.remove(state.rules_tag)
        except (FirewallError, OSError) as exc:
            print(f"synprobe: could not remove firewall rules {state.rules_tag}: {exc}",
                  file=sys.stderr)
    _close_sockets(state)
    for sock in state.reserved:
        sock.close()
    if state.preload is not None:
        # A daemon thread still importing at interpreter exit aborts the process.
        state.preload.join(PRELOAD_JOIN_S)
    if state.capture is not None:
        state.capture.stop()
        if pcap:
            state.capture.write_pcap(pcap)
