"""Fuzz a live broker on loopback for longer than the test suite does (run by hand).

Starts `synprobe broker --bind 127.0.0.1:0` (or uses --port of one already running),
sends N random or mutated inputs, each on a fresh connection from its own source
address of 127.0.0.0/8 (so the per-address rate limits do not turn the run into a test
of rate-limited alone; --one-address sends them all from 127.0.0.1), a few connections
at once, and checks:

* every answer is whole lines of the rendezvous protocol with a documented ERROR code
  (or the list answer, for a client that sent nothing);
* the broker's stderr holds no "Traceback" and no "internal error";
* a clean pair still pairs afterwards;

and prints the inputs sent, the answers by kind, the time it took, the broker's RSS
before and after.

    .venv/bin/python bench/fuzz_broker.py [--inputs 20000] [--seed 1] [--parallel 8]
"""

from __future__ import annotations

import argparse
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

DOCUMENTED_CODES = {"bad-request", "bad-session", "busy", "timeout", "peer-gone",
                    "untraversable", "replaced", "rate-limited", "evicted"}
VERBS = ["REGISTER", "WHOAMI", "PRIMED", "OBSERVE", "NC_HELLO", "NC_PROBE", "PEER", "GO",
         "ZZ", "register", "REGISTER\x00"]
FIELDS = ["session", "local", "strategies", "mapping", "unsolicited", "reply_syn",
          "sockets", "guesses", "port_range", "port_hot", "close", "x", "A", "_"]
VALUES = ["s", "a" * 64, "a" * 65, "127.0.0.1:1", "::1", "1.2.3.4:99999", "1.2.3.4:-1",
          "prime,order,sync,birthday", ",,,", "varies", "same", "drop", "reject",
          "blocked", "pass", "0", "-1", "1-65535", "65535-1", "1", "450", "9" * 40, "",
          "=", "%", "é"]


def valid_line(rng: random.Random) -> bytes:
    words = ["SSYN1", rng.choice(VERBS)]
    for _ in range(rng.randrange(7)):
        words.append(f"{rng.choice(FIELDS)}={rng.choice(VALUES)}")
    if rng.random() < 0.5:
        words.insert(2, f"session=f{rng.randrange(50)}")
    return (" ".join(words) + rng.choice(["\n", "\r\n", "", "\n\n"])).encode(
        "utf-8", "replace")


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(5)):
        op = rng.choice(["flip", "cut", "insert", "repeat", "delete"])
        at = rng.randrange(len(buf) + 1)
        if op == "flip" and buf:
            buf[min(at, len(buf) - 1)] = rng.randrange(256)
        elif op == "cut":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = rng.choice([b"\n", b"\r", b"\x00", b" ", b"=", b"\xff", b"SSYN1 ",
                                     b"A" * 600, bytes(rng.randrange(256) for _ in range(8))])
        elif op == "delete":
            del buf[at:at + rng.randrange(1, 8)]
        else:
            buf += buf[at:at + 64] * rng.randrange(1, 10)
    return bytes(buf)


