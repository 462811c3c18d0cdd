"""An unsolicited SYN answered only after 6 s, as RFC 5382 REQ-4 asks: the `late-icmp`
lab profile's helper.

netfilter's REJECT answers as the packet passes, and this machine's kernel has no netem
to hold a packet, so the hold is done in user space with NFQUEUE: the gateway's INPUT
chain queues each unsolicited TCP SYN (``-j NFQUEUE --queue-num N``); this process holds
it ``HOLD`` seconds and then

* drops it silently when the host has meanwhile sent the SYN of that very connection (a
  confirmed conntrack entry whose reply tuple is the held SYN's: REQ-4's second case),
* else re-runs the INPUT chain on it (verdict NF_REPEAT) with the mark ``MARK``, which a
  rule before the NFQUEUE one REJECTs with ICMP port-unreachable: the ICMP error is the
  kernel's own.

Run in the gateway's namespace as ``python -m synprobe.lab.holdsyn QUEUE HOLD MARK``; it
prints ``ready`` once bound to the queue and stops on SIGTERM or SIGINT (the kernel drops
what is still held: silence, as REQ-4a allows). Without it the queued SYNs are dropped.

The netlink messages (linux/netfilter/nfnetlink_queue.h) are built and parsed by pure
functions below; only ``run`` touches a socket.
"""

from __future__ import annotations

import collections
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from simulsyn_core._internal.numbers import parse_finite_float

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS = 1, 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_PACKET = 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_MARK, NFQA_PAYLOAD = 1, 2, 3, 10
NF_DROP, NF_REPEAT = 0, 4
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
COPY_BYTES = 60  # the IPv4 header and the TCP ports are all we read
MAX_HELD = 1024  # more SYNs at once are dropped at once (silently)
IDLE_POLL_S = 0.2  # with nothing held, look at the stop flag this often
CONNTRACK = "/proc/net/nf_conntrack"


@dataclass(frozen=True)
class Held:
    packet_id: int
    tuple4: tuple[str, int, str, int]  # src, sport, dst, dport of the SYN
    release_at: float


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def message(msg: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0
            ) -> bytes:
    """One nfnetlink message of the queue subsystem (family AF_UNSPEC, res_id = queue)."""
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq,
                       0) + body


def bind_messages(queue: int) -> list[bytes]:
    cmd = _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET))
    params = _attr(NFQA_CFG_PARAMS, struct.pack("!IB", COPY_BYTES, NFQNL_COPY_PACKET))
    return [message(NFQNL_MSG_CONFIG, queue, cmd, NLM_F_REQUEST | NLM_F_ACK, 1),
            message(NFQNL_MSG_CONFIG, queue, params, NLM_F_REQUEST | NLM_F_ACK, 2)]


def verdict(queue: int, packet_id: int, value: int, mark: int | None = None) -> bytes:
    attrs = _attr(NFQA_VERDICT_HDR, struct.pack("!II", value, packet_id))
    if mark is not None:
        attrs += _attr(NFQA_MARK, struct.pack("!I", mark))
    return message(NFQNL_MSG_VERDICT, queue, attrs)


def split(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, body after the netlink header) of each message in one datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            return
        yield kind, data[offset + 16:offset + length]
        offset += (length + 3) & ~3


def attributes(body: bytes) -> dict[int, bytes]:
    """The attributes after the nfgenmsg header of a message body."""
    out, offset = {}, 4
    while offset + 4 <= len(body):
        length, kind = struct.unpack_from("=HH", body, offset)
        if length < 4:
            break
        out[kind & 0x7FFF] = body[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def packet(body: bytes) -> tuple[int, tuple[str, int, str, int]] | None:
    """(packet id, the SYN's 4-tuple) of an NFQNL_MSG_PACKET body; None if not TCP/IPv4."""
    attrs = attributes(body)
    hdr, payload = attrs.get(NFQA_PACKET_HDR), attrs.get(NFQA_PAYLOAD, b"")
    if hdr is None or len(payload) < 20 or payload[0] >> 4 != 4 or payload[9] != 6:
        return None if hdr is None else (struct.unpack_from("!I", hdr)[0], ("", 0, "", 0))
    ihl = (payload[0] & 0x0F) * 4
    if len(payload) < ihl + 4:
        return struct.unpack_from("!I", hdr)[0], ("", 0, "", 0)
    sport, dport = struct.unpack_from("!HH", payload, ihl)
    return struct.unpack_from("!I", hdr)[0], (socket.inet_ntoa(payload[12:16]), sport,
                                              socket.inet_ntoa(payload[16:20]), dport)


def replies(conntrack: str) -> set[tuple[str, int, str, int]]:
    """The reply tuples (src, sport, dst, dport) of the TCP entries of /proc/net/nf_conntrack
    text: an inbound SYN with one of them belongs to a connection the host opened."""
    out = set()
    for line in conntrack.splitlines():
        fields = line.split()
        if "tcp" not in fields:
            continue
        values: dict[str, list[str]] = collections.defaultdict(list)
        for f in fields:
            key, _, value = f.partition("=")
            if key in ("src", "dst", "sport", "dport"):
                values[key].append(value)
        if all(len(values[k]) >= 2 for k in ("src", "dst", "sport", "dport")):
            out.add((values["src"][1], int(values["sport"][1]), values["dst"][1],
                     int(values["dport"][1])))
    return out


def decide(held: Held, conntrack: str, mark: int) -> tuple[int, int | None]:
    """The verdict for a held SYN whose time is up: silence if the host has opened that
    connection meanwhile, else the REJECT rule (NF_REPEAT with the mark)."""
    if held.tuple4 in replies(conntrack):
        return NF_DROP, None
    return NF_REPEAT, mark


def _read_conntrack() -> str:
    try:
        with open(CONNTRACK) as f:
            return f.read()
    except OSError:
        return ""


def _expect_acks(sock: socket.socket, count: int) -> None:
    for _ in range(count):
        ready, _, _ = select.select([sock], [], [], 2.0)
        if not ready:
            raise OSError("no answer from nfnetlink_queue")
        for kind, body in split(sock.recv(65536)):
            if kind == NLMSG_ERROR:
                (error,) = struct.unpack_from("=i", body)
                if error:
                    raise OSError(-error, os.strerror(-error))


def run(queue: int, hold_s: float, mark: int) -> int:
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        for msg in bind_messages(queue):
            sock.send(msg)
        _expect_acks(sock, 2)
        print("ready", flush=True)
        held: collections.deque[Held] = collections.deque()
        while not stop:
            wait = (max(0.0, held[0].release_at - time.monotonic()) if held else IDLE_POLL_S)
            try:
                ready, _, _ = select.select([sock], [], [], min(wait, IDLE_POLL_S))
            except InterruptedError:
                continue
            if ready:
                for kind, body in split(sock.recv(65536)):
                    if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                        continue
                    got = packet(body)
                    if got is None:
                        continue
                    if len(held) >= MAX_HELD:
                        sock.send(verdict(queue, got[0], NF_DROP))
                        continue
                    held.append(Held(got[0], got[1], time.monotonic() + hold_s))
            now = time.monotonic()
            while held and held[0].release_at <= now:
                one = held.popleft()
                value, with_mark = decide(one, _read_conntrack(), mark)
                sock.send(verdict(queue, one.packet_id, value, with_mark))
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m synprobe.lab.holdsyn QUEUE HOLD_S MARK", file=sys.stderr)
        return 2
    return run(int(argv[0]), parse_finite_float(argv[1]), int(argv[2], 0))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
