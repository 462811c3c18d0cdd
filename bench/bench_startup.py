"""Benchmark: how fast `synprobe --help` and `synprobe punch --help` start.

Compares, in the same run, against the bare interpreter and against importing scapy
(what the punch path must never pay). Medians of N runs; target: under 150 ms for
`synprobe --help` and `synprobe punch --help`, else exit 1.

    python bench/bench_startup.py [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_MS = 150.0
MEASURED = ("synprobe --help", "synprobe punch --help")  # what the target applies to


def median_ms(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                       timeout=60)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    # The console script of this interpreter's environment (not a shim found on PATH).
    script = Path(sys.executable).parent / "synprobe"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "synprobe"]
    rows = [
        ("python -c pass (floor)", [sys.executable, "-c", "pass"]),
        ("synprobe --help", [*launcher, "--help"]),
        ("synprobe punch --help", [*launcher, "punch", "--help"]),
        ("python -c 'import scapy.all' (what we avoid)",
         [sys.executable, "-c", "import scapy.all"]),
    ]
    floor = None
    missed = []
    print(f"median of {args.runs} runs ({' '.join(launcher)})")
    for name, argv in rows:
        ms = median_ms(argv, args.runs)
        floor = floor or ms
        print(f"  {name:<46} {ms:7.1f} ms   ({ms / floor:4.1f}x the bare interpreter)")
        if name in MEASURED and ms >= TARGET_MS:
            missed.append(f"{name} {ms:.1f} ms")
    print(f"target (under {TARGET_MS:.0f} ms): "
          + ("met" if not missed else "MISSED: " + ", ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
