"""Benchmark: birthday punching through the lab's port-randomising NAT (needs root).

For each (N sockets, M guesses) setting, R runs of `synprobe punch` between host A
behind `random` (MASQUERADE --random-fully, ports 1024-65535) and host B behind another
profile (default `home`), the broker with --syn-probe. Printed per setting, beside each
other: the measured success rate (with its 95% Wilson interval), the uniform formula
1 - (1 - M/R)^N ~ 1 - exp(-N*M/R), and the model of Linux's allocation that the guesses
exploit (the 1024 lowest ports drawn twice as often: ``birthday.p_weighted``); the
median and 90th percentile time from the peers knowing each other to both connected;
per side the median SYNs sent (the kernel's retransmissions included) and sockets
opened; the peak of each NAT's conntrack table during the run above its count at the
start (sampled every 5 ms in the NAT's namespace); the median CPU time of each side's
birthday phase.

The baseline in the same run is the formula: a setting whose measured rate falls below
the uniform formula's by more than its interval says the model (or the code) is wrong;
exit 1 then, and when the default setting (700 x 700) connects in under 95% of its
runs or its median exceeds 3 s.

    sudo .venv/bin/python bench/bench_birthday.py [--runs 50] [--settings 100x100,...]
        [--easy home] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from simulsyn_core._internal import birthday as bday  # noqa: E402
from simulsyn_core._internal.signals import sigterm_as_interrupt  # noqa: E402
from synprobe import lab as labmod  # noqa: E402

SETTINGS = "100x100,200x200,300x300,450x450,700x700"
DEFAULT = (bday.DEFAULT_SOCKETS, bday.DEFAULT_GUESSES)
TIMEOUT_S = 12.0
# Prints the NAT's conntrack count at start and its peak, sampled every 5 ms until its
# stdin closes (bounded: at most 120 s).
SAMPLER = """
import select, sys, time
path = "/proc/sys/net/netfilter/nf_conntrack_count"
read = lambda: int(open(path).read())
start = peak = read()
end = time.monotonic() + 120
while time.monotonic() < end:
    if select.select([sys.stdin], [], [], 0.005)[0]:
        break
    peak = max(peak, read())
