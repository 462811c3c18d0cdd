"""rawnet over IPv6 on this host's loopback (root): the route and interface lookups, and
a crafted IPv6 SYN sent through the raw socket arriving as TCP on ::1."""

from __future__ import annotations

import os
import socket
import time

import pytest

from synprobe import rawnet
from synprobe.natcheck import craft

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="raw sockets need root")
RECV_DEADLINE_S = 3.0


def test_lookups_on_v6_loopback() -> None:
    assert rawnet.local_ip_towards("::1") == "::1"
    assert rawnet.interface_of("::1") == "lo"
    assert rawnet.local_ip_towards("127.0.0.1") == "127.0.0.1"
    with pytest.raises(OSError, match="no interface holds 2001:db8:ffff::1"):
        rawnet.interface_of("2001:db8:ffff::1")


@NEEDS_ROOT
def test_send_crafted_ipv6_syn_over_loopback() -> None:
    # A raw AF_INET6 TCP socket gets a copy of every TCP segment on ::1 (without the
    # IPv6 header): the segment must arrive with our ports and sequence number.
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP) as watch:
        sport, dport, seq = 61234, 61235, 0x5EED6
        sent = rawnet.send_packets([craft.syn("::1", "::1", sport, dport, seq)])
        assert sent == 1
        end = time.monotonic() + RECV_DEADLINE_S
        while True:
            left = end - time.monotonic()
            assert left > 0, "the crafted IPv6 SYN never arrived on ::1"
            watch.settimeout(left)
            segment = watch.recv(2048)
            got = (int.from_bytes(segment[0:2], "big"), int.from_bytes(segment[2:4], "big"),
                   int.from_bytes(segment[4:8], "big"), segment[13] & 0x3F)
            if got[:2] == (sport, dport):
                assert got == (sport, dport, seq, 0x02)
                return


def test_destination_of_either_family() -> None:
    assert rawnet.destination(craft.syn("2001:db8:a::2", "2001:db8:1a:0::2", 1, 2, 3)) == \
        "2001:db8:1a::2"
    assert rawnet.destination(craft.syn("10.1.0.2", "203.0.113.10", 1, 2, 3)) == "203.0.113.10"
