"""Run the lab's punch matrix (every ordered pair of profiles, both orders of start) several
times under one link-delay setting, and print the counts: the figures of the adaptive-punch
issue and of the README's "Which pairs connect". Needs root; takes minutes.

    sudo .venv/bin/python scripts/lab_matrix.py --setting a --runs 5 [--strategy auto]
        [--syn-probe] [--workers 4] [--json out.json] [--markdown]

--syn-probe: the broker probes each registering client's NAT with one SYN, and auto
chooses sync, order or prime from that; without it the broker knows nothing of the NATs
and auto primes every pair.

Settings (one-way delay on each link to the router):
  a  no added delay
  b  the broker 50 ms +- 10 ms away, both peers 0.5 ms from the router
  c  asymmetric: A's side 5 ms, B's side 80 ms, the broker 20 ms

Each run's outcome is judged as tests/test_lab_punch.py judges it (its ``expectation``):
"connect" pairs must connect with a chat line each way, "refused" pairs (a port-randomising
NAT) must both end with exit 5 and an `untraversable:` error within 2 s, "fail" pairs must
end with exit 5; every run within --timeout (plus the broker's delay) and its ending.
Exits 1 if any run missed its expectation.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from simulsyn_core._internal.signals import sigterm_as_interrupt  # noqa: E402
from synprobe import lab as labmod  # noqa: E402
from test_lab_punch import ENDING_S, REFUSED_WITHIN_S, TIMEOUT_S, expectation  # noqa: E402

SETTINGS = {
    "a": ("no added delay", labmod.LinkDelays()),
    "b": ("broker 50 +- 10 ms, peers 0.5 ms from the router",
          labmod.LinkDelays(a=0.0005, b=0.0005, broker=0.05, jitter_s=0.01)),
    "c": ("A's side 5 ms, B's side 80 ms, broker 20 ms",
          labmod.LinkDelays(a=0.005, b=0.08, broker=0.02)),
}
LAB_PREFIX = f"mx{os.getpid() % 10000}"  # every lab of this run; swept on any exit
PAIRS = [(a, b, first) for a, b in itertools.product(labmod.PUNCH_PROFILES, repeat=2)
         for first in ("a", "b")]


def one(a: str, b: str, first: str, links: labmod.LinkDelays, strategy: str, n: int,
        broker_args: tuple[str, ...] = ()) -> dict[str, object]:
    kind, _ = expectation(a, b)
    result: dict[str, object] = {"a": a, "b": b, "first": first, "expected": kind}
    timeout_s = TIMEOUT_S + 2 * links.broker
    try:
        with labmod.Lab(a, b, lab_id=f"{LAB_PREFIX}x{n}", links=links) as lab:
            labmod.start_broker(lab, broker_args)
            msgs = (f"from A behind {a}\n", f"from B behind {b}\n")
            run_a, run_b = labmod.punch_pair(lab, "m", messages=msgs, first=first,
                                             timeout_s=timeout_s,
                                             args=["--strategy", strategy])
    except Exception as exc:  # one run's trouble (a slow start under load) is its outcome
        return {**result, "outcome": "error", "error": f"{exc.__class__.__name__}: {exc}"}
    runs = (run_a, run_b)
    reports = [r.report or {} for r in runs]
    errors = [str(rep.get("error") or "") for rep in reports]
    in_time = max(r.elapsed_s for r in runs) < timeout_s + ENDING_S
    if all(r.returncode == 0 for r in runs) and run_a.chat_lines == [msgs[1].strip()] \
            and run_b.chat_lines == [msgs[0].strip()]:
        outcome = "connect"
    elif all(r.returncode == 5 for r in runs) and all(
            e.startswith("untraversable: ") for e in errors) and max(
            r.elapsed_s for r in runs) < REFUSED_WITHIN_S:
        outcome = "refused"
    elif all(r.returncode == 5 for r in runs):
        outcome = "fail"
    else:
        outcome = "other"
    if not in_time:
        outcome += " (late)"
    return {**result, "outcome": outcome, "rc": [r.returncode for r in runs],
            "strategy": reports[0].get("strategy"),
            "strategies": [rep.get("strategy") for rep in reports],
            "elapsed_s": reports[0].get("elapsed_s"),
            "attempts": [rep.get("attempts") for rep in reports], "errors": errors,
            "run_s": [round(r.elapsed_s, 3) for r in runs]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="a")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--syn-probe", action="store_true",
                        help="start the broker with --syn-probe")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--only", metavar="PROFILE",
                        help="only the pairs with this profile on at least one side")
    parser.add_argument("--json", help="write every run's result here")
    parser.add_argument("--markdown", action="store_true",
                        help="print the README's table of outcomes")
    args = parser.parse_args()
    what, links = SETTINGS[args.setting]
    pairs = [(a, b, f) for a, b, f in PAIRS if args.only in (None, a, b)]
    jobs = [(a, b, f) for _ in range(args.runs) for a, b, f in pairs]
    counter = itertools.count()
    start = time.monotonic()
    pool = ThreadPoolExecutor(args.workers)
    try:
        with sigterm_as_interrupt():
            results = list(pool.map(
                lambda job: one(*job, links, args.strategy, next(counter),
                                ("--syn-probe",) if args.syn_probe else ()), jobs))
    finally:
        # Ctrl-C or SIGTERM: drop what has not started, let the running runs end (each is
        # bounded by its --timeout), then sweep whatever lab is left.
        pool.shutdown(wait=True, cancel_futures=True)
        labmod.sweep(f"{LAB_PREFIX}x", id_prefix=True)
    took = time.monotonic() - start
    tally = collections.Counter((r["expected"], r["outcome"]) for r in results)
    misses = [r for r in results if r["outcome"] != r["expected"]]
    print(f"setting {args.setting} ({what}), strategy {args.strategy}"
          f"{', broker --syn-probe' if args.syn_probe else ''}: {len(results)} runs "
          f"({args.runs} x {len(pairs)}) in {took:.0f} s")
    ran = collections.Counter(str(s) for r in results for s in r.get("strategies") or ())
    print(f"  strategies that ran (per side): {dict(sorted(ran.items()))}")
    for (expected, outcome), count in sorted(tally.items()):
        print(f"  expected {expected:7s} got {outcome:7s} {count}")
    per_run = collections.Counter(i // len(pairs) for i, r in enumerate(results)
                                  if r["outcome"] != r["expected"])
    print(f"  misses per run of the matrix: {[per_run.get(i, 0) for i in range(args.runs)]}")
    for r in misses:
        print(f"  MISS {r['a']} x {r['b']} ({r['first']} first): expected {r['expected']}, "
              f"got {r['outcome']} rc={r.get('rc')} {r.get('errors') or r.get('error')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"setting": args.setting, "strategy":
                                               args.strategy, "syn_probe": args.syn_probe,
                                               "runs": results}, indent=1))
    if args.markdown:
        print_markdown(results)
    return 1 if misses else 0


def print_markdown(results: list[dict[str, object]]) -> None:
    """Rows: A's profile; columns: B's; a cell: connected runs / runs (both orders), and
    the strategy that ran when it was the same in every run of the pair."""
    names = list(labmod.PUNCH_PROFILES)
    cells: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    ran: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for r in results:
        cell = cells[(str(r["a"]), str(r["b"]))]
        cell[0] += r["outcome"] == "connect"
        cell[1] += 1
        if r.get("outcome") == "connect":
            ran[(str(r["a"]), str(r["b"]))].update(str(s) for s in r.get("strategies") or ())
    print("| A \\ B | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for a in names:
        row = [f"{cells[(a, b)][0]}/{cells[(a, b)][1]}"
               + (f" {next(iter(ran[(a, b)]))}" if len(ran[(a, b)]) == 1 else "")
               for b in names]
        print(f"| {a} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("lab_matrix: interrupted; its labs were removed", file=sys.stderr)
        sys.exit(130)
