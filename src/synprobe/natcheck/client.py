"""The client side of nat-check: runs every probe against a broker and builds the report.

Order (about 1 s in the lab): the control connection and the mapping connections (plain
sockets); then, with CAP_NET_RAW and CAP_NET_ADMIN, one capture for every raw probe:
the broker's unsolicited and filtering SYNs, our reply_syn, hops and hairpin SYNs, the
host_stack connects; with --timers, the hole lifetime. Everything opened here (sockets,
the capture, the firewall rules scoped to our probe ports) is closed in ``finally``.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from simulsyn_core.endpoint import Endpoint
from simulsyn_core.exitcodes import ExitStatus, ToolError
from simulsyn_core.wire import LineDecoder, ProtocolError

from . import capture as cap
from . import craft, filtering, hairpin, hops, host_stack, mapping, reply_syn, timers
from . import protocol as P
from .firewall import Firewall, FirewallError, client_rules, client_tag
from .packets import Seen
from .recommend import recommend, verdict
from .report import Findings, NatCheckReport

Event = Callable[[str], None]
SETTLE_S = 0.05  # after the broker's result, for its last SYNs to reach our capture
TIMERS_MARGIN_S = 0.5
PRELOAD_JOIN_S = 20.0


@dataclass(frozen=True)
class CheckConfig:
    server: Endpoint
    timers: bool = False
    max_wait_s: float = 150.0
    pcap: str | None = None


@dataclass
class _State:
    sockets: list[socket.socket] = field(default_factory=list)
    reserved: list[socket.socket] = field(default_factory=list)
    capture: cap.Capture | None = None
    rules_tag: str | None = None
    preload: threading.Thread | None = None


def _reserve(state: _State, n: int) -> list[int]:
    """n local ports nobody else may take while the check runs (bound, never used)."""
    ports = []
    for _ in range(n):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("0.0.0.0", 0))
        state.reserved.append(sock)
        ports.append(sock.getsockname()[1])
    return ports


def raw_problem(firewall: Firewall) -> tuple[str, ExitStatus]:
    missing = cap.missing_capabilities(cap.CAP_NET_RAW, cap.CAP_NET_ADMIN)
    if missing:
        return (f"raw probes need {' and '.join(missing)} (run as root, or "
                "setcap cap_net_raw,cap_net_admin+ep on the Python binary)",
                ExitStatus.NO_PRIVILEGE)
    if not firewall.available:
        return (f"raw probes need {firewall.binary} (Debian: apt-get install iptables)",
                ExitStatus.MISSING_TOOL)
    return "", ExitStatus.OK


def run_natcheck(cfg: CheckConfig, event: Event = lambda _m: None,
                 progress: Callable[[float, float], None] | None = None,
                 firewall: Firewall | None = None) -> NatCheckReport:
    firewall = firewall or Firewall()
    start = time.monotonic()
    problem, problem_status = raw_problem(firewall)
    raw_ok = not problem
    state = _State()
    if raw_ok:
        state.preload = craft.preload_in_background()  # ~0.7 s, while plain sockets work
    reasons: list[tuple[str, str]] = []
    try:
        try:
            host_ip = cap.local_ip_towards(cfg.server.ip)
        except OSError as exc:
            raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                            f"no route to {cfg.server}: {exc}") from None
        servers = {cfg.server.ip}
        if raw_ok:
            state.capture = cap.Capture(cap.interface_of(host_ip),
                                        lambda s: _keep(s, host_ip, servers)).start()
        control, info = _hello(cfg.server)
        servers.update(info.addrs)
        state.sockets.append(control)
        event(f"broker {cfg.server}: public {info.public}, addresses {','.join(info.addrs)}, "
              f"raw probes {'on' if info.raw else 'off: ' + info.raw_reason}")
        control_obs = mapping.Observation(Endpoint.from_sockaddr(control.getsockname()),
                                          cfg.server, info.public)
        try:
            same, fresh = mapping.run(mapping.build(info), control_obs.local.port,
                                      state.sockets)
        except (OSError, TimeoutError, ProtocolError) as exc:
            raise ToolError(ExitStatus.BROKER_UNREACHABLE, f"mapping probe: {exc}") from None
        m = mapping.classify(control_obs, same, fresh, [host_ip])
        reasons += m.reasons
        event(f"mapping {m.mapping}, preservation {m.port_preservation}, "
              f"allocation {m.port_allocation}")
        base = Findings(public=tuple(str(p) for p in m.public), behind_nat=m.behind_nat,
                        mapping=m.mapping, port_preservation=m.port_preservation,
                        port_allocation=m.port_allocation)
        raw_keys = ("filtering", "unsolicited_syn", "reply_syn", "hairpin", "hops",
                    "host_stack")
        findings = base
        path: tuple[str | None, ...] = ()
        broker_sent = 0
        probes: dict[str, object] = {"host": host_ip, "server_port": info.port,
                                     "filter_local_port": fresh[0].local.port}
        if not raw_ok:
            reasons += [(k, f"not measured: {problem}") for k in raw_keys]
        elif not info.raw:
            reasons += [(k, f"not measured: {info.raw_reason}") for k in raw_keys]
        else:
            findings, path, broker_sent, more = _raw_phase(
                cfg, state, firewall, control, info, host_ip, m, fresh[0], base, event,
                progress, probes)
            reasons += more
        if not cfg.timers:
            reasons.append(("syn_sent_lifetime_s", "not measured: needs --timers"))
        findings = Findings(**{**findings.__dict__, "reasons": tuple(reasons)})
        _close_sockets(state)  # the closing segments count among the check's packets
        seen = state.capture.snapshot() if state.capture else []
        packets = {"sent_by_client": sum(1 for s in seen if s.outgoing),
                   "received_by_client": sum(1 for s in seen if not s.outgoing),
                   "sent_by_server_raw": broker_sent}
        status = problem_status if not raw_ok else ExitStatus.OK
        return NatCheckReport(
            server=str(cfg.server), findings=findings, recommendation=recommend(findings),
            verdict=verdict(findings), duration_s=time.monotonic() - start,
            packets=packets if state.capture else {}, path=path, pcap=cfg.pcap, probes=probes,
            exit_code=int(status), error=problem or None)
    finally:
        _cleanup(state, firewall, cfg.pcap)


def _keep(s: Seen, host_ip: str, servers: set[str]) -> bool:
    """Packets of the check: to or from the broker, ICMP errors, SYNs and RSTs of ours."""
    if s.proto == 1:
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


def _request(control: socket.socket, request: P.NcMessage, kind: type[mapping.Answer]
             ) -> mapping.Answer:
    control.sendall(bytes(request))
    return mapping.read_message(control, LineDecoder(), kind)


def _raw_phase(cfg: CheckConfig, state: _State, firewall: Firewall, control: socket.socket,
               info: P.ServerInfo, host_ip: str, m: mapping.MappingResult,
               filter_obs: mapping.Observation, base: Findings, event: Event,
               progress: Callable[[float, float], None] | None, probes: dict[str, object]
               ) -> tuple[Findings, tuple[str | None, ...], int, list[tuple[str, str]]]:
    assert state.capture is not None
    capture = state.capture
    reasons: list[tuple[str, str]] = []
    server_ip = info.addrs[0]
    other_ip = info.addrs[1] if len(info.addrs) > 1 else None
    waits = timers.waits_for(cfg.max_wait_s) if cfg.timers else []
    unsol_port, reply_port, hairpin_port, *rest = _reserve(state, 3 + hops.MAX_TTL + len(waits))
    hop_ports, timer_ports = tuple(rest[:hops.MAX_TTL]), tuple(rest[hops.MAX_TTL:])
    probes.update(unsolicited_port=unsol_port, reply_port=reply_port,
                  hairpin_port=hairpin_port, hop_ports=list(hop_ports),
                  timer_ports=list(timer_ports), timer_waits=waits)
    firewall.sweep_stale_clients()
    state.rules_tag = client_tag(os.getpid())
    firewall.install(client_rules([filter_obs.local.port, unsol_port, reply_port, hairpin_port,
                                   *hop_ports, *timer_ports]), state.rules_tag)
    stack_trials = host_stack.build(server_ip, info.rst_port, info.icmp_port)
    stack_out: list[host_stack.StackOutcome] = []
    stack_thread = threading.Thread(
        target=lambda: stack_out.extend(host_stack.run(stack_trials)), daemon=True)
    stack_thread.start()
    # The broker's SYNs need nothing crafted here: ask for them while scapy still loads.
    window_s = P.answer_window(cap.tcp_rtt_s(control))
    probes["answer_window_s"] = round(window_s, 3)
    _request(control, P.Probe(unsol_port, filter_obs.public.port, int(window_s * 1000)),
             P.Armed)
    event("the broker sent its unsolicited and filtering SYNs")
    craft.load_scapy()  # waits for the import the background thread started
    event("scapy loaded")
    reply_probe = reply_syn.ReplySynProbe(host_ip, reply_port, server_ip, info.probe_port)
    hops_probe = hops.HopsProbe(host_ip, server_ip, info.probe_port, hop_ports)
    hairpin_probe = hairpin.HairpinProbe(host_ip, hairpin_port, filter_obs.public,
                                         filter_obs.local.port)
    cap.send_ipv4([reply_syn.build(reply_probe), *hops.build(hops_probe),
                   hairpin.build(hairpin_probe)])
    predictable = m.port_preservation
    if predictable:
        _request(control, P.Reflect(hop_ports), P.Reflected)
    if waits:
        _request(control, P.Timers(tuple(waits)), P.TimersArmed)
        timer_probe = timers.TimersProbe(host_ip, server_ip, info.probe_port, timer_ports,
                                         tuple(waits))
        cap.send_ipv4(timers.build(timer_probe))
    lifetime: float | None = None
    if waits:
        end = time.monotonic() + max(waits) + TIMERS_MARGIN_S
        begin = time.monotonic()
        while time.monotonic() < end:
            if progress is not None:
                progress(time.monotonic() - begin, end - begin)
            if all(timers.passed(timer_probe, capture.snapshot())):
                break
            time.sleep(0.2)
        if progress is not None:
            progress(end - begin, end - begin)
        lifetime, why = timers.classify(timer_probe, capture.snapshot())
        reasons.append(("syn_sent_lifetime_s", why))
    event("reply_syn, hops and hairpin SYNs sent; waiting for the answers")
    time.sleep(window_s)
    result = _request(control, P.Done(), P.Result)
    time.sleep(SETTLE_S)
    stack_thread.join(host_stack.WAIT_S + 2.5)
    broker_sent = result.sent
    seen = capture.snapshot()
    # unsolicited_syn: the broker saw the NAT's answer; our capture shows a SYN that passed.
    if any(s.is_syn and not s.outgoing and s.dport == unsol_port and s.src == server_ip
           for s in seen):
        unsolicited_syn: str | None = "pass"
        reasons.append(("unsolicited_syn", "the SYN reached this host: the NAT forwards "
                                           "unsolicited SYNs here (DMZ or port forward)"))
    else:
        unsolicited_syn = result.unsolicited
        target = f"the server's SYN to {info.public.ip}:{unsol_port} (no mapping)"
        reasons.append(("unsolicited_syn", {
            None: "the server did not say", "drop": f"no answer came back to {target}",
            "rst": f"a TCP RST came back to {target}",
            "syn-ack": f"a SYN+ACK came back to {target}: a host answered it"}.get(
                unsolicited_syn, f"an ICMP error ({unsolicited_syn}) came back to {target}")))
    filt, why = filtering.classify(seen, filter_obs.local.port, server_ip, other_ip,
                                   info.probe_port)
    reasons.append(("filtering", why))
    reply, why = reply_syn.classify(reply_probe, seen)
    reasons.append(("reply_syn", why))
    hp, why = hairpin.classify(hairpin_probe, seen)
    if not m.behind_nat:
        hp, why = True, "not behind a NAT: the public endpoint is the host's own address"
    reasons.append(("hairpin", why))
    hop_count: int | None
    if not predictable:
        hop_count, why = None, ("the NAT does not preserve ports, so the public port of a "
                                "TTL-limited SYN cannot be known")
    elif reply != "pass":
        hop_count, why = None, "reply SYNs do not pass, so no TTL opens a hole"
    elif filt == filtering.EI or unsolicited_syn == "pass":
        hop_count, why = None, "any SYN reaches the host: no hole is needed, hops not told"
    else:
        hop_count, why = hops.classify(hops_probe, seen)
    reasons.append(("hops", why))
    stack, why = host_stack.classify(stack_out, seen)
    reasons.append(("host_stack", why))
    event(f"raw probes: filtering {filt}, unsolicited {unsolicited_syn}, reply {reply}, "
          f"hairpin {hp}, hops {hop_count}")
    findings = Findings(**{**base.__dict__, "filtering": filt,
                           "unsolicited_syn": unsolicited_syn, "reply_syn": reply,
                           "hairpin": hp, "hops": hop_count, "host_stack": stack,
                           "syn_sent_lifetime_s": lifetime})
    return findings, tuple(hops.path(hops_probe, seen)), broker_sent, reasons


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
