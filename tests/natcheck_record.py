"""Record the captures the nat-check classifier tests read (run by hand, as root):

    python -m tests.natcheck_record [PROFILE ...]

For each profile, in captures/natcheck/: the client's capture (<profile>-client.pcap),
the rest of what the check sent and saw (<profile>-evidence.json: the broker's NC_INFO and
NC_RESULT, the mapping observations, the probes' ports, the host_stack connect()s as
they ended), the report nat-check --json printed (<profile>.json), and the broker's side
of the raw probes, captured with tcpdump in the broker's namespace (<profile>-broker.pcap).

The check runs as nat-check does (``run_natcheck``, with the profile's options from
natcheck_expected.EXTRA) in a child process inside the lab host's namespace. A run that
exits non-zero, or whose report differs from natcheck_expected.EXPECTED, is refused:
nothing is written for that profile and the recorder exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from simulsyn_core._internal.endpoint import Endpoint
from synprobe import lab as labmod
from tests.natcheck_expected import EXTRA, SERVER, mismatches

OUT = Path(__file__).resolve().parent.parent / "captures" / "natcheck"
PAIRS = [("home", "original"), ("reject-icmp-port", "reject-icmp-admin"),
         ("random", "syn-drop-all"), ("dmz", "firewall"), ("carrier", "reject-rst")]
PROBE_FILTER = f"tcp port {labmod.BROKER_PORT + 2} or icmp"
CHECK_TIMEOUT_S = 40.0
TCPDUMP_READY_S = 5.0


class Refused(Exception):
    """A run that must not become a capture."""


def child(argv: list[str]) -> int:
    """In the lab host: one check; {"report", "evidence"} on stdout; its exit code."""
    from synprobe.natcheck.client import CheckConfig, run_natcheck

    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--pcap", required=True)
    parser.add_argument("--timers", action="store_true")
    parser.add_argument("--max-wait", type=float, default=150.0)
    args = parser.parse_args(argv)
    report = run_natcheck(CheckConfig(Endpoint.parse(args.server), args.timers,
                                      args.max_wait, args.pcap))
    evidence = report.evidence.to_json() if report.evidence is not None else None
    print(json.dumps({"report": report.to_json(), "evidence": evidence}))
    return report.exit_code


def _wait_for_tcpdump(proc: subprocess.Popen[bytes]) -> None:
    """tcpdump says "listening on" on stderr once its capture is open."""
    assert proc.stderr is not None
    end = time.monotonic() + TCPDUMP_READY_S
    said = b""
    while b"listening on" not in said:
        remaining = end - time.monotonic()
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, remaining))
        chunk = os.read(proc.stderr.fileno(), 4096) if ready else b""
        if not chunk:
            raise Refused(f"tcpdump did not start in the broker's namespace: {said!r}")
        said += chunk


def record_one(lab: labmod.Lab, side: str, profile: str, tmp: Path) -> dict[str, Any]:
    """Run one check; raise Refused unless it exits 0 and matches EXPECTED."""
    broker_pcap, client_pcap = tmp / f"{profile}-broker.pcap", tmp / f"{profile}-client.pcap"
    # --immediate-mode: else libpcap hands packets over in blocks, up to 1 s late, and a
    # check shorter than that leaves an empty file when tcpdump is stopped.
    tcpdump = lab.popen("br", ["tcpdump", "-n", "--immediate-mode", "-U", "-i", "eth0", "-w",
                               str(broker_pcap), PROBE_FILTER],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_tcpdump(tcpdump)
        run = lab.run("h" + side, [sys.executable, "-m", "tests.natcheck_record", "--child",
                                   "--server", SERVER, "--pcap", str(client_pcap),
                                   *EXTRA.get(profile, [])], timeout=CHECK_TIMEOUT_S)
        time.sleep(0.3)  # the broker's last packets reach tcpdump's file (-U)
    finally:
        tcpdump.terminate()
        tcpdump.wait(5)
    if run.returncode != 0:
        raise Refused(f"{profile}: the check exited {run.returncode}: {run.stderr.strip()}")
    out = json.loads(run.stdout)
    wrong = mismatches(profile, out["report"])
    if wrong:
        raise Refused(f"{profile}: the report differs from EXPECTED: " + "; ".join(wrong))
    return {"profile": profile, "side": side, "options": EXTRA.get(profile, []),
            "exit_code": run.returncode, "report": out["report"],
            "evidence": out["evidence"]}


def record_pair(pair: tuple[str, str], only: set[str]) -> list[str]:
    """Record both profiles of a pair; the refusals, one line each."""
    refused = []
    with labmod.Lab(*pair, lab_id=f"ncrec{os.getpid() % 100000}") as lab, \
            tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        labmod.start_broker(lab, extra=["--probe", "-q"])
        for side, profile in zip("ab", pair, strict=True):
            if only and profile not in only:
                continue
            try:
                got = record_one(lab, side, profile, tmp)
            except Refused as exc:
                refused.append(str(exc))
                continue
            report = got.pop("report")
            report["pcap"] = f"captures/natcheck/{profile}-client.pcap"
            (OUT / f"{profile}.json").write_text(json.dumps(report, indent=1) + "\n")
            (OUT / f"{profile}-evidence.json").write_text(json.dumps(got, indent=1) + "\n")
            for end in ("client", "broker"):
                shutil.copyfile(tmp / f"{profile}-{end}.pcap", OUT / f"{profile}-{end}.pcap")
            print(profile, "recorded:", report["verdict"])
    return refused


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    only = set(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    refused = []
    for pair in PAIRS:
        if not only or only & set(pair):
            refused += record_pair(pair, only)
    for line in refused:
        print("refused:", line, file=sys.stderr)
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
