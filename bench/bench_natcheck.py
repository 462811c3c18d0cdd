"""How long nat-check takes and how many packets it sends, in the NAT lab (root).

    python bench/bench_natcheck.py [--runs N] [--profile P]

Runs `synprobe nat-check --json` (without --timers) N times from a host behind the
profile, after one warm-up run (the broker imports scapy at its first check), and prints
the median and worst of: the check's own duration (duration_s), the wall time of the
whole process (Python start-up and imports included), packets this host sent, raw probe
packets the broker sent. Target: under 2 s, about 40 packets at most.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from synprobe import lab as labmod

SERVER = f"{labmod.BROKER_IPS[0]}:{labmod.BROKER_PORT}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--profile", default="home", choices=sorted(labmod.PROFILES))
    args = parser.parse_args()
    durations, walls, sent, raw, received = [], [], [], [], []
    with labmod.Lab(args.profile, "home", lab_id="ncbench") as lab:
        labmod.start_broker(lab, extra=["--probe", "-q"])
        argv = [*labmod.SYNPROBE, "nat-check", "--server", SERVER, "--json"]
        for i in range(args.runs + 1):
            start = time.monotonic()
            run = lab.run("ha", argv, timeout=30)
            wall = time.monotonic() - start
            if run.returncode != 0:
                print(f"run {i}: exit {run.returncode}: {run.stderr.strip()}", file=sys.stderr)
                return 1
            report = json.loads(run.stdout)
            if i == 0:
                print(f"warm-up: {report['duration_s']:.3f} s (the broker's first check)")
                continue
            durations.append(report["duration_s"])
            walls.append(wall)
            sent.append(report["packets"]["sent_by_client"])
            received.append(report["packets"]["received_by_client"])
            raw.append(report["packets"]["sent_by_server_raw"])
    print(f"nat-check against a broker in the lab, host behind '{args.profile}', "
          f"{args.runs} runs")
    rows = [("check duration (s)", durations), ("process wall time (s)", walls),
            ("packets sent by the host", sent), ("packets received by the host", received),
            ("raw probes sent by the broker", raw)]
    for label, values in rows:
        print(f"  {label:<30} median {statistics.median(values):7.3f}   max {max(values):7.3f}")
    ok = statistics.median(durations) < 2.0 and max(sent) <= 40
    print("target (< 2 s, <= 40 packets sent):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
