"""`synprobe punch --pcap FILE`: capture the run's packets while it runs.

A Linux packet socket (cooked, every interface; a BPF filter keeps IPv4 TCP and ICMP) is
opened from the punch's ``on_local_port`` hook, before the run's first packet, so nothing
is missed: the kernel queues packets from the moment the socket exists. A thread keeps TCP
segments to or from the run's local port and ICMP errors quoting one, and writes each at
once to a pcapng file with a comment naming its role. No scapy: the punch starts as fast
with --pcap as without, and the loopback device's second copy of each packet is dropped
as libpcap does. Without CAP_NET_RAW it says so once and the punch goes on uncaptured.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from simulsyn_core import __version__
from simulsyn_core.endpoint import Endpoint
from simulsyn_core.exitcodes import ExitStatus, ToolError

from . import state
from .analyze_pcap import ACK, RST, SYN, IcmpError, Segment, decode_frame, flags_label

ETH_P_ALL, ETH_P_IP = 0x0003, 0x0800
ARPHRD_LOOPBACK = 772
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35  # asm-generic/socket.h
SO_ATTACH_FILTER = 26
LINKTYPE_LINUX_SLL = 113
LINKTYPE_RAW = 101
SNAPLEN = 65535
STOP_TIMEOUT_S = 3.0
POLL_S = 0.2  # the reader thread looks at its stop pipe at least this often
DRAIN_S, DRAIN_MAX = 0.5, 10000  # at stop, what is already queued is read within these

# Classic BPF on the cooked packet: keep IPv4 TCP (6) and ICMP (1), drop the rest in the
# kernel; ports are checked in Python (ICMP quotes them deeper than a short filter reads).
SKF_AD_PROTOCOL = 0xFFFFF000  # SKF_AD_OFF + 0: the packet's ethertype (linux/filter.h)
_BPF = [(0x28, 0, 0, SKF_AD_PROTOCOL),  # ldh proto
        (0x15, 0, 4, ETH_P_IP),  # jeq #0x800, else drop
        (0x30, 0, 0, 9),  # ldb [9]: the IPv4 protocol
        (0x15, 1, 0, 6),  # jeq #6 -> accept
        (0x15, 0, 1, 1),  # jeq #1 -> accept, else drop
        (0x06, 0, 0, SNAPLEN),  # accept
        (0x06, 0, 0, 0)]  # drop



@dataclass(frozen=True)
class Seen:
    """What the role of a packet depends on."""

    outgoing: bool  # sent by this host
    remote: str  # the other endpoint, "ip:port"
    flags: int = 0
    payload: int = 0
    icmp: str = ""  # "port-unreachable" etc. for an ICMP error quoting our segment
    reporter: str = ""  # the ICMP error's source


def packet_role(seen: Seen, brokers: Sequence[str], opened: bool = False) -> str:
    """The comment written with a packet, e.g. "punch: SYN from us to 203.0.113.2:40100".
    ``opened``: the connection to this remote finished its opening (the chat follows)."""
    stage = "broker" if seen.remote in brokers else ("chat" if opened else "punch")
    if seen.icmp:
        return (f"{stage}: ICMP {seen.icmp} from {seen.reporter} about our segment to "
                f"{seen.remote}")
    what = flags_label(seen.flags)
    if seen.payload:
        what += f", {seen.payload} B of data"
    direction = f"from us to {seen.remote}" if seen.outgoing else f"from {seen.remote}"
    return f"{stage}: {what} {direction}"


class Roles:
    """Names each packet of a run in order; knows when a connection's opening is over
    (the ACK after a SYN+ACK, or SYN+ACKs both ways in a simultaneous open)."""

    def __init__(self, brokers: Sequence[str]) -> None:
        self.brokers = list(brokers)
        self.syn_acks: dict[str, set[bool]] = {}  # remote -> directions that sent SYN+ACK
        self.opened: set[str] = set()

    def name(self, seen: Seen) -> str:
        role = packet_role(seen, self.brokers, seen.remote in self.opened)
        if seen.icmp:
            return role
        syn, ack, rst = seen.flags & SYN, seen.flags & ACK, seen.flags & RST
        if rst or (syn and not ack):
            self.syn_acks.pop(seen.remote, None)
            self.opened.discard(seen.remote)
        elif syn:
            self.syn_acks.setdefault(seen.remote, set()).add(seen.outgoing)
            if len(self.syn_acks[seen.remote]) == 2:
                self.opened.add(seen.remote)
        elif self.syn_acks.get(seen.remote):
            self.opened.add(seen.remote)
        return role


def seen_for_port(record: Segment | IcmpError | None, port: int, outgoing: bool
                  ) -> Seen | None:
    """The run's view of one decoded packet, or None if it is not about ``port``."""
    if isinstance(record, Segment):
        if int(record.src.rsplit(":", 1)[1]) == port and (
                outgoing or int(record.dst.rsplit(":", 1)[1]) != port):
            return Seen(True, record.dst, record.flags, record.payload)
        if int(record.dst.rsplit(":", 1)[1]) == port:
            return Seen(False, record.src, record.flags, record.payload)
        return None
    if isinstance(record, IcmpError) and record.icmp_type == 3:
        if int(record.quoted_src.rsplit(":", 1)[1]) == port:
            return Seen(False, record.quoted_dst, icmp=record.name, reporter=record.reporter)
    return None


