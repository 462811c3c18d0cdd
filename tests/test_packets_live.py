"""The live capture's kernel filter: only the run's port (and ICMP) reach the socket, so a
busy host's other traffic cannot fill its buffer and crowd out the run's packets."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from synprobe.packets.live import LiveFrame, PacketSocket, bpf_tcp_port_or_icmp
from tests.helpers import free_port


def _ports(frame: LiveFrame) -> tuple[int, int] | None:
    data = frame.data
    if len(data) < 20 or data[0] >> 4 != 4 or data[9] != 6:
        return None
    ihl = (data[0] & 0x0F) * 4
    sport, dport = struct.unpack_from("!HH", data, ihl)
    return sport, dport


@pytest.mark.skipif(os.geteuid() != 0, reason="a packet socket needs CAP_NET_RAW")
def test_the_filter_keeps_only_the_port_it_names() -> None:
    listeners = []
    for _ in range(2):
        srv = socket.socket()
        # below the ephemeral range: no parallel test's client port can be ours
        srv.bind(("127.0.0.1", free_port()))
        srv.listen()
        listeners.append(srv)
    ours, other = (s.getsockname()[1] for s in listeners)
    frames: list[LiveFrame] = []
    lock = threading.Lock()

    def keep(frame: LiveFrame) -> None:
        with lock:
            frames.append(frame)

    capture = PacketSocket(keep, cooked=True, bpf=bpf_tcp_port_or_icmp(ours)).start()
    try:
        for port in (other, ours, other):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                c.sendall(b"x" * 100)
        for srv in listeners:
            srv.close()
        end = time.monotonic() + 5
        while time.monotonic() < end:
            with lock:
                if any(p and ours in p for p in map(_ports, frames)):
                    break
            time.sleep(0.01)
    finally:
        capture.stop()
    ports = [p for p in map(_ports, frames) if p is not None]
    assert ports, "nothing captured for the named port"
    assert all(ours in p for p in ports), ports
    assert not any(other in p for p in ports)
