"""Benchmark: brokers sharing their sessions through Redis (broker --redis), on loopback.

Rows, all in one run: 1 broker alone (the in-process table); 1, 2 and 3 brokers on one
redis-server (the Debian package, started and stopped here); and the original example's
broker (tests/original_example.py), which pairs nobody: its "pair" is two clients that
each fetch the list (B's list names A), the nearest thing it does.

A pair: A connects to broker i % n and registers; once REGISTERED, B connects to broker
(i + 1) % n (another broker whenever there are several) and registers; the latency is
from B's REGISTER sent to the second PEER received (the original: from B's connect to
its list read). ``--inflight`` pairs at a time, from one load process (raw non-blocking
sockets on one selector), source addresses spread over 127/8 so that every broker runs
with its limits as shipped. Every figure is the median of --reps runs.

On this 2-core machine the load generator, redis-server and the brokers share two
cores: the CPU column (each process's utime + stime per pair) says who spent them; past
two brokers, more brokers only share the same two cores. Exits 1 when a pair is lost or
paired twice, or when 3 brokers on Redis pair fewer than --target pairs a second.

    python bench/bench_redis.py [--pairs 3000] [--inflight 100] [--reps 3] [--target 500]
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_broker import CHILDREN, OURS, start_broker, start_original, stop

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
RUN_TIMEOUT_S = 120.0


def source(i: int) -> str:
    return f"127.{1 + i % 250}.{(i // 250) % 250 + 1}.{i % 97 + 1}"


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class Pair:
    i: int
    a: socket.socket | None = None
    b: socket.socket | None = None
    sent_b: float = 0.0
    peers: int = 0
    bufs: dict[int, bytes] = field(default_factory=dict)


def run_pairs(ports: list[int], pairs: int, inflight: int, original: bool) -> dict[str, float]:
    """Run ``pairs`` pairs, ``inflight`` at a time: pairs/s and latencies (ms)."""
    sel = selectors.DefaultSelector()
    latencies: list[float] = []
    next_i = 0
    live = 0
    n = len(ports)
    peers_total = 0
    started = time.monotonic()
    deadline = started + RUN_TIMEOUT_S

    def open_side(p: Pair, side: str) -> None:
        s = socket.socket()
        s.bind((source(2 * p.i + (side == "b")), 0))
        s.connect(("127.0.0.1", ports[(p.i + (side == "b")) % n]))
        if side == "b":
            p.sent_b = time.monotonic()
        if not original:
            s.sendall(f"SSYN1 REGISTER session=bench{p.i}\n".encode())
        s.setblocking(False)
        setattr(p, side, s)
        p.bufs[s.fileno()] = b""
        sel.register(s, selectors.EVENT_READ, (p, side))

    def finish(p: Pair, side: str) -> None:
        s = getattr(p, side)
        sel.unregister(s)
        s.close()

    try:
        while len(latencies) < pairs:
            while live < inflight and next_i < pairs:
                open_side(Pair(next_i), "a")
                next_i += 1
                live += 1
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(latencies)} of {pairs} pairs in {RUN_TIMEOUT_S} s")
            for key, _ in sel.select(1.0):
                p, side = key.data
                s = key.fileobj
                try:
                    chunk = s.recv(4096)  # type: ignore[union-attr]
                except (BlockingIOError, ConnectionResetError):
                    continue
                fd = s.fileno()  # type: ignore[union-attr]
                p.bufs[fd] += chunk
                if original:  # the list answer, to EOF
                    if chunk:
                        continue
                    finish(p, side)
                    if side == "a":
                        open_side(p, "b")
                    else:
                        latencies.append(time.monotonic() - p.sent_b)
                        live -= 1
                    continue
                if b"PEER " in chunk:
                    p.peers += 1
                    peers_total += 1
                    if p.peers == 2:
                        latencies.append(time.monotonic() - p.sent_b)
                        live -= 1
                elif side == "a" and b"REGISTERED" in chunk:
                    open_side(p, "b")
                elif chunk and b"ERROR" in chunk:
                    raise RuntimeError(f"pair {p.i}: {chunk!r}")
                if not chunk:
                    finish(p, side)
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
    elapsed = time.monotonic() - started
    if not original and peers_total != 2 * pairs:
        raise RuntimeError(f"{peers_total} PEER lines for {pairs} pairs")
    ms = sorted(x * 1000 for x in latencies)
    return {"rate": pairs / elapsed, "p50": ms[len(ms) // 2],
            "p99": ms[min(len(ms) - 1, int(len(ms) * 0.99))]}


def redis_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    CHILDREN.append(proc)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_row(name: str, brokers: int, redis: bool, original: bool, args: argparse.Namespace,
            tmp: Path) -> dict[str, float]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if original:
            port = free_port()
            procs.append(start_original(port))
            ports = [port]
        else:
            extra: list[str] = []
            if redis:
                rport = free_port()
                procs.append(redis_server(rport))
                extra = ["--redis", f"redis://127.0.0.1:{rport}/0"]
            ports = []
            for k in range(brokers):
                proc, port = start_broker([*OURS, *extra],
                                          tmp / f"{name}-{k}.log")
                procs.append(proc)
                ports.append(port)
        before = [cpu_s(p.pid) for p in procs]
        load_before = time.process_time()
        row = run_pairs(ports, args.pairs, args.inflight, original)
        row["cpu_load"] = (time.process_time() - load_before) / args.pairs * 1e6
        row["cpu_servers"] = sum(cpu_s(p.pid) - b for p, b in zip(procs, before,
                                                                   strict=True)) / args.pairs * 1e6
        return row
    finally:
        for proc in procs:
            stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3000)
    ap.add_argument("--inflight", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--target", type=float, default=500.0)
    args = ap.parse_args()
    rows = [("alone", "1 broker, in-process table", 1, False, False),
            ("redis1", "1 broker on Redis", 1, True, False),
            ("redis2", "2 brokers on Redis", 2, True, False),
            ("redis3", "3 brokers on Redis", 3, True, False),
            ("original", "original's broker (list x2)", 1, False, True)]
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores; {args.pairs} "
          f"pairs, {args.inflight} in flight, median of {args.reps}")
    print(f"{'setup':30} {'pairs/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'servers us/pair':>15} {'load us/pair':>12}")
    results: dict[str, list[dict[str, float]]] = {r[0]: [] for r in rows}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
            for _ in range(args.reps):
                for name, _, brokers, redis, original in rows:
                    results[name].append(one_row(name, brokers, redis, original, args,
                                                 Path(tmp)))
    finally:
        for proc in CHILDREN:
            stop(proc)
    med: dict[str, dict[str, float]] = {}
    for name, label, *_ in rows:
        med[name] = {k: statistics.median(r[k] for r in results[name])
                     for k in results[name][0]}
        m = med[name]
        print(f"{label:30} {m['rate']:8.0f} {m['p50']:7.2f} {m['p99']:7.2f} "
              f"{m['cpu_servers']:15.0f} {m['cpu_load']:12.0f}")
    if med["redis3"]["rate"] < args.target:
        print(f"missed: 3 brokers on Redis {med['redis3']['rate']:.0f} pairs/s < "
              f"{args.target:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