class PcapNgFile:
    """A minimal pcapng writer (one section; an interface block per interface as it first
    appears; enhanced packet blocks with opt_comment), flushed after every packet."""

    def __init__(self, out: BinaryIO, linktype: int = LINKTYPE_LINUX_SLL) -> None:
        self.out = out
        self.linktype = linktype
        self.interfaces: dict[str, int] = {}
        self.packets = 0
        shb = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + self._options(
            [(4, f"synprobe {__version__}")])  # shb_userappl
        self._block(0x0A0D0D0A, shb)

    @staticmethod
    def _options(options: Sequence[tuple[int, str | bytes]]) -> bytes:
        out = b""
        for code, value in options:
            data = value.encode() if isinstance(value, str) else value
            out += struct.pack("<HH", code, len(data)) + data + b"\0" * (-len(data) % 4)
        return out + struct.pack("<HH", 0, 0) if out else b""

    def _block(self, block_type: int, body: bytes) -> None:
        length = 12 + len(body)
        self.out.write(struct.pack("<II", block_type, length) + body
                       + struct.pack("<I", length))

    def write(self, interface: str, when: float, frame: bytes, comment: str = "") -> None:
        if interface not in self.interfaces:
            self.interfaces[interface] = len(self.interfaces)
            # if_name (2), if_tsresol (9) = 10^-9
            self._block(1, struct.pack("<HHI", self.linktype, 0, SNAPLEN)
                        + self._options([(2, interface), (9, b"\x09")]))
        stamp = int(round(when * 1e9))
        body = struct.pack("<IIIII", self.interfaces[interface], stamp >> 32,
                           stamp & 0xFFFFFFFF, len(frame), len(frame))
        body += frame + b"\0" * (-len(frame) % 4)
        body += self._options([(1, comment)] if comment else [])
        self._block(6, body)
        self.out.flush()
        self.packets += 1


def cooked_header(pkttype: int, hatype: int, address: bytes, protocol: int) -> bytes:
    """The Linux cooked-capture (SLL) header libpcap writes for `tcpdump -i any`."""
    return struct.pack("!HHH8sH", pkttype, hatype, len(address), address[:8].ljust(8, b"\0"),
                       protocol)


