"""Benchmark: `--strategy auto` against `plain`, in the same run, in the NAT lab (needs
root). The broker runs with --syn-probe, so auto is what the broker chooses from what it
learnt of both NATs: sync, order or prime.

For each profile pair and link-delay setting, N punches with each strategy (start order
alternating). Per run: the time from the moment the peers knew each other to both
connected (wall-clock stamps in the two JSON objects; one machine, one clock) and the
SYNs each side sent to the peer (counted in the run's own `--pcap` captures: bare SYNs
from us to the peer, retransmissions and the TTL-limited one included).

Targets (exit 1 when one is missed):
* every auto run connects;
* where plain connected in at least half of its runs, auto's median time is within one
  peer-to-peer RTT + 5 ms of plain's when auto ran sync; order and prime wait for the
  broker's GO (the round trip that orders the SYNs, which plain does not make): for them
  the bound is one peer-to-peer RTT + one client-broker RTT + 5 ms;
* auto's median SYNs per side is at most 4.
CPU while waiting for the peer is the same code for both strategies: bench_punch.py
measures it.

    sudo .venv/bin/python bench/bench_strategies.py [--runs 7] [--settings a,b]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from synprobe import lab as labmod  # noqa: E402
from synprobe.packets.reader import read_capture  # noqa: E402

PAIRS = [("home", "home"), ("original", "original"), ("reject-icmp-port", "home"),
         ("carrier", "original")]
# name -> (what, link delays, peer-to-peer RTT, client-broker RTT)
SETTINGS = {
    "a": ("no added delay", labmod.LinkDelays(), 0.0, 0.0),
    "b": ("broker 50 +- 10 ms, peers 0.5 ms from the router",
          labmod.LinkDelays(a=0.0005, b=0.0005, broker=0.05, jitter_s=0.01), 0.002, 0.101),
}
TIMEOUT_S = 4.0
MARGIN_S = 0.005
MAX_SYNS = 4


def syns_to_peer(path: Path, peer: str) -> int:
    """Bare SYNs from us to the peer in a run's own capture (its role comments)."""
    contents = read_capture(path.read_bytes())
    return sum(1 for s in contents.segments if s.comment == f"punch: SYN from us to {peer}")


def one(lab: labmod.Lab, session: str, strategy: str, first: str, tmp: Path
        ) -> tuple[float | None, list[int], str]:
    pcaps = {side: tmp / f"{session}.{side}.pcapng" for side in "ab"}
    run_a, run_b = labmod.punch_pair(
        lab, session, args=["--no-chat", "--strategy", strategy], first=first,
        timeout_s=TIMEOUT_S, side_args={s: ["--pcap", str(p)] for s, p in pcaps.items()})
    ra, rb = run_a.report, run_b.report
    ran = str((ra or rb or {}).get("strategy"))
    if not (ra and rb and ra["established"] and rb["established"]):
        return None, [], ran
    if not all(pcaps[s].exists() for s in "ab"):
        raise RuntimeError(f"a capture is missing: {run_a.stderr[-300:]} {run_b.stderr[-300:]}")
    syns = [syns_to_peer(pcaps[s], str(r["peer"])) for s, r in (("a", ra), ("b", rb))]
    known = min(float(ra["peer_known_at"]), float(rb["peer_known_at"]))
    return max(float(ra["established_at"]), float(rb["established_at"])) - known, syns, ran


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--settings", default="a,b")
    args = parser.parse_args()
    missed: list[str] = []
    print(f"{'setting':8s} {'pair':28s} {'strategy':14s} {'connected':>9s} {'median ms':>9s} "
          f"{'max ms':>8s} {'SYNs/side (median, max)':>24s}")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        counter = itertools.count()
        for setting in args.settings.split(","):
            what, links, p2p_rtt, broker_rtt = SETTINGS[setting]
            for a, b in PAIRS:
                medians: dict[str, float | None] = {}
                ok: dict[str, int] = {}
                with labmod.Lab(a, b, lab_id=f"bs{next(counter)}", links=links) as lab:
                    labmod.start_broker(lab, ["--syn-probe"])
                    ran: set[str] = set()
                    for strategy in ("plain", "auto"):
                        times, syns = [], []
                        for i in range(args.runs):
                            took, s, what_ran = one(lab, f"{strategy}{i}", strategy,
                                                    "ab"[i % 2], tmp)
                            syns += s
                            if strategy == "auto":
                                ran.add(what_ran)
                            if took is not None:
                                times.append(took)
                        ok[strategy] = len(times)
                        medians[strategy] = statistics.median(times) if times else None
                        syn_median = statistics.median(syns) if syns else 0
                        label = (f"auto ({','.join(sorted(ran))})" if strategy == "auto"
                                 else strategy)
                        print(f"{setting:8s} {a + ' x ' + b:28s} {label:14s} "
                              f"{len(times):>4d}/{args.runs:<4d} "
                              + (f"{statistics.median(times) * 1000:9.1f} "
                                 f"{max(times) * 1000:8.1f}"
                                 if times else f"{'-':>9s} {'-':>8s}")
                              + f" {syn_median:>14.1f} {max(syns, default=0):>9d}", flush=True)
                        if strategy == "auto":
                            if len(times) < args.runs:
                                missed.append(f"{setting} {a} x {b}: auto connected "
                                              f"{len(times)}/{args.runs}")
                            if syn_median > MAX_SYNS:
                                missed.append(f"{setting} {a} x {b}: auto sent {syn_median} "
                                              f"SYNs per side (median)")
                plain, auto = medians["plain"], medians["auto"]
                # GO's round trip: order and prime make it, sync does not
                extra = 0.0 if ran == {"sync"} else broker_rtt
                if plain is not None and auto is not None and ok["plain"] * 2 >= args.runs \
                        and auto > plain + p2p_rtt + extra + MARGIN_S:
                    missed.append(f"{setting} {a} x {b}: auto {auto * 1000:.1f} ms > plain "
                                  f"{plain * 1000:.1f} ms + RTTs {p2p_rtt * 1000:.1f} + "
                                  f"{extra * 1000:.0f} ms + {MARGIN_S * 1000:.0f} ms")
            print(f"(setting {setting}: {what})")
    for line in missed:
        print(f"MISSED: {line}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
