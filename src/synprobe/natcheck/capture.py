"""The I/O under the probes: an AF_PACKET capture, a raw IPv4 sender, capabilities.

Sniffing uses a plain ``AF_PACKET`` socket (Linux packet(7)) bound to one interface:
it starts in microseconds and sees outgoing packets too (``PACKET_OUTGOING``), so one
capture holds every probe packet sent and received. Needs CAP_NET_RAW.
"""

from __future__ import annotations

import contextlib
import fcntl
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .packets import LINKTYPE_ETHERNET, Seen, parse_frame, write_pcap

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SIOCGIFADDR = 0x8915
CAPTURE_MAX_FRAMES = 4096  # a capture keeps at most this many matching frames
CAPTURE_POLL_S = 0.05

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13


def effective_capabilities() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing_capabilities(*caps: int) -> list[str]:
    """Names of the capabilities (of CAP_NET_RAW, CAP_NET_ADMIN) this process lacks."""
    eff = effective_capabilities()
    names = {CAP_NET_RAW: "CAP_NET_RAW", CAP_NET_ADMIN: "CAP_NET_ADMIN"}
    return [names[c] for c in caps if not eff >> c & 1]


def local_ip_towards(remote_ip: str) -> str:
    """The source address the kernel picks for remote_ip (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((remote_ip, 9))
        return str(probe.getsockname()[0])


def interface_of(ip: str) -> str:
    """The interface that holds ip (SIOCGIFADDR over every interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR,
                                  struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == ip:
                return name
    raise OSError(f"no interface holds {ip}")


def interfaces_with_ip(ips: set[str]) -> list[str]:
    out = []
    for ip in ips:
        with contextlib.suppress(OSError):
            out.append(interface_of(ip))
    return sorted(set(out))


TCP_INFO_RTT_OFFSET = 68  # struct tcp_info: tcpi_rtt, microseconds (linux/tcp.h)


def tcp_rtt_s(sock: socket.socket) -> float:
    """The kernel's smoothed RTT of a connected TCP socket (0.0 if unknown)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return 0.0
    if len(info) < TCP_INFO_RTT_OFFSET + 4:
        return 0.0
    return int(struct.unpack_from("I", info, TCP_INFO_RTT_OFFSET)[0]) / 1e6


def send_ipv4(packets: list[bytes]) -> int:
    """Send whole IPv4 packets (header included) through a raw socket. CAP_NET_RAW."""
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        for pkt in packets:
            dst = socket.inet_ntoa(pkt[16:20])
            raw.sendto(pkt, (dst, 0))
    return len(packets)


@dataclass
class Capture:
    """Frames on one interface that ``keep`` accepts, in a background thread.

    Bounded by ``max_frames`` and by ``stop()``; the thread checks the stop flag every
    ``CAPTURE_POLL_S``. ``on_packet`` runs in the capture thread for each kept packet.
    """

    iface: str
    keep: Callable[[Seen], bool]
    on_packet: Callable[[Seen], None] | None = None
    max_frames: int = CAPTURE_MAX_FRAMES
    frames: list[tuple[float, bytes]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Capture:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            sock.bind((self.iface, 0))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._loop, name=f"capture-{self.iface}",
                                        daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set() and len(self.frames) < self.max_frames:
            ready, _, _ = select.select([self._sock], [], [], CAPTURE_POLL_S)
            if not ready:
                continue
            for _ in range(64):
                try:
                    frame, addr = self._sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    return
                now = time.time()
                seen = parse_frame(frame, LINKTYPE_ETHERNET, now, addr[2] == PACKET_OUTGOING)
                if seen is None or not self.keep(seen):
                    continue
                with self._lock:
                    self.frames.append((now, frame))
                    self.seen.append(seen)
                if self.on_packet is not None:
                    self.on_packet(seen)

    def snapshot(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def wait_for(self, predicate: Callable[[Seen], bool], timeout_s: float) -> Seen | None:
        """The first kept packet that matches, waiting at most timeout_s."""
        end = time.monotonic() + timeout_s
        while True:
            for s in self.snapshot():
                if predicate(s):
                    return s
            if time.monotonic() >= end:
                return None
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def write_pcap(self, path: str) -> int:
        with self._lock:
            frames = list(self.frames)
        return write_pcap(path, frames, LINKTYPE_ETHERNET)

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