def make_input(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 700)))
    data = b"".join(valid_line(rng) for _ in range(rng.randrange(1, 4)))
    return data if kind < 0.5 else mutate(rng, data)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def exchange(port: int, src: str, data: bytes, timeout_s: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s,
                                  source_address=(src, 0)) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                chunk = s.recv(4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out


def judge(data: bytes, out: bytes) -> str:
    """The kind of answer, or 'BAD: ...' when it breaks the protocol."""
    from simulsyn_core._internal.wire import ProtocolError, decode_seed_list, parse_line

    if not data:
        try:
            decode_seed_list(out)
        except ProtocolError as exc:
            return f"BAD: list answer {exc}"
        return "list"
    if not out:
        return "closed"
    if not out.endswith(b"\n"):
        return f"BAD: partial line {out[-60:]!r}"
    kinds = []
    for raw in out.split(b"\n")[:-1]:
        try:
            msg = parse_line(raw)
        except ProtocolError as exc:
            return f"BAD: {exc} in {raw[:80]!r}"
        if msg.verb == "ERROR" and msg.get("code") not in DOCUMENTED_CODES:
            return f"BAD: undocumented code in {raw[:80]!r}"
        kinds.append(msg.verb if msg.verb != "ERROR" else f"ERROR {msg.get('code')}")
    return "+".join(kinds)


def clean_pair(port: int) -> float:
    from simulsyn_core._internal.wire import parse_line

    start = time.monotonic()
    a = socket.create_connection(("127.0.0.1", port), timeout=5,
                                 source_address=("127.1.0.1", 0))
    b = socket.create_connection(("127.0.0.1", port), timeout=5,
                                 source_address=("127.2.0.1", 0))
    with a, b:
        a.sendall(b"SSYN1 REGISTER session=fuzz-clean\n")
        assert parse_line(a.makefile("rb").readline().rstrip(b"\n")).verb == "REGISTERED"
        b.sendall(b"SSYN1 REGISTER session=fuzz-clean\n")
        assert parse_line(b.makefile("rb").readline().rstrip(b"\n")).verb == "PEER"
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--one-address", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    inputs = [make_input(rng) for _ in range(args.inputs)]
    inputs[::97] = [b""] * len(inputs[::97])  # some silent (list) clients too

    with tempfile.TemporaryDirectory() as tmp:
        err_path = Path(tmp, "stderr")
        with open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "synprobe", "broker", "--bind",
                                     "127.0.0.1:0"], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err)
        try:
            end = time.monotonic() + 15
            port = None
            while port is None and time.monotonic() < end and proc.poll() is None:
                m = re.search(r"listening on 127\.0\.0\.1:(\d+)", err_path.read_text())
                port = int(m.group(1)) if m else None
                time.sleep(0.05)
            if port is None:
                print(f"broker did not start: {err_path.read_text()}", file=sys.stderr)
                return 2
            rss0 = rss_kb(proc.pid)
            kinds: Counter[str] = Counter()
            bad: list[str] = []
            lock = threading.Lock()
            deadline = time.monotonic() + args.max_seconds
            start = time.monotonic()

            def worker(index: int) -> None:
                for i in range(index, len(inputs), args.parallel):
                    if time.monotonic() > deadline:
                        return
                    src = "127.0.0.1" if args.one_address else \
                        f"127.{64 + i // 65024 % 64}.{i // 254 % 256}.{i % 254 + 1}"
                    try:
                        out = exchange(port, src, inputs[i], 5.0)
                        kind = judge(inputs[i], out)
                    except OSError as exc:
                        kind = f"connect failed: {exc.__class__.__name__}"
                    with lock:
                        kinds[kind.split(" in ")[0][:60]] += 1
                        if kind.startswith("BAD"):
                            bad.append(f"{inputs[i][:100]!r} -> {kind}")

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.parallel)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            took = time.monotonic() - start
            rss1 = rss_kb(proc.pid)
            pair_s = clean_pair(port)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        stderr = err_path.read_text(errors="replace")
    sent = sum(kinds.values())
    print(f"{sent} inputs in {took:.1f} s ({sent / took:.0f}/s), {args.parallel} at once, "
          f"seed {args.seed}")
    for kind, n in kinds.most_common(25):
        print(f"  {n:7d}  {kind}")
    print(f"broker RSS: {rss0} kB before, {rss1} kB after; a clean pair after: "
          f"{pair_s * 1000:.1f} ms; stderr: {len(stderr.splitlines())} lines")
    problems = bad[:10]
    if "Traceback" in stderr:
        problems.append("Traceback in the broker's stderr")
    if "internal error" in stderr:
        problems.append("internal error in the broker's stderr: " + next(
            line for line in stderr.splitlines() if "internal error" in line))
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
