"""The one live capture: a Linux packet socket (packet(7)), an optional classic BPF
filter, and a reader thread with a bounded stop. Needs CAP_NET_RAW.

A packet socket starts in microseconds and sees outgoing packets too
(``PACKET_OUTGOING``), so one capture holds every packet a run sends and receives; the
kernel queues packets from the moment the socket exists, so nothing after ``open()`` is
missed. Two users:

- ``Capture`` (nat-check): one interface, whole Ethernet frames, each decoded to a
  ``Seen`` and kept if the probe wants it; written as a classic pcap at the end.
- ``punch_pcap.PunchCapture`` (``punch --pcap``): cooked, every interface, BPF, written
  as pcapng with a comment per packet.
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .decode import ETH_IPV4, ETH_IPV6, LINKTYPE_ETHERNET
from .seen import Seen, parse_frame
from .writer import SNAPLEN, write_pcap

ETH_P_ALL = 0x0003
ARPHRD_LOOPBACK = 772
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35  # asm-generic/socket.h
SO_ATTACH_FILTER = 26
POLL_S = 0.2  # the reader thread looks at its stop pipe at least this often
READ_BATCH = 64  # frames read per wake-up, before select() again
DRAIN_S, DRAIN_MAX = 0.5, 10000  # at stop, what is already queued is read within these
STOP_TIMEOUT_S = 3.0
_ANCILLARY = socket.CMSG_SPACE(16)  # one struct timespec

BpfInsn = tuple[int, int, int, int]  # (code, jt, jf, k): struct sock_filter

SKF_AD_PROTOCOL = 0xFFFFF000  # SKF_AD_OFF + 0: the packet's ethertype (linux/filter.h)
RCVBUF_BYTES = 4 << 20  # asked for (the kernel caps it at net.core.rmem_max)


def bpf_tcp_port_or_icmp(port: int) -> tuple[BpfInsn, ...]:
    """Classic BPF on a cooked IPv4 or IPv6 packet: keep TCP to or from ``port`` and every
    ICMP/ICMPv6 (rare; Python checks which segment an error quotes), drop the rest in the
    kernel, so that a busy host's other traffic cannot fill the socket's buffer and crowd
    out ours. (IPv6: TCP right after the fixed header; extension headers are not followed.)"""
    return (
        (0x28, 0, 0, SKF_AD_PROTOCOL),  # 0: ldh proto
        (0x15, 0, 10, ETH_IPV4),  # 1: jeq #0x800, else IPv6? (12)
        (0x30, 0, 0, 9),  # 2: ldb [9]: the IPv4 protocol
        (0x15, 16, 0, 1),  # 3: jeq #1 (ICMP) -> accept
        (0x15, 0, 16, 6),  # 4: jeq #6 (TCP), else drop
        (0x28, 0, 0, 6),  # 5: ldh [6]: flags and fragment offset
        (0x45, 14, 0, 0x1FFF),  # 6: jset #0x1fff (a later fragment: no ports) -> drop
        (0xB1, 0, 0, 0),  # 7: ldxb 4*([0]&0xf): the IP header's length
        (0x48, 0, 0, 0),  # 8: ldh [x+0]: the source port
        (0x15, 10, 0, port),  # 9: jeq #port -> accept
        (0x48, 0, 0, 2),  # 10: ldh [x+2]: the destination port
        (0x15, 8, 9, port),  # 11: jeq #port -> accept, else drop
        (0x15, 0, 8, ETH_IPV6),  # 12: jeq #0x86dd, else drop
        (0x30, 0, 0, 6),  # 13: ldb [6]: the next header
        (0x15, 5, 0, 58),  # 14: jeq #58 (ICMPv6) -> accept
        (0x15, 0, 5, 6),  # 15: jeq #6 (TCP), else drop
        (0x28, 0, 0, 40),  # 16: ldh [40]: the source port
        (0x15, 2, 0, port),  # 17: jeq #port -> accept
        (0x28, 0, 0, 42),  # 18: ldh [42]: the destination port
        (0x15, 0, 1, port),  # 19: jeq #port -> accept, else drop
        (0x06, 0, 0, SNAPLEN),  # 20: accept
        (0x06, 0, 0, 0))  # 21: drop


@dataclass(frozen=True)
class LiveFrame:
    """One frame as the packet socket gave it (its sockaddr_ll fields beside it)."""

    time: float  # the kernel's receive time stamp (SO_TIMESTAMPNS), Unix time
    data: bytes  # an Ethernet frame, or the network-layer packet on a cooked socket
    interface: str
    protocol: int  # ethertype
    pkttype: int  # PACKET_HOST, PACKET_OUTGOING, ...
    hatype: int  # ARPHRD_ETHER, ARPHRD_LOOPBACK, ...
    address: bytes  # the link-layer source address

    @property
    def outgoing(self) -> bool:
        return self.pkttype == PACKET_OUTGOING


def _attach_filter(sock: socket.socket, program: Sequence[BpfInsn]) -> None:
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(code)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class PacketSocket:
    """A packet socket and the thread that hands each frame to ``on_frame``.

    ``interface``: bind to that one (None: every interface). ``cooked``: SOCK_DGRAM, the
    link header removed (as ``tcpdump -i any``); else SOCK_RAW, whole frames. ``open()``
    raises OSError (PermissionError without CAP_NET_RAW); ``stop()`` reads what is
    already queued (bounded by DRAIN_S and DRAIN_MAX), then ends the thread within
    STOP_TIMEOUT_S. An exception in ``on_frame`` ends the thread and is kept in ``error``.
    """

    def __init__(self, on_frame: Callable[[LiveFrame], None], *, interface: str | None = None,
                 cooked: bool = False, bpf: Sequence[BpfInsn] = (),
                 name: str = "capture") -> None:
        self.on_frame = on_frame
        self.interface = interface
        self.cooked = cooked
        self.bpf = bpf
        self.name = name
        self.error: str | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1

    def open(self) -> PacketSocket:
        """Open the socket: from here on the kernel queues every frame for us."""
        # ETH_P_ALL: a socket for one protocol sees only packets coming in.
        kind = socket.SOCK_DGRAM if self.cooked else socket.SOCK_RAW
        sock = socket.socket(socket.AF_PACKET, kind, socket.htons(ETH_P_ALL))
        try:
            if self.bpf:
                _attach_filter(sock, self.bpf)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
            if self.interface is not None:
                sock.bind((self.interface, 0))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return self

    def start(self) -> PacketSocket:
        """Open if not yet open, and start the reader thread."""
        if self._sock is None:
            self.open()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._read, name=self.name, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._sock is not None
        sock_fd = self._sock.fileno()
        try:
            while True:
                ready, _, _ = select.select([sock_fd, self._wake_r], [], [], POLL_S)
                if self._wake_r in ready:
                    # Stopping: take what is already queued (bounded: a busy host keeps
                    # queueing other traffic), then end.
                    self._batch(DRAIN_MAX, time.monotonic() + DRAIN_S)
                    return
                if ready:
                    self._batch(READ_BATCH)
        except Exception as exc:  # the thread must not die silently: the owner reports it
            self.error = f"{exc.__class__.__name__}: {exc}"

    def _batch(self, most: int, deadline: float | None = None) -> None:
        assert self._sock is not None
        for _ in range(most):
            if deadline is not None and time.monotonic() > deadline:
                return
            try:
                data, cmsgs, _flags, address = self._sock.recvmsg(SNAPLEN, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            interface, protocol, pkttype, hatype, hwaddr = address
            when = time.time()
            for level, kind, value in cmsgs:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                    sec, nsec = struct.unpack("qq", value[:16])
                    when = sec + nsec / 1e9
            self.on_frame(LiveFrame(when, data, interface, protocol, pkttype, hatype, hwaddr))

    def stop(self) -> None:
        """Drain, end the thread and close (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            os.write(self._wake_w, b"x")
            thread.join(STOP_TIMEOUT_S)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
        if self._sock is not None:
            self._sock.close()
            self._sock = None


CAPTURE_MAX_FRAMES = 4096  # a nat-check capture keeps at most this many matching frames


@dataclass
class Capture:
    """nat-check's capture: the frames on one interface that ``keep`` accepts, as
    ``Seen``, in a background thread. Bounded by ``max_frames`` and by ``stop()``.
    ``on_packet`` runs in the capture thread for each kept packet."""

    iface: str
    keep: Callable[[Seen], bool]
    on_packet: Callable[[Seen], None] | None = None
    max_frames: int = CAPTURE_MAX_FRAMES
    frames: list[tuple[float, bytes]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    _socket: PacketSocket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Capture:
        self._socket = PacketSocket(self._frame, interface=self.iface,
                                    name=f"capture-{self.iface}").start()
        return self

    def _frame(self, frame: LiveFrame) -> None:
        if len(self.frames) >= self.max_frames:
            return
        seen = parse_frame(frame.data, LINKTYPE_ETHERNET, frame.time, frame.outgoing)
        if seen is None or not self.keep(seen):
            return
        with self._lock:
            self.frames.append((frame.time, frame.data))
            self.seen.append(seen)
        if self.on_packet is not None:
            self.on_packet(seen)

    def snapshot(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def stop(self) -> None:
        if self._socket is not None:
            self._socket.stop()

    def write_pcap(self, path: str) -> int:
        with self._lock:
            frames = list(self.frames)
        return write_pcap(path, frames, LINKTYPE_ETHERNET)
