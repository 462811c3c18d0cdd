"""Benchmark: `synprobe analyze` on a capture of 100,000 SYNs, and on input that is no
capture at all (/dev/zero, a 1 GB sparse file of zeros): peak RSS and wall time of the
process, median of N runs, beside the figures measured before analyze streamed its input
(issue 11). Target: the 100,000-SYN capture under 100 MB peak RSS, the zeros refused with
exit 7 in under 50 MB; else exit 1.

    python bench/bench_analyze.py [--runs 3] [--syns 100000]

The capture: Ethernet, one SYN a millisecond from 10.1.0.2.. (a new source port each) to
203.0.113.2:80, none answered: 100,000 attempts (70 bytes a packet, 7 MB).
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_MB = 100.0
ZEROS_TARGET_MB = 50.0
# Measured before (the whole file read, then every attempt and the whole output kept).
BEFORE = {
    "--json": "963 MB, 13 s",
    "text": "377 MB, 16 s (this machine)",
    "--brief": "325 MB, 16 s (this machine)",
    "/dev/zero": "3.77 GB, then MemoryError: exit 1",
    "1 GB of zeros": "1.06 GB, then exit 7",
}


def syn_capture(path: Path, syns: int) -> None:
    """Written a packet at a time: this process stays small (a child's ru_maxrss counts
    its parent's RSS at the fork)."""
    ethernet = bytes.fromhex("020000000002" "020000000001" "0800")
    with path.open("wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for n in range(syns):
            src = bytes([10, 1 + n // 60000, 0, 2])
            tcp = struct.pack("!HHIIHHHH", 1024 + n % 60000, 80, (n * 2654435761) % 2**32, 0,
                              (5 << 12) | 0x02, 64240, 0, 0)
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, src,
                             bytes([203, 0, 113, 2]))
            frame = ethernet + ip + tcp
            usec = 1_700_000_000_000_000 + n * 1000
            out.write(struct.pack("<IIII", usec // 10**6, usec % 10**6, len(frame), len(frame))
                      + frame)


def launcher() -> list[str]:
    script = Path(sys.executable).parent / "synprobe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "synprobe"]


def measure(argv: list[str]) -> tuple[float, float, int]:
    """(peak RSS in MB, wall seconds, exit code) of one run, its output thrown away. The
    peak is the child's ru_maxrss (wait4), which also counts this process's RSS at the
    fork: this process is kept small."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _pid, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        raise
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, wall, proc.returncode  # ru_maxrss: KB on Linux


def median_run(argv: list[str], runs: int) -> tuple[float, float, int]:
    results = [measure(argv) for _ in range(runs)]
    codes = {code for _rss, _wall, code in results}
    return (statistics.median(r[0] for r in results), statistics.median(r[1] for r in results),
            codes.pop() if len(codes) == 1 else -1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--syns", type=int, default=100_000)
    args = ap.parse_args()
    base = launcher()
    missed = []
    print(f"median of {args.runs} runs ({' '.join(base)} analyze ...)")
    with tempfile.TemporaryDirectory() as tmp:
        capture = Path(tmp) / "syns.pcap"
        syn_capture(capture, args.syns)
        zeros = Path(tmp) / "zeros"
        with zeros.open("wb") as f:
            f.truncate(1 << 30)  # 1 GB, sparse
        print(f"  {args.syns} SYNs: {capture.stat().st_size / 1e6:.1f} MB capture")
        rows = [("--json", [*base, "analyze", "--json", str(capture)], TARGET_MB, 0),
                ("text", [*base, "analyze", str(capture)], TARGET_MB, 0),
                ("--brief", [*base, "analyze", "--brief", str(capture)], TARGET_MB, 0),
                ("/dev/zero", [*base, "analyze", "/dev/zero"], ZEROS_TARGET_MB, 7),
                ("1 GB of zeros", [*base, "analyze", str(zeros)], ZEROS_TARGET_MB, 7)]
        for name, argv, target, want in rows:
            rss, wall, code = median_run(argv, args.runs)
            before = BEFORE.get(name, "")
            print(f"  {name:<14} peak RSS {rss:7.1f} MB  wall {wall:6.2f} s  exit {code}"
                  + (f"   (before: {before})" if before else ""))
            if rss >= target or code != want:
                missed.append(f"{name}: {rss:.1f} MB, exit {code}")
    verdict = "met" if not missed else "MISSED: " + "; ".join(missed)
    print(f"target (100,000 SYNs under {TARGET_MB:.0f} MB, zeros exit 7 under "
          f"{ZEROS_TARGET_MB:.0f} MB): {verdict}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
