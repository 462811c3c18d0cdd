"""Benchmark: the broker's capacity on loopback (no root, no lab).

* pairs per second: two clients per session (A: REGISTER, REGISTERED; then B connects:
  REGISTER; PEER to both, the broker closes both), at a few concurrency levels (pairs in
  flight); latency p50/p99 from B's REGISTER sent to both PEERs received; the broker's
  CPU per pair (utime + stime of its process, /proc/PID/stat, and the kernel's share) and
  the load generator's (on a 2-core machine the two share the cores: the line says which
  one is the cap). ``--compare SRC`` runs another source tree's broker (e.g. a checkout
  of an older src/) run for run in turn, for a before/after in the same run;
* list answers per second (the original protocol: connect, read the list to EOF,
  close), ours beside tests/original_example.py's broker in the same run. Our broker
  answers a silent client after SEED_GRACE_S (1 s), so this needs thousands of clients
  waiting at once, and new ones come at a set rate (a burst of thousands of connect()s
  overflows the accept queue); the original answers at accept (a blocking loop with
  listen(64)), so it gets a few dozen. With its default cap (20 480 connections, or the
  open-file limit less 128 if that is lower) ours answers at most that many a second
  whatever its CPU; a row with the cap raised (run_broker(max_connections=40000): as far
  as the open-file limit allows) shows what the CPU allows;
* the broker's RSS with 10 000 clients registered and waiting, beside the idle broker
  (the broker as shipped: its caps, 20 480 connections and 16 384 waiting sessions,
  hold 10 000).

Every broker here runs with its limits as shipped (README "Broker limits": per address
16 waiting and 64 connections, 10 REGISTER/WHOAMI a second; per /24, 256 waiting and 256
connections, 100 REGISTER/WHOAMI a second). The load is spread over source addresses
so that it stays under them, as clients from many networks would: 8 addresses per /24
(127.A.B.1-8, all of 127/8 is loopback), pairs from 4096 addresses per load process
(512 /24s: at 5000 pairs/s, 2.4 REGISTERs a second per address and 20 per /24), list
clients 8 per address, waiting clients 10 per address (80 per /24, under the /24's
burst of 400).

The load generator is raw non-blocking sockets on one epoll per process (--procs), so
that it costs less CPU than the broker. Every figure is the median of --reps runs.
Exits 1 when a target is missed: 5000 pairs/s at the best concurrency, list answers at
least as fast as the original's broker, under 200 MB RSS with 10 000 clients waiting.
The machine is shared: the first line prints its load average, and each figure's CPU
says what capped it.

    python bench/bench_broker.py [--reps 3] [--window 3] [--levels 10,100,400]
                                 [--procs 2] [--compare OLD/src] [--only pairs|list|rss]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import multiprocessing as mp
import os
import re
import resource
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL = [sys.executable, str(ROOT / "tests" / "original_example.py")]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # --src replaces it
OURS = [sys.executable, "-m", "synprobe", "broker", "--bind", "127.0.0.1:0"]
# The list row "caps raised": the broker with its total connection cap raised (a
# documented option of run_broker; start() still lowers it to the open-file limit less
# 128), every other limit as shipped.
RAISED_CAPS = """
import sys
from simulsyn_core._internal.broker import run_broker
from simulsyn_core._internal.endpoint import Endpoint
sys.exit(run_broker([Endpoint("127.0.0.1", 0)], max_connections=40000))
"""
TARGET_PAIRS_S = 5000.0
TARGET_RSS_MB = 200.0
WAITING_CLIENTS = 10000
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: the port is chosen at connect(), per 4-tuple
PAIR_DEADLINE_S = 10.0  # a pair not done by then counts as failed


HOSTS_PER_NET = 8  # source addresses per /24: the broker's limits count per /24 too
PAIR_SOURCES = 4096  # a pair load process's addresses (512 /24s): under the rate limits


def sources(n: int, offset: int = 0) -> list[str]:
    """n loopback source addresses 127.A.B.h (h in 1..HOSTS_PER_NET), from address number
    ``offset`` on (an offset per load process: none shares an address)."""
    out = []
    for k in range(offset, offset + n):
        net = k // HOSTS_PER_NET
        out.append(f"127.{1 + net // 256}.{net % 256}.{1 + k % HOSTS_PER_NET}")
    return out


def _client_socket(src: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.bind((src, 0))
    return s


def _abort(s: socket.socket) -> None:
    """Close a client socket before the broker did with an RST: a FIN would leave it in
    TIME_WAIT for 60 s, holding its port (in the ephemeral range) against anyone's bind
    to 0.0.0.0 of that port on this machine."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


