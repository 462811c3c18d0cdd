"""`synprobe broker --probe`: the rendezvous broker with nat-check's probe side plugged in.

Imports nothing heavy: scapy loads only when a check sends its first raw probe.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

from simulsyn_core._internal.broker import Log, run_broker
from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.exitcodes import ExitStatus, ToolError
from simulsyn_core._internal.relay import RelayLimits

from . import protocol as P
from .firewall import Firewall, FirewallError
from .server import ProbeServer, probe_firewall, raw_probe_problem

UNSPECIFIED = ("0.0.0.0", "::")  # a wildcard bind is no address to tell clients


def probe_binds(binds: list[Endpoint]) -> list[Endpoint]:
    """The binds plus PORT+1 on each address (the mapping probe's second server port)."""
    out = list(binds)
    for b in binds:
        alt = Endpoint(b.ip, b.port + P.ALT_PORT_OFFSET)
        if b.port and alt not in out:
            out.append(alt)
    return out


def bind_families(binds: list[Endpoint]) -> list[bool]:
    """Which families the binds serve, as "is IPv6" flags (pure): the dual-stack
    wildcard [::] serves both."""
    v6 = {b.is_v6 for b in binds} | ({False} if any(b.ip == "::" for b in binds) else set())
    return sorted(v6)


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _cleanup_guard() -> Iterator[None]:
    """SIGTERM before the event loop runs unwinds through `finally`; during cleanup it is
    ignored so that the firewall rules are always removed."""
    old = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, old)


def run_probing_broker(binds: list[Endpoint], log: Log, firewall: Firewall | None = None,
                       relay: RelayLimits | None = None) -> int:
    """Without the privileges for raw probes, say which one line and serve the mapping
    probe (and the rendezvous) anyway: clients are told why raw probes are off."""
    firewall = firewall or Firewall()
    # One firewall a family: iptables rules never see IPv6 packets, nor ip6tables IPv4.
    firewalls = [Firewall.for_family(True, firewall.run) if v6 else firewall
                 for v6 in bind_families(binds)]
    problem = next((p for p in map(raw_probe_problem, firewalls) if p), "")
    if problem:
        # Said even with --quiet: the operator must know why clients get no raw probes.
        print(f"synprobe: broker: nat-check raw probes are off (the broker {problem}); "
              "serving the mapping probe only", file=sys.stderr, flush=True)
    addrs = list(dict.fromkeys(b.ip for b in binds if b.ip not in UNSPECIFIED))
    server = ProbeServer(addrs, raw_reason=f"the broker {problem}" if problem else "", log=log)
    ports = sorted({b.port for b in binds if b.port})
    with _cleanup_guard():
        try:
            with contextlib.ExitStack() as rules:
                if not problem:
                    for each in firewalls:
                        rules.enter_context(probe_firewall(each, ports, log))
                return run_broker(probe_binds(binds), log=log, services=server.services(),
                                  syn_probe=True, relay=relay)
        except FirewallError as exc:
            raise ToolError(ExitStatus.ERROR, f"broker --probe: {exc}") from None
        except OSError as exc:
            raise ToolError(ExitStatus.ADDRESS_IN_USE,
                            f"cannot listen: {exc.strerror or exc}") from None
        finally:
            server.close()