print(start, peak)
"""


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sample_conntrack(lab: labmod.Lab) -> dict[str, subprocess.Popen[bytes]]:
    return {side: lab.popen("g" + side, [sys.executable, "-c", SAMPLER],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            for side in "ab"}


def conntrack_added(samplers: dict[str, subprocess.Popen[bytes]]) -> dict[str, int | None]:
    added: dict[str, int | None] = {}
    for side, proc in samplers.items():
        try:
            out, _ = proc.communicate(b"x", timeout=10)
            start, peak = (int(v) for v in out.split())
            added[side] = peak - start
        except (OSError, ValueError, subprocess.TimeoutExpired):
            added[side] = None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    return added


def one(lab: labmod.Lab, session: str, n: int, m: int, first: str) -> dict[str, object]:
    samplers = sample_conntrack(lab)
    try:
        run_a, run_b = labmod.punch_pair(
            lab, session, first=first, timeout_s=TIMEOUT_S, stagger_s=0.2,
            args=["--no-chat", "--birthday-sockets", str(n), "--birthday-guesses", str(m)])
    finally:
        added = conntrack_added(samplers)
    ra, rb = run_a.report or {}, run_b.report or {}
    ok = bool(ra.get("established") and rb.get("established"))
    took = None
    if ok:
        took = max(float(ra["established_at"]), float(rb["established_at"])) - min(
            float(ra["peer_known_at"]), float(rb["peer_known_at"]))
    sides = {s: (r.get("birthday") or {}) for s, r in (("a", ra), ("b", rb))}
    strategy = {ra.get("strategy"), rb.get("strategy")}
    if strategy != {"birthday"}:
        raise RuntimeError(f"not birthday: {strategy}: {run_a.stderr[-400:]}")
    return {"ok": ok, "took_s": took, "added": added,
            "syns": {s: b.get("syns_sent") for s, b in sides.items()},
            "sockets": {s: b.get("sockets_used") for s, b in sides.items()},
            "cpu_s": {s: b.get("cpu_s") for s, b in sides.items()},
            "order": sides["a"].get("order"),
            "errors": [ra.get("error"), rb.get("error")]}


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def per_side(runs: list[dict[str, object]], key: str, scale: float = 1.0) -> str:
    """The median of a per-side figure, "A/B"."""
    out = []
    for side in "ab":
        values = [r[key][side] for r in runs]  # type: ignore[index]
        out.append(f"{med([float(v) * scale for v in values if v is not None]):.0f}")
    return "/".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--settings", default=SETTINGS)
    parser.add_argument("--easy", default="home", help="the other host's NAT profile")
    parser.add_argument("--json", help="write every run's figures here")
    args = parser.parse_args()
    settings = [tuple(int(x) for x in s.split("x")) for s in args.settings.split(",")]
    size = bday.LINUX_RANGE[1] - bday.LINUX_RANGE[0] + 1
    missed: list[str] = []
    results: dict[str, list[dict[str, object]]] = {}
    print(f"random x {args.easy}, broker --syn-probe, {args.runs} runs per setting; "
          f"ports {bday.LINUX_RANGE[0]}-{bday.LINUX_RANGE[1]} (R = {size})")
    print(f"{'N x M':>9s} {'connected':>10s} {'measured':>8s} {'95% CI':>13s} "
          f"{'uniform':>8s} {'Linux':>7s} {'median s':>8s} {'p90 s':>6s} "
          f"{'SYNs A/B':>9s} {'socks A/B':>9s} {'ct+ A/B':>11s} {'CPU ms A/B':>11s}")
    with labmod.Lab("random", args.easy, lab_id="bb", links=labmod.LinkDelays()) as lab:
        labmod.start_broker(lab, ["--syn-probe"])
        for n, m in settings:
            runs = [one(lab, f"s{n}x{m}r{i}", n, m, "ab"[i % 2]) for i in range(args.runs)]
            results[f"{n}x{m}"] = runs
            k = sum(bool(r["ok"]) for r in runs)
            lo, hi = wilson(k, len(runs))
            uniform = bday.p_uniform(n, m, size)
            linux = bday.p_weighted(n, m, bday.LINUX_RANGE)
            times = sorted(float(r["took_s"]) for r in runs if r["ok"])  # type: ignore[arg-type]
            p90 = times[min(len(times) - 1, int(0.9 * len(times)))] if times else float("nan")
            print(f"{n:>4d}x{m:<4d} {k:>4d}/{len(runs):<5d} {k / len(runs):8.3f} "
                  f"[{lo:.3f},{hi:.3f}] {uniform:8.3f} {linux:7.3f} {med(times):8.2f} "
                  f"{p90:6.2f} {per_side(runs, 'syns'):>9s} {per_side(runs, 'sockets'):>9s} "
                  f"{per_side(runs, 'added'):>11s} {per_side(runs, 'cpu_s', 1000):>11s}",
                  flush=True)
            if hi < uniform - 0.02:
                missed.append(f"{n}x{m}: measured {k}/{len(runs)} below the uniform formula "
                              f"{uniform:.3f}")
            if (n, m) == DEFAULT and (k < 0.95 * len(runs) or med(times) > 3.0):
                missed.append(f"{n}x{m} (the default): {k}/{len(runs)} connected, median "
                              f"{med(times):.2f} s (targets: 95%, 3 s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    for line in missed:
        print(f"MISSED: {line}")
    return 1 if missed else 0


if __name__ == "__main__":
    # SIGTERM unwinds as Ctrl-C does: the lab (a context manager) is taken down.
    with sigterm_as_interrupt():
        sys.exit(main())
