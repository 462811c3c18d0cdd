"""A wire with delay, in user space: the lab's stand-in for netem.

This machine's kernels may lack netem (``tc qdisc add ... netem``: "Specified qdisc kind
is unknown") and NFQUEUE handlers, so link delay comes from a small forwarder in a
namespace of its own between two veths: every Ethernet frame that arrives on one is sent
on the other ``delay ± jitter`` seconds later, in the order it came (a later frame never
overtakes an earlier one, as on a real link). ARP passes like everything else, so the two
far ends see one Ethernet segment.

The veths must have checksum and segmentation offloads off (``ethtool -K``): with them on,
a packet socket reads TCP segments whose checksum the sender left to the hardware, or
64 KiB super-frames, and forwards them as they are.

The same element can play a man in the middle (``tamper=MIN``, the lab's ``tamper_a``):
it flips one bit in the payload of the first IPv4 TCP segment that carries at least MIN
bytes, either way, and writes the TCP checksum that fits, so the receiving kernel takes
the altered segment as it would on a real path; every other frame passes as it came.

Run inside the delay namespace as ``python -m synprobe.lab.delay IF1 IF2 DELAY JITTER
[tamper=MIN]``; it prints ``ready`` once both packet sockets are open, ``tampered`` (on
stdout) when it altered a segment, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import collections
import random
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass

from simulsyn_core._internal.numbers import parse_finite_float

from ..packets.live import ETH_P_ALL, PACKET_OUTGOING  # our own sends come back as OUTGOING

MAX_QUEUED = 4096  # frames waiting per direction; a longer queue drops, as a router would
MAX_FRAME = 65535
IDLE_POLL_S = 0.2  # with nothing queued, look at the stop flag this often
READ_BURST = 256  # frames read from one socket before looking at what is due


@dataclass
class Direction:
    """Frames read on one interface, to be sent on the other when due."""

    out: socket.socket
    queue: collections.deque[tuple[float, bytes]]
    last_due: float = 0.0
    dropped: int = 0


def due_time(now: float, last_due: float, delay_s: float, jitter_s: float,
             rng: random.Random) -> float:
    """When a frame read at ``now`` leaves: delay ± jitter (never below 0), and never before
    the frame ahead of it."""
    wobble = rng.uniform(-jitter_s, jitter_s) if jitter_s else 0.0
    return max(last_due, now + max(0.0, delay_s + wobble))


ETH_HEADER = 14
ETHERTYPE_IPV4 = 0x0800
PROTO_TCP = 6


def _ones_complement_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tamper_frame(frame: bytes, min_payload: int) -> bytes | None:
    """The frame with one bit of its TCP payload flipped (the middle byte's lowest bit) and
    the TCP checksum recomputed, if it is an untagged Ethernet IPv4 TCP segment, not a
    fragment, with at least ``min_payload`` payload bytes; else None."""
    if len(frame) < ETH_HEADER + 20 or \
            struct.unpack_from("!H", frame, 12)[0] != ETHERTYPE_IPV4:
        return None
    ip = ETH_HEADER
    ihl = (frame[ip] & 0x0F) * 4
    total_len = struct.unpack_from("!H", frame, ip + 2)[0]
    flags_frag = struct.unpack_from("!H", frame, ip + 6)[0]
    if frame[ip] >> 4 != 4 or ihl < 20 or frame[ip + 9] != PROTO_TCP or \
            flags_frag & 0x3FFF or total_len > len(frame) - ip:
        return None
    tcp = ip + ihl
    if total_len < ihl + 20:
        return None
    data_off = (frame[tcp + 12] >> 4) * 4
    payload_len = total_len - ihl - data_off
    if data_off < 20 or payload_len < max(1, min_payload):
        return None
    out = bytearray(frame)
    out[tcp + data_off + payload_len // 2] ^= 0x01
    segment = bytes(out[tcp:ip + total_len])
    pseudo = bytes(out[ip + 12:ip + 20]) + struct.pack("!BBH", 0, PROTO_TCP, len(segment))
    out[tcp + 16:tcp + 18] = b"\0\0"
    csum = ~_ones_complement_sum(pseudo + bytes(out[tcp:ip + total_len])) & 0xFFFF
    struct.pack_into("!H", out, tcp + 16, csum)
    return bytes(out)


def forward(if1: str, if2: str, delay_s: float, jitter_s: float,
            stop: list[bool] | None = None, ready: bool = True,
            tamper_min: int = 0) -> None:
    """Forward frames both ways between if1 and if2 until ``stop[0]`` is set; with
    ``tamper_min``, alter the first TCP segment that carries at least that many bytes."""
    stop = stop if stop is not None else [False]
    rng = random.Random()
    socks = []
    for name in (if1, if2):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((name, 0))
        sock.setblocking(False)
        socks.append(sock)
    directions = {socks[0].fileno(): Direction(socks[1], collections.deque()),
                  socks[1].fileno(): Direction(socks[0], collections.deque())}
    by_fd = {s.fileno(): s for s in socks}
    if ready:
        print("ready", flush=True)
    try:
        while not stop[0]:
            now = time.monotonic()
            heads = [d.queue[0][0] for d in directions.values() if d.queue]
            timeout = max(0.0, min(heads) - now) if heads else IDLE_POLL_S
            readable, _, _ = select.select(list(by_fd), [], [], timeout)
            for fd in readable:
                direction = directions[fd]
                for _ in range(READ_BURST):
                    try:
                        frame, address = by_fd[fd].recvfrom(MAX_FRAME)
                    except (BlockingIOError, InterruptedError):
                        break
                    if address[2] == PACKET_OUTGOING:
                        continue
                    if len(direction.queue) >= MAX_QUEUED:
                        direction.dropped += 1
                        continue
                    if tamper_min and (altered := tamper_frame(frame, tamper_min)):
                        frame, tamper_min = altered, 0  # once
                        print("tampered", flush=True)
                    direction.last_due = due_time(time.monotonic(), direction.last_due,
                                                  delay_s, jitter_s, rng)
                    direction.queue.append((direction.last_due, frame))
            now = time.monotonic()
            for direction in directions.values():
                while direction.queue and direction.queue[0][0] <= now:
                    _, frame = direction.queue.popleft()
                    try:
                        direction.out.send(frame)
                    except OSError:
                        direction.dropped += 1  # a full device queue drops, as a link would
    finally:
        for sock in socks:
            sock.close()


def main(argv: list[str]) -> int:
    tamper = [a for a in argv[4:] if a.startswith("tamper=")]
    if len(argv) - len(tamper) != 4 or len(tamper) > 1 or \
            (tamper and not tamper[0][7:].isascii()) or (tamper and not tamper[0][7:].isdigit()):
        print("usage: python -m synprobe.lab.delay IF1 IF2 DELAY_S JITTER_S [tamper=MIN]",
              file=sys.stderr)
        return 2
    if1, if2 = argv[0], argv[1]
    delay_s, jitter_s = parse_finite_float(argv[2]), parse_finite_float(argv[3])
    tamper_min = int(tamper[0][7:]) if tamper else 0
    stop = [False]

    def on_signal(signum: int, frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    forward(if1, if2, delay_s, jitter_s, stop, tamper_min=tamper_min)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
