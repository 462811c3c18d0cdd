"""The lab's user-space delay element: frames wait, stay in order, keep their checksums,
and the element goes with the lab."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys

import pytest

from synprobe import lab as labmod
from synprobe.lab.delay import due_time

_ids = itertools.count()

# One TCP connect() from host A to the broker host, five times: its time is one RTT.
CONNECT_TIMES = """
import socket, time
out = []
for _ in range(6):
    s = socket.socket()
    t = time.perf_counter()
    s.connect(("192.0.2.10", 8086))
    out.append(time.perf_counter() - t)
    s.close()
print(" ".join(f"{x:.6f}" for x in out[1:]))  # the first one also waits for ARP
"""


def test_due_time_keeps_order_and_bounds() -> None:
    rng = random.Random(7)
    last = 0.0
    for i in range(2000):
        now = i * 0.0001
        due = due_time(now, last, 0.05, 0.01, rng)
        assert due >= last  # never overtakes the frame ahead
        assert now + 0.04 - 1e-9 <= due or due == last
        assert due <= max(last, now + 0.06 + 1e-9)
        last = due
    assert due_time(1.0, 0.0, 0.0, 0.0, rng) == 1.0
    assert due_time(1.0, 0.0, 0.001, 0.01, rng) >= 1.0  # never before it came


def test_link_delays_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="link delay broker: -1"):
        labmod.LinkDelays(broker=-1)
    links = labmod.LinkDelays(a=0.0005, broker=0.05, jitter_s=0.01)
    assert links.of("a") == (0.0005, 0.0005)  # jitter capped at the link's own delay
    assert links.of("broker") == (0.05, 0.01)
    assert links.delayed() == ["a", "broker"]


def rtts(lab: labmod.Lab) -> list[float]:
    run = lab.run("ha", [sys.executable, "-c", CONNECT_TIMES], timeout=30)
    assert run.returncode == 0, run.stderr
    return [float(x) for x in run.stdout.split()]


@pytest.mark.lab
def test_delay_is_added_each_way_and_punch_and_chat_pass(require_root_lab: None) -> None:
    links = labmod.LinkDelays(a=0.005, b=0.03, broker=0.02)
    lab_id = f"dl{os.getpid() % 100000}x{next(_ids)}"
    with labmod.Lab("home", "home", lab_id=lab_id, links=links) as lab:
        assert {"da", "db", "dr"} <= set(lab.nodes)
        labmod.start_broker(lab)
        # A to the broker: 5 ms + 20 ms each way = 50 ms per round trip.
        times = sorted(rtts(lab))
        assert 0.050 <= times[len(times) // 2] < 0.080, times
        # TCP with data crosses the delayed links: checksums and sizes survived.
        big = "x" * 200 + "\n"
        run_a, run_b = labmod.punch_pair(lab, "dly", messages=(big, "from b\n"),
                                         timeout_s=15)
        assert (run_a.returncode, run_b.returncode) == (0, 0), (run_a.stderr, run_b.stderr)
        assert run_b.chat_lines[0].startswith("x" * 200)
        assert run_a.chat_lines == ["from b"]
        pids = lab.run("da", ["ip", "netns", "pids", lab.ns("da")]).stdout.split()
        assert pids, "the delay element of link a is not running"
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"delay element {pid} outlived its lab"
    assert [n for n in labmod.lab_namespaces() if n.startswith(f"ssyn-{lab_id}-")] == []


@pytest.mark.lab
def test_no_delay_means_no_delay_node(require_root_lab: None) -> None:
    lab_id = f"dl{os.getpid() % 100000}x{next(_ids)}"
    with labmod.Lab("home", "home", lab_id=lab_id) as lab:
        assert not {"da", "db", "dr"} & set(lab.nodes)
        labmod.start_broker(lab)
        assert sorted(rtts(lab))[2] < 0.010


@pytest.mark.lab
def test_lab_up_prints_the_delays_and_down_removes_them(require_root_lab: None) -> None:
    lab_id = f"dlc{os.getpid() % 100000}"
    up = subprocess.run([*labmod.SYNPROBE, "lab", "up", "--id", lab_id, "--delay-broker",
                         "0.05", "--jitter", "0.01", "--delay-a", "0.0005"],
                        capture_output=True, text=True, timeout=60)
    try:
        assert up.returncode == 0, up.stderr
        assert "delay   broker link to the router: 50 ms each way ± 10 ms" in up.stdout
        assert "delay   a link to the router: 0.5 ms each way ± 0.5 ms" in up.stdout
        assert f"ssyn-{lab_id}-dr" in labmod.lab_namespaces()
    finally:
        down = subprocess.run([*labmod.SYNPROBE, "lab", "down", "--id", lab_id],
                              capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert [n for n in labmod.lab_namespaces() if n.startswith(f"ssyn-{lab_id}-")] == []
    left = subprocess.run(["pgrep", "-f", "synprobe.lab.delay in out"], capture_output=True,
                          text=True).stdout.split()
    mine = [p for p in left if lab_id in _netns_of(p)]
    assert mine == []


def _netns_of(pid: str) -> str:
    try:
        return " ".join(subprocess.run(["ip", "netns", "identify", pid], capture_output=True,
                                       text=True, timeout=5).stdout.split())
    except (OSError, subprocess.TimeoutExpired):
        return ""


@pytest.fixture
def require_root_lab(make_lab: object) -> None:
    """make_lab's check: required as root (a missing tool fails), skipped otherwise."""


def test_tamper_flips_one_payload_bit_and_keeps_the_checksum_right() -> None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    from synprobe.lab.delay import tamper_frame

    payload = bytes(range(256)) * 3
    frame = bytes(Ether() / IP(src="203.0.113.5", dst="198.51.100.7") /
                  TCP(sport=4000, dport=5000, flags="PA", options=[("NOP", None)] * 4) /
                  payload)
    altered = tamper_frame(frame, 600)
    assert altered is not None and len(altered) == len(frame)
    diff = [i for i, (x, y) in enumerate(zip(frame, altered, strict=True)) if x != y]
    tcp = Ether(altered)[TCP]
    assert bytes(tcp.payload) != payload
    assert sum(bin(x ^ y).count("1") for x, y in zip(bytes(tcp.payload), payload, strict=True)) == 1
    assert len(diff) <= 3  # the payload byte and the two of the checksum
    ip = Ether(altered)[IP]
    ip[TCP].chksum = None  # scapy computes it again over the altered segment
    assert IP(bytes(ip))[TCP].chksum == tcp.chksum  # the checksum it wrote is the right one
    # too short, not TCP, or not IPv4: left alone
    assert tamper_frame(frame, 2000) is None
    udp = bytes(Ether() / IP() / (b"\x00" * 700))
    assert tamper_frame(udp, 600) is None
    assert tamper_frame(b"\x00" * 10, 1) is None
