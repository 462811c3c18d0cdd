"""Benchmark: the broker's relay on loopback, beside socat and a direct connection.

Three paths between two sockets of this process, measured in the same run, one after
another, with the same code:

* ``direct``: a plain TCP connection (no middle at all);
* ``socat``: ``socat -b 262144 TCP-LISTEN:P1 TCP-LISTEN:P2``: a C process that splices
  the two connections (the baseline a relay in C gives);
* ``relay``: ``synprobe broker --relay --relay-rate 0 --relay-bytes 0``: two clients
  pair with ``strategies=relay``, then each opens ``SSYN1 RELAY token=...``.

Figures (each the median of --reps runs): throughput one way (--mb MB from A to B) and
both ways at once (--mb each way), in MB/s of payload; the round trip of a 1-byte
ping-pong (--pings round trips: median and p99) and what the middle adds to the direct
one; the broker's CPU seconds per relayed MB (utime + stime from /proc/PID/stat, over
the throughput runs, both directions counted). Exits 1 when the relay's one-way
throughput is under half of socat's (the target of issue 12).

The machine is shared: the first line prints its load average. The load generator is
this process (blocking sockets; a thread per sending side): on 2 cores it competes with
the middle for the CPU, as it does for socat.

    python bench/bench_relay.py [--reps 5] [--mb 200] [--pings 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
CHUNK = 1 << 20
TARGET_SHARE_OF_SOCAT = 0.5
IO_TIMEOUT_S = 60.0
Pair = tuple[socket.socket, socket.socket]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect(port: int, deadline_s: float = 10.0) -> socket.socket:
    end = time.monotonic() + deadline_s
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)
            continue
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s


def read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def stopping(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def direct_pair() -> Iterator[tuple[Pair, int | None]]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = connect(srv.getsockname()[1])
        b, _ = srv.accept()
        b.settimeout(IO_TIMEOUT_S)
        b.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with a, b:
        yield (a, b), None


@contextlib.contextmanager
def socat_pair() -> Iterator[tuple[Pair, int | None]]:
    p1, p2 = free_port(), free_port()
    proc = subprocess.Popen(["socat", "-b", "262144",
                             f"TCP-LISTEN:{p1},bind=127.0.0.1,reuseaddr,nodelay",
                             f"TCP-LISTEN:{p2},bind=127.0.0.1,reuseaddr,nodelay"],
                            stdin=subprocess.DEVNULL)
    with stopping(proc):
        a = connect(p1)
        time.sleep(0.1)  # socat listens on P2 once P1's client came
        b = connect(p2)
        with a, b:
            yield (a, b), proc.pid


@contextlib.contextmanager
def relay_pair(src: Path) -> Iterator[tuple[Pair, int | None]]:
    port = free_port()
    env = {**ENV, "PYTHONPATH": str(src)}
    proc = subprocess.Popen([sys.executable, "-m", "synprobe", "broker", "--bind",
                             f"127.0.0.1:{port}", "--relay", "--relay-rate", "0",
                             "--relay-bytes", "0", "-q"], env=env, stdin=subprocess.DEVNULL)
    with stopping(proc):
        first = connect(port)
        with first:
            first.sendall(b"SSYN1 REGISTER session=bench strategies=relay\n")
            assert read_line(first).startswith(b"SSYN1 REGISTERED"), "no REGISTERED"
            with connect(port) as second:
                second.sendall(b"SSYN1 REGISTER session=bench strategies=relay\n")
                line = read_line(second)
        m = re.search(rb" relay=([0-9a-f]{32})", line)
        assert m, f"no relay token in {line!r}"
        token = m.group(1)
        a, b = connect(port), connect(port)
        with a, b:
            for s in (a, b):
                s.sendall(b"SSYN1 RELAY token=" + token + b"\n")
            for s in (a, b):
                assert read_line(s) == b"SSYN1 RELAYED\n"
            yield (a, b), proc.pid


def send_all(s: socket.socket, total: int) -> None:
    view = memoryview(bytes(CHUNK))
    left = total
    while left > 0:
        n = s.send(view[:min(CHUNK, left)])
        left -= n


def recv_count(s: socket.socket, total: int) -> None:
    buf = bytearray(CHUNK)
    got = 0
    while got < total:
        n = s.recv_into(buf)
        if not n:
            raise AssertionError(f"EOF after {got} of {total} bytes")
        got += n


def one_way(pair: Pair, total: int) -> float:
    a, b = pair
    sender = threading.Thread(target=send_all, args=(a, total))
    start = time.perf_counter()
    sender.start()
    recv_count(b, total)
    took = time.perf_counter() - start
    sender.join(IO_TIMEOUT_S)
    return total / took / 1e6


def both_ways(pair: Pair, total: int) -> float:
    a, b = pair
    threads = [threading.Thread(target=send_all, args=(a, total)),
               threading.Thread(target=send_all, args=(b, total)),
               threading.Thread(target=recv_count, args=(a, total))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    recv_count(b, total)
    for t in threads:
        t.join(IO_TIMEOUT_S)
    return 2 * total / (time.perf_counter() - start) / 1e6


def ping_pong(pair: Pair, n: int) -> list[float]:
    a, b = pair
    rtts = []
    for _ in range(n):
        start = time.perf_counter()
        a.sendall(b"p")
        assert b.recv(1) == b"p"
        b.sendall(b"q")
        assert a.recv(1) == b"q"
        rtts.append(time.perf_counter() - start)
    return rtts


def measure(name: str, make: Callable[[], contextlib.AbstractContextManager[
        tuple[Pair, int | None]]], args: argparse.Namespace) -> dict[str, float]:
    total = args.mb * 1_000_000
    with make() as (pair, pid):
        ping_pong(pair, 100)  # warm up
        cpu0 = cpu_s(pid) if pid else 0.0
        one = [one_way(pair, total) for _ in range(args.reps)]
        both = [both_ways(pair, total) for _ in range(args.reps)]
        cpu = cpu_s(pid) - cpu0 if pid else 0.0
        rtts = sorted(ping_pong(pair, args.pings))
    relayed_mb = args.reps * 3 * total / 1e6
    out = {"one": statistics.median(one), "both": statistics.median(both),
           "rtt50": statistics.median(rtts) * 1e6,
           "rtt99": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] * 1e6,
           "cpu_per_mb": cpu / relayed_mb if pid else float("nan")}
    cpu_text = f"{out['cpu_per_mb'] * 1000:6.2f} ms CPU/MB" if pid else "      -"
    print(f"{name:8} one way {out['one']:8.0f} MB/s   both ways {out['both']:8.0f} MB/s   "
          f"RTT p50 {out['rtt50']:7.1f} us  p99 {out['rtt99']:7.1f} us   {cpu_text}",
          flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mb", type=int, default=200, help="MB per run (each way)")
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--src", type=Path, default=ROOT / "src",
                    help="the source tree whose broker relays (default: this one)")
    args = ap.parse_args()
    if shutil.which("socat") is None:
        print("socat is missing (apt-get install -y socat): it is the baseline",
              file=sys.stderr)
        return 2
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (shared: medians "
          f"of {args.reps}); {args.mb} MB a run, {args.pings} round trips")
    direct = measure("direct", direct_pair, args)
    socat = measure("socat", socat_pair, args)
    relay = measure("relay", lambda: relay_pair(args.src), args)
    for name, r in (("socat", socat), ("relay", relay)):
        print(f"{name} adds {r['rtt50'] - direct['rtt50']:.1f} us to the median round trip, "
              f"{r['rtt99'] - direct['rtt99']:.1f} us to p99")
    share = relay["one"] / socat["one"]
    both_share = relay["both"] / socat["both"]
    print(f"relay / socat: {share:.2f} one way, {both_share:.2f} both ways (target: at "
          f"least {TARGET_SHARE_OF_SOCAT:g} one way)")
    if share < TARGET_SHARE_OF_SOCAT:
        print("MISSED: the relay is under half of socat's throughput", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