def _attach_filter(sock: socket.socket) -> None:
    program = b"".join(struct.pack("HBBI", *insn) for insn in _BPF)
    buffer = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(_BPF), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class PunchCapture:
    """One capture for one run: ``start(port)`` from the hook, ``stop()`` in a finally."""

    def __init__(self, path: str, brokers: Sequence[Endpoint], note: Callable[[str], None],
                 argv: Sequence[str] | None = None) -> None:
        self.path = path
        self.roles = Roles([str(b) for b in brokers])
        self.note = note
        self.argv = argv
        self.port = 0
        self.skipped: str | None = None
        self.error: str | None = None
        self._sock: socket.socket | None = None
        self._file: BinaryIO | None = None
        self._pcap: PcapNgFile | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._old_sigterm: object = None
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise ToolError(ExitStatus.USAGE, f"--pcap {path}: cannot write in {directory}")

    @property
    def written(self) -> int:
        return self._pcap.packets if self._pcap is not None else 0

    def start(self, port: int) -> None:
        """Open the capture for ``port``; once this returns, no packet of the run is missed."""
        self.port = port
        try:
            # ETH_P_ALL: a socket for one protocol sees only packets coming in.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        except PermissionError:
            self.skipped = "needs CAP_NET_RAW (run it as root, or give python cap_net_raw)"
            self.note(f"capture skipped: --pcap {self.skipped}; the punch goes on without it")
            return
        try:
            _attach_filter(sock)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self._file = open(self.path, "wb")  # noqa: SIM115 (closed in stop())
        except OSError as exc:
            sock.close()
            raise ToolError(ExitStatus.USAGE, f"--pcap {self.path}: {exc.strerror or exc}"
                            ) from None
        self._sock = sock
        self._pcap = PcapNgFile(self._file)
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._read, name="pcap", daemon=True)
        self._thread.start()
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
            # SIGTERM unwinds like Ctrl-C, so that stop() still closes and records the file.
            self._old_sigterm = signal.signal(signal.SIGTERM, _interrupt)

    def _read(self) -> None:
        assert self._sock is not None and self._pcap is not None
        ancillary = socket.CMSG_SPACE(16)
        try:
            while True:
                sock_fd = self._sock.fileno()
                ready, _, _ = select.select([sock_fd, self._wake_r], [], [], POLL_S)
                if self._wake_r in ready:
                    # Stopping: take what is already queued (bounded: a busy host
                    # keeps queueing other TCP), then end.
                    self._sock.setblocking(False)
                    end = time.monotonic() + DRAIN_S
                    with contextlib.suppress(BlockingIOError):
                        for _ in range(DRAIN_MAX):
                            if time.monotonic() > end:
                                break
                            self._one(ancillary)
                    return
                if sock_fd in ready:
                    self._one(ancillary)
        except Exception as exc:  # the thread must not die silently: say it at stop()
            self.error = f"{exc.__class__.__name__}: {exc}"

    def _one(self, ancillary: int) -> None:
        assert self._sock is not None and self._pcap is not None
        data, cmsgs, _flags, address = self._sock.recvmsg(SNAPLEN, ancillary)
        interface, protocol, pkttype, hatype, hwaddr = address
        if hatype == ARPHRD_LOOPBACK and pkttype == PACKET_OUTGOING:
            return  # loopback shows each packet twice; keep the arriving copy, as libpcap
        when = time.time()
        for level, kind, value in cmsgs:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                sec, nsec = struct.unpack("qq", value[:16])
                when = sec + nsec / 1e9
        record = decode_frame(0, when, LINKTYPE_RAW, data)
        seen = seen_for_port(record, self.port, pkttype == PACKET_OUTGOING)
        if seen is None:
            return
        self._pcap.write(interface, when, cooked_header(pkttype, hatype, hwaddr, protocol)
                         + data, self.roles.name(seen))

    def stop(self) -> None:
        """Stop, flush and close (idempotent); record the file for `synprobe report`."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)  # type: ignore[arg-type]
        os.write(self._wake_w, b"x")
        thread.join(STOP_TIMEOUT_S)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        if self._sock is not None:
            self._sock.close()
        if self._file is not None:
            self._file.close()
        self.note(f"capture: {self.written} packet(s) of port {self.port} written to "
                  f"{self.path}" + (f" (stopped early: {self.error})" if self.error else ""))
        try:
            state.record_pcap(self.path, self.argv)
        except OSError as exc:
            self.note(f"capture: not recorded for `synprobe report` ({state.state_dir()}: "
                      f"{exc.strerror or exc})")