# --- the load generators (each runs in its own process) ------------------------------------

def pair_load(port: int, concurrency: int, warm_s: float, window_s: float, tag: str,
              src_offset: int) -> dict[str, Any]:
    """Keep ``concurrency`` pairs in flight for warm_s + window_s; what was done in the
    window. A pair: A connects and registers; once REGISTERED came, B connects and
    registers (t0: B's REGISTER sent); done when both got PEER and EOF."""
    ep = select.epoll()
    srcs = sources(max(PAIR_SOURCES, concurrency // 4), src_offset)  # under the limits
    socks: dict[int, tuple[socket.socket, list[Any], int]] = {}  # fd -> sock, pair, side
    start = time.monotonic()
    measure_from, end = start + warm_s, start + warm_s + window_s
    latencies: list[float] = []
    done = failed = 0
    n = 0
    cpu0: tuple[float, float] | None = None
    # a pair: [REGISTER line, source address, t0, sides that got PEER (bits), EOFs seen,
    #          deadline, sockets, closed]
    LINE, SRC, T0, PEERS, EOFS, DEADLINE, SOCKS, CLOSED = range(8)

    def connect(pair: list[Any], side: int) -> None:
        """Connect one side and send its REGISTER: on loopback the handshake is usually
        over when connect() returns; if not, the line goes once the socket is writable."""
        s = _client_socket(pair[SRC])
        if s.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
            s.close()
            fail(pair)
            return
        socks[s.fileno()] = (s, pair, side)
        pair[SOCKS].append(s)
        try:
            send(pair, s, side)
            ep.register(s.fileno(), select.EPOLLIN)
        except OSError:
            ep.register(s.fileno(), select.EPOLLOUT)

    def send(pair: list[Any], s: socket.socket, side: int) -> None:
        if side == 1:
            pair[T0] = time.perf_counter()
        s.send(pair[LINE])

    def new_pair() -> None:
        nonlocal n
        n += 1
        pair: list[Any] = [f"SSYN1 REGISTER session={tag}{n}\n".encode(), srcs[n % len(srcs)],
                           0.0, 0, 0, time.monotonic() + PAIR_DEADLINE_S, [], False]
        connect(pair, 0)

    def fail(pair: list[Any]) -> None:
        nonlocal failed
        if pair[CLOSED]:
            return
        pair[CLOSED] = True
        failed += 1 if time.monotonic() >= measure_from else 0
        for s in pair[SOCKS]:
            fd = s.fileno()
            if fd >= 0:
                socks.pop(fd, None)
                ep.unregister(fd)
                _abort(s)

    for _ in range(concurrency):
        new_pair()
    last_sweep = time.monotonic()
    while True:
        now = time.monotonic()
        if cpu0 is None and now >= measure_from:
            t = os.times()
            cpu0 = (t.user + t.system, now)
        if now >= end:
            break
        if now - last_sweep > 1.0:  # pairs past their deadline fail (bounded waits)
            last_sweep = now
            for _, pair, _ in list(socks.values()):
                if now > pair[DEADLINE] and not pair[CLOSED]:
                    fail(pair)
                    new_pair()
        for fd, events in ep.poll(0.2):
            entry = socks.get(fd)
            if entry is None:
                continue
            s, pair, side = entry
            if events & select.EPOLLOUT:
                try:
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        raise ConnectionError
                    send(pair, s, side)
                except OSError:
                    fail(pair)
                    new_pair()
                    continue
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = s.recv(4096)
            except OSError:
                data = None
            if data is None or b"ERROR" in data or (data and data[0] != ord("S")):
                fail(pair)  # (a list answer: a side silent for 1 s, under overload)
                new_pair()
                continue
            if data:
                if side == 0 and b" REGISTERED " in data:
                    connect(pair, 1)
                if b" PEER " in data:
                    pair[PEERS] |= 1 << side
                    if pair[PEERS] == 3:
                        pair[T0] = time.perf_counter() - pair[T0]
                continue
            if not pair[PEERS] & (1 << side):  # closed before its PEER
                fail(pair)
                new_pair()
                continue
            pair[EOFS] += 1
            ep.unregister(fd)
            socks.pop(fd, None)
            s.close()  # after the broker's FIN: no TIME_WAIT on our side
            if pair[EOFS] == 2:
                pair[CLOSED] = True
                if time.monotonic() >= measure_from:
                    done += 1
                    latencies.append(pair[T0])
                new_pair()
    t = os.times()
    cpu_s = t.user + t.system - (cpu0[0] if cpu0 else 0.0)
    for s, _, _ in list(socks.values()):
        _abort(s)
    ep.close()
    return {"done": done, "failed": failed, "latencies": latencies, "cpu_s": cpu_s,
            "window_s": time.monotonic() - (cpu0[1] if cpu0 else start)}


def list_load(port: int, concurrency: int, warm_s: float, window_s: float, tag: str,
              src_offset: int, rate: float = 0.0) -> dict[str, Any]:
    """Keep ``concurrency`` silent clients connected; each reads the list to EOF, checks
    its length and closes, and another takes its place: at once (rate 0), or new clients
    come at ``rate`` a second, evenly (a burst of thousands of connect()s at once only
    overflows the listener's accept queue, and each SYN dropped there waits 1 s)."""
    ep = select.epoll()
    srcs = sources(max(64, concurrency // HOSTS_PER_NET), src_offset)  # 8 per address
    socks: dict[int, tuple[socket.socket, bytearray, float]] = {}
    start = time.monotonic()
    measure_from, end = start + warm_s, start + warm_s + window_s
    done = failed = opened = 0
    n = 0
    cpu0: tuple[float, float] | None = None
    now = start

    def new_client() -> None:
        nonlocal n, failed, opened
        n += 1
        opened += now >= measure_from
        s = _client_socket(srcs[n % len(srcs)])
        if s.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
            s.close()
            failed += 1
            return
        socks[s.fileno()] = (s, bytearray(), time.monotonic() + PAIR_DEADLINE_S)
        ep.register(s.fileno(), select.EPOLLIN)

    def finish(fd: int, ok: bool) -> None:
        nonlocal done, failed
        s, _, _ = socks.pop(fd)
        ep.unregister(fd)
        if ok:
            s.close()  # after the broker's FIN: no TIME_WAIT on our side
        else:
            _abort(s)
        if time.monotonic() >= measure_from:
            if ok:
                done += 1
            else:
                failed += 1
        if not rate:
            new_client()

    tokens, last = 0.0, time.monotonic()
    if not rate:
        for _ in range(concurrency):
            new_client()
    last_sweep = time.monotonic()
    while True:
        now = time.monotonic()
        if cpu0 is None and now >= measure_from:
            t = os.times()
            cpu0 = (t.user + t.system, now)
        if now >= end:
            break
        if now - last_sweep > 1.0:
            last_sweep = now
            for fd in [fd for fd, (_, _, dl) in socks.items() if now > dl]:
                finish(fd, False)
        if rate:
            tokens = min(tokens + (now - last) * rate, rate * 0.05 + 1)
            last = now
            while tokens >= 1 and len(socks) < concurrency:
                tokens -= 1
                new_client()
        for fd, _ in ep.poll(0.002 if rate else 0.2):
            entry = socks.get(fd)
            if entry is None:
                continue
            s, buf, _ = entry
            try:
                data = s.recv(4096)
            except OSError:
                finish(fd, False)
                continue
            if data:
                buf += data
                continue
            finish(fd, len(buf) >= 1 and len(buf) == 1 + 6 * buf[0])
    t = os.times()
    cpu_s = t.user + t.system - (cpu0[0] if cpu0 else 0.0)
    for s, _, _ in list(socks.values()):
        _abort(s)
    ep.close()
    return {"done": done, "failed": failed, "latencies": [], "cpu_s": cpu_s,
            "window_s": time.monotonic() - (cpu0[1] if cpu0 else start), "opened": opened}


def _child(conn: Any, fn: Any, args: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends us (bounded by time)
    conn.send(fn(*args))
    conn.close()


# --- processes -----------------------------------------------------------------------------

CHILDREN: list[Any] = []  # every process we started: ended on any exit path


def start_broker(argv: list[str], log: Path, env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen[bytes], int]:
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, env=env or ENV, cwd=ROOT)
    CHILDREN.append(proc)
    end = time.monotonic() + 20
    while time.monotonic() < end and proc.poll() is None:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if m:
            return proc, int(m.group(1))
        time.sleep(0.05)
    raise RuntimeError(f"broker did not start: {log.read_text(errors='replace')[-500:]}")


def start_original(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([*ORIGINAL, "broker", "--bind", f"127.0.0.1:{port}",
                             "--max-connections", "100000000"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    CHILDREN.append(proc)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                s.recv(4096)
                return proc
        time.sleep(0.05)
    raise RuntimeError("the original broker did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def cpu_ticks(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # utime, stime


def rss_mb(pid: int) -> float:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024 if m else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load(fn: Any, port: int, concurrency: int, procs: int, warm_s: float, window_s: float,
         broker_pid: int, tag: str, *rate: float) -> dict[str, Any]:
    """Run ``fn`` in ``procs`` processes (concurrency split among them); the broker's CPU
    over the same window."""
    ctx = mp.get_context("fork")
    pipes, workers = [], []
    for i in range(procs):
        parent, child = ctx.Pipe(duplex=False)
        w = ctx.Process(target=_child, args=(child, fn, (
            port, max(1, concurrency // procs), warm_s, window_s, f"{tag}p{i}x", i * 20000,
            *(r / procs for r in rate))),
            daemon=True)
        w.start()
        CHILDREN.append(w)
        workers.append(w)
        pipes.append(parent)
    time.sleep(warm_s)
    t0, (u0, s0) = time.monotonic(), cpu_ticks(broker_pid)
    time.sleep(window_s)
    u1, s1 = cpu_ticks(broker_pid)
    broker_cpu = (u1 - u0 + s1 - s0) / os.sysconf("SC_CLK_TCK")
    broker_sys = (s1 - s0) / os.sysconf("SC_CLK_TCK")
    broker_window = time.monotonic() - t0
    results = []
    for p in pipes:
        if p.poll(warm_s + window_s + 30):
            results.append(p.recv())
    for w in workers:
        w.join(5)
        if w.is_alive():
            w.kill()
        CHILDREN.remove(w)
    if len(results) != procs:
        raise RuntimeError("a load generator did not report")
    window = statistics.mean(r["window_s"] for r in results)
    done = sum(r["done"] for r in results)
    lat = sorted(x for r in results for x in r["latencies"])
    return {"rate": done / window, "done": done, "failed": sum(r["failed"] for r in results),
            "p50": lat[len(lat) // 2] if lat else float("nan"),
            "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
            "broker_cpu": broker_cpu / broker_window,
            "broker_sys": broker_sys / broker_cpu if broker_cpu else float("nan"),
            "broker_cpu_per": broker_cpu / done if done else float("nan"),
            "gen_cpu": sum(r["cpu_s"] for r in results) / window,
            "opened": sum(r.get("opened", 0) for r in results) / window}


def med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


# --- the figures ---------------------------------------------------------------------------

def bench_pairs(args: argparse.Namespace, tmp: Path) -> float:
    """Pairs at each concurrency level; with --compare, the other tree's broker too, run
    for run in turn (the same machine load for both), and the ratio."""
    trees = [("this", ENV)]
    if args.compare:
        trees.append(("compare", {**ENV, "PYTHONPATH": str(args.compare.resolve())}))
    brokers = [(name, *start_broker(OURS, tmp / f"pairs-{name}.log", env))
               for name, env in trees]
    best = 0.0
    try:
        print(f"pairs (REGISTER x 2 -> PEER x 2), {args.procs} load process(es), "
              f"{args.window:.0f} s windows, median of {args.reps}"
              + (f"; 'compare': {args.compare}" if args.compare else "") + ":")
        print(f"  {'in flight':>9} {'broker':>8} {'pairs/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'broker CPU':>11} {'CPU/pair (kernel)':>18} {'load gen CPU':>13} {'failed':>7}")
        for level in args.levels:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in brokers}
            for r in range(args.reps):
                for name, proc, port in brokers:
                    runs[name].append(load(pair_load, port, level, args.procs, args.warm,
                                           args.window, proc.pid, f"{name[0]}{level}r{r}"))
            for name, rr in runs.items():
                rate = med(rr, "rate")
                if name == "this":
                    best = max(best, rate)
                print(f"  {level:>9} {name:>8} {rate:>9.0f} {med(rr, 'p50') * 1000:>8.2f} "
                      f"{med(rr, 'p99') * 1000:>8.2f} {med(rr, 'broker_cpu') * 100:>10.0f}% "
                      f"{med(rr, 'broker_cpu_per') * 1000:>7.3f}ms "
                      f"({med(rr, 'broker_sys') * 100:2.0f}% sys) "
                      f"{med(rr, 'gen_cpu') * 100:>12.0f}% {sum(x['failed'] for x in rr):>7}",
                      flush=True)
            if args.compare:
                this, other = runs["this"], runs["compare"]
                print(f"  {'':>9} {'ratio':>8} {med(this, 'rate') / med(other, 'rate'):>8.2f}x"
                      f"{'':>28} CPU per pair: "
                      f"{med(other, 'broker_cpu_per') / med(this, 'broker_cpu_per'):.2f}x less")
        print("  (CPU as % of one core; the broker is one process on one core: near 100% it "
              "is the cap, else the load generator or the other core's load is)")
    finally:
        for _, proc, _ in brokers:
            stop(proc)
    return best


def bench_list(args: argparse.Namespace, tmp: Path) -> tuple[float, float, float]:
    """Ours with its default caps, ours with the connection cap raised (RAISED_CAPS), the
    original's broker: one run of each in turn, --reps times."""
    print(f"\nlist answers (connect, read to EOF, close), median of {args.reps}:")
    rows: dict[str, list[dict[str, Any]]] = {"ours": [], "raised": [], "original": []}
    for r in range(args.reps):  # in turn: all see the same machine load
        for name, argv, clients, rate in (
                ("ours", OURS, args.list_clients, args.list_rate),
                ("raised", [sys.executable, "-c", RAISED_CAPS], args.raised_clients,
                 args.raised_rate)):
            proc, port = start_broker(argv, tmp / f"list-{name}{r}.log")
            try:
                rows[name].append(load(list_load, port, clients, args.procs, args.warm + 1,
                                       args.window, proc.pid, name[0], rate))
            finally:
                stop(proc)
        oport = free_port()
        oproc = start_original(oport)
        try:
            rows["original"].append(load(list_load, oport, args.original_clients, args.procs,
                                         args.warm, args.window, oproc.pid, "o"))
        finally:
            stop(oproc)
    for name, label, clients in (
            ("ours", "synprobe broker", f"{args.list_rate:.0f} new clients/s offered, "
                                        f"{med(rows['ours'], 'opened'):.0f}/s came, at most "
                                        f"{args.list_clients} at once"),
            ("raised", " caps raised", f"{args.raised_rate:.0f}/s offered, "
                                       f"{med(rows['raised'], 'opened'):.0f}/s came, at most "
                                       f"{args.raised_clients} at once"),
            ("original", "original broker", f"{args.original_clients} clients at once")):
        runs = rows[name]
        print(f"  {label:<16} {med(runs, 'rate'):>7.0f}/s  ({clients}; "
              f"broker CPU {med(runs, 'broker_cpu') * 100:.0f}%, "
              f"{med(runs, 'broker_cpu_per') * 1000:.3f} ms per answer; load gen CPU "
              f"{med(runs, 'gen_cpu') * 100:.0f}%; failed {sum(x['failed'] for x in runs)})")
    ours, raised, orig = (med(rows[n], "rate") for n in ("ours", "raised", "original"))
    print(f"  ratio ours/original: {ours / orig:.2f} (default caps), {raised / orig:.2f} (caps "
          f"raised); CPU per answer, original/ours: "
          f"{med(rows['original'], 'broker_cpu_per') / med(rows['ours'], 'broker_cpu_per'):.2f}")
    print("  (ours holds each silent client SEED_GRACE_S = 1 s: at most MAX_CONNECTIONS = "
          "20480 of them, or the open-file limit less 128, whatever the CPU)")
    return ours, raised, orig


def hold_waiting(port: int, count: int, deadline_s: float) -> list[socket.socket]:
    """``count`` clients registered and waiting (each in its own session, 10 per source
    address); returns their sockets once each has its REGISTERED."""
    held: list[socket.socket] = []
    ep = select.epoll()
    pending: dict[int, socket.socket] = {}
    srcs = sources(count // 10 + 1, 100000)
    end = time.monotonic() + deadline_s
    try:
        for i in range(count):
            s = _client_socket(srcs[i // 10])
            s.connect_ex(("127.0.0.1", port))
            held.append(s)
            pending[s.fileno()] = s
            ep.register(s.fileno(), select.EPOLLOUT)
            if len(pending) >= 500 or i == count - 1:  # in batches: under the backlog
                while pending and time.monotonic() < end:
                    for fd, events in ep.poll(0.2):
                        s = pending[fd]
                        if events & select.EPOLLOUT:
                            ep.modify(fd, select.EPOLLIN)
                            s.send(f"SSYN1 REGISTER session=w{fd}x{i}\n".encode())
                        else:
                            if b"REGISTERED" not in s.recv(4096):
                                raise RuntimeError("a waiting client was refused")
                            ep.unregister(fd)
                            del pending[fd]
                if pending:
                    raise RuntimeError(f"{len(pending)} clients not registered in time")
        return held
    except BaseException:
        for s in held:
            _abort(s)
        raise
    finally:
        ep.close()


def bench_rss(args: argparse.Namespace, tmp: Path) -> float:
    print(f"\nbroker RSS with {WAITING_CLIENTS} clients registered and waiting "
          "(the broker's own caps), median of {}:".format(args.reps))
    idle, full = [], []
    for r in range(args.reps):
        proc, port = start_broker(OURS, tmp / f"rss{r}.log")
        try:
            time.sleep(0.3)
            idle.append(rss_mb(proc.pid))
            held = hold_waiting(port, WAITING_CLIENTS, 60)
            try:
                time.sleep(0.5)
                full.append(rss_mb(proc.pid))
            finally:
                for s in held:
                    _abort(s)
        finally:
            stop(proc)
    per_client_kb = (statistics.median(full) - statistics.median(idle)) * 1024 / WAITING_CLIENTS
    print(f"  idle {statistics.median(idle):.1f} MB, with {WAITING_CLIENTS} waiting "
          f"{statistics.median(full):.1f} MB ({per_client_kb:.1f} kB per client; "
          f"{statistics.median(full) / statistics.median(idle):.1f}x idle)")
    return statistics.median(full)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warm", type=float, default=1.0)
    ap.add_argument("--window", type=float, default=3.0)
    ap.add_argument("--levels", type=lambda t: [int(x) for x in t.split(",")],
                    default=[10, 100, 400])
    ap.add_argument("--procs", type=int, default=2, help="load generator processes")
    # Our broker holds each silent client SEED_GRACE_S (1 s) and at most MAX_CONNECTIONS
    # (20480, or the open-file limit less 128) at once: past that many list answers a
    # second, that cap is the limit.
    ap.add_argument("--list-clients", type=int, default=16000)
    ap.add_argument("--list-rate", type=float, default=12000.0,
                    help="new list clients a second offered to our broker")
    ap.add_argument("--raised-clients", type=int, default=16000)
    ap.add_argument("--raised-rate", type=float, default=12000.0)
    ap.add_argument("--original-clients", type=int, default=32)
    ap.add_argument("--only", choices=("pairs", "list", "rss"))
    ap.add_argument("--compare", type=Path, metavar="SRC", help="pairs: also run the broker "
                    "of this source tree (another version of src/), run for run in turn")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the brokers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started ignoring it
    missed = []
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (shared: medians)")
    try:
        with tempfile.TemporaryDirectory(prefix="bench_broker") as tmpdir:
            tmp = Path(tmpdir)
            if args.only in (None, "pairs"):
                best = bench_pairs(args, tmp)
                print(f"  best: {best:.0f} pairs/s (target: at least {TARGET_PAIRS_S:.0f})")
                if best < TARGET_PAIRS_S:
                    missed.append(f"{best:.0f} pairs/s < {TARGET_PAIRS_S:.0f}")
            if args.only in (None, "list"):
                ours, raised, orig = bench_list(args, tmp)
                if max(ours, raised) < orig:
                    missed.append(f"list {max(ours, raised):.0f}/s < the original's "
                                  f"{orig:.0f}/s")
            if args.only in (None, "rss"):
                rss = bench_rss(args, tmp)
                if rss >= TARGET_RSS_MB:
                    missed.append(f"RSS {rss:.0f} MB >= {TARGET_RSS_MB:.0f} MB")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        for child in CHILDREN:
            if isinstance(child, subprocess.Popen):
                stop(child)
            elif child.is_alive():
                child.kill()
    print("\ntargets: " + ("met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
