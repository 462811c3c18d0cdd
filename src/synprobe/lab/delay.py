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

Run inside the delay namespace as ``python -m synprobe.lab.delay IF1 IF2 DELAY JITTER``;
it prints ``ready`` once both packet sockets are open and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import collections
import random
import select
import signal
import socket
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


def forward(if1: str, if2: str, delay_s: float, jitter_s: float,
            stop: list[bool] | None = None, ready: bool = True) -> None:
    """Forward frames both ways between if1 and if2 until ``stop[0]`` is set."""
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
    if len(argv) != 4:
        print("usage: python -m synprobe.lab.delay IF1 IF2 DELAY_S JITTER_S", file=sys.stderr)
        return 2
    if1, if2 = argv[0], argv[1]
    delay_s, jitter_s = parse_finite_float(argv[2]), parse_finite_float(argv[3])
    stop = [False]

    def on_signal(signum: int, frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    forward(if1, if2, delay_s, jitter_s, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
