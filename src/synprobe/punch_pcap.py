"""`synprobe punch --pcap FILE`: capture the run's packets while it runs.

A packet socket (``packets.live``: cooked, every interface, a BPF filter keeps IPv4 TCP and
ICMP) is opened from the punch's ``on_local_port`` hook, before the run's first packet, so
nothing is missed: the kernel queues packets from the moment the socket exists. Its thread
keeps TCP segments to or from the run's local port and ICMP errors quoting one, and writes
each at once to a pcapng file with a comment naming its role. No scapy: the punch starts
as fast with --pcap as without, and the loopback device's second copy of each packet is
dropped as libpcap does. Without CAP_NET_RAW it says so once and the punch goes on
uncaptured.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.exitcodes import ExitStatus, ToolError

from . import state
from .packets.decode import (
    ACK,
    ICMP_DEST_UNREACH,
    ICMP_TIME_EXCEEDED,
    LINKTYPE_RAW,
    RST,
    SYN,
    IcmpError,
    Segment,
    decode_frame,
    flags_label,
)
from .packets.live import ARPHRD_LOOPBACK, LiveFrame, PacketSocket, bpf_tcp_port_or_icmp
from .packets.writer import PcapNgWriter, cooked_header
from .rawnet import CAP_NET_RAW, missing_capabilities


@dataclass(frozen=True)
class RunPacket:
    """A packet of the run, as much as its role depends on."""

    outgoing: bool  # sent by this host
    remote: str  # the other endpoint, "ip:port"
    flags: int = 0
    payload: int = 0
    icmp: str = ""  # "port-unreachable" etc. for an ICMP error quoting our segment
    reporter: str = ""  # the ICMP error's source


def packet_role(packet: RunPacket, brokers: Sequence[str], opened: bool = False) -> str:
    """The comment written with a packet, e.g. "punch: SYN from us to 203.0.113.2:40100".
    ``opened``: the connection to this remote finished its opening (the chat follows)."""
    stage = "broker" if packet.remote in brokers else ("chat" if opened else "punch")
    if packet.icmp:
        return (f"{stage}: ICMP {packet.icmp} from {packet.reporter} about our segment to "
                f"{packet.remote}")
    what = flags_label(packet.flags)
    if packet.payload:
        what += f", {packet.payload} B of data"
    direction = f"from us to {packet.remote}" if packet.outgoing else f"from {packet.remote}"
    return f"{stage}: {what} {direction}"


class Roles:
    """Names each packet of a run in order; knows when a connection's opening is over
    (the ACK after a SYN+ACK, or SYN+ACKs both ways in a simultaneous open)."""

    def __init__(self, brokers: Sequence[str]) -> None:
        self.brokers = list(brokers)
        self.syn_acks: dict[str, set[bool]] = {}  # remote -> directions that sent SYN+ACK
        self.opened: set[str] = set()

    def name(self, packet: RunPacket) -> str:
        role = packet_role(packet, self.brokers, packet.remote in self.opened)
        if packet.icmp:
            return role
        syn, ack, rst = packet.flags & SYN, packet.flags & ACK, packet.flags & RST
        if rst or (syn and not ack):
            self.syn_acks.pop(packet.remote, None)
            self.opened.discard(packet.remote)
        elif syn:
            self.syn_acks.setdefault(packet.remote, set()).add(packet.outgoing)
            if len(self.syn_acks[packet.remote]) == 2:
                self.opened.add(packet.remote)
        elif self.syn_acks.get(packet.remote):
            self.opened.add(packet.remote)
        return role


def packet_for_port(record: Segment | IcmpError | None, port: int, outgoing: bool
                    ) -> RunPacket | None:
    """The run's view of one decoded packet, or None if it is not about ``port``."""
    if isinstance(record, Segment):
        if int(record.src.rsplit(":", 1)[1]) == port and (
                outgoing or int(record.dst.rsplit(":", 1)[1]) != port):
            return RunPacket(True, record.dst, record.flags, record.payload)
        if int(record.dst.rsplit(":", 1)[1]) == port:
            return RunPacket(False, record.src, record.flags, record.payload)
        return None
    if isinstance(record, IcmpError) and record.icmp_type in (
            ICMP6_ERRORS if record.v6 else (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED)):
        # time-exceeded: the prime strategy's TTL-limited SYN died on the way, by design
        if int(record.quoted_src.rsplit(":", 1)[1]) == port:
            return RunPacket(False, record.quoted_dst, icmp=record.name, reporter=record.reporter)
    return None


ICMP6_ERRORS = (1, 3)  # ICMPv6 destination unreachable, time exceeded (RFC 4443)


class PunchCapture:
    """One capture for one run: ``start(port)`` from the hook, ``stop()`` in a finally."""

    def __init__(self, path: str, brokers: Sequence[Endpoint], note: Callable[[str], None],
                 argv: Sequence[str] | None = None) -> None:
        self.path = path
        self.roles = Roles([str(b) for b in brokers])
        self.note = note
        self.argv = argv
        self.port = 0
        self._socket: PacketSocket | None = None
        self._file: BinaryIO | None = None
        self._pcap: PcapNgWriter | None = None
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise ToolError(ExitStatus.USAGE, f"--pcap {path}: cannot write in {directory}")

    def add_broker(self, broker: Endpoint) -> None:
        """Another broker address the run connects to (the mapping check's): its packets
        are the broker's, not the punch's."""
        self.roles.brokers.append(str(broker))

    @property
    def written(self) -> int:
        return self._pcap.packets if self._pcap is not None else 0

    def start(self, port: int) -> None:
        """Open the capture for ``port``; once this returns, no packet of the run is missed."""
        self.port = port
        missing = missing_capabilities(CAP_NET_RAW)
        if missing:
            self.note(f"capture skipped: --pcap needs {' and '.join(missing)} (run it as "
                      "root, or give python cap_net_raw); the punch goes on without it")
            return
        capture = PacketSocket(self._frame, cooked=True, bpf=bpf_tcp_port_or_icmp(port),
                               name="pcap")
        try:
            capture.open()
            self._file = open(self.path, "wb")  # noqa: SIM115 (closed in stop())
        except OSError as exc:
            capture.stop()
            raise ToolError(ExitStatus.USAGE, f"--pcap {self.path}: {exc.strerror or exc}"
                            ) from None
        self._pcap = PcapNgWriter(self._file)
        self._socket = capture.start()

    def _frame(self, frame: LiveFrame) -> None:
        assert self._pcap is not None
        if frame.hatype == ARPHRD_LOOPBACK and frame.outgoing:
            return  # loopback shows each packet twice; keep the arriving copy, as libpcap
        record = decode_frame(0, frame.time, LINKTYPE_RAW, frame.data)
        packet = packet_for_port(record, self.port, frame.outgoing)
        if packet is None:
            return
        self._pcap.write(frame.interface, frame.time,
                         cooked_header(frame.pkttype, frame.hatype, frame.address,
                                       frame.protocol) + frame.data,
                         self.roles.name(packet))

    def stop(self) -> None:
        """Stop, flush and close (idempotent); record the file for `synprobe report`."""
        capture, self._socket = self._socket, None
        if capture is None:
            return
        capture.stop()
        if self._file is not None:
            self._file.close()
        self.note(f"capture: {self.written} packet(s) of port {self.port} written to "
                  f"{self.path}"
                  + (f" (stopped early: {capture.error})" if capture.error else ""))
        try:
            state.record_pcap(self.path, self.argv)
        except OSError as exc:
            self.note(f"capture: not recorded for `synprobe report` ({state.state_dir()}: "
                      f"{exc.strerror or exc})")
