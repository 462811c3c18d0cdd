"""Record the captures the nat-check classifier tests read (run by hand, as root):

    python -m tests.natcheck_record

For each profile: the client's --pcap and --json (captures/natcheck/<profile>-client.pcap,
<profile>.json) and the broker's side of the raw probes, captured with tcpdump in the
broker's namespace (<profile>-broker.pcap).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from synprobe import lab as labmod

OUT = Path(__file__).resolve().parent.parent / "captures" / "natcheck"
PAIRS = [("home", "original"), ("reject-icmp-port", "reject-icmp-admin"),
         ("random", "syn-drop-all"), ("dmz", "firewall"), ("carrier", "reject-rst")]
SERVER = f"{labmod.BROKER_IPS[0]}:{labmod.BROKER_PORT}"
PROBE_FILTER = f"tcp port {labmod.BROKER_PORT + 2} or icmp"


def record_pair(pair: tuple[str, str]) -> None:
    with labmod.Lab(*pair, lab_id="ncrec") as lab:
        labmod.start_broker(lab, extra=["--probe", "-q"])
        for side, profile in zip("ab", pair, strict=True):
            tcpdump = lab.popen("br", ["tcpdump", "-n", "-U", "-i", "eth0", "-w",
                                       str(OUT / f"{profile}-broker.pcap"), PROBE_FILTER],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            run = lab.run("h" + side, [*labmod.SYNPROBE, "nat-check", "--server", SERVER,
                                       "--json", "--pcap",
                                       str(OUT / f"{profile}-client.pcap")], timeout=30)
            time.sleep(0.3)
            tcpdump.terminate()
            tcpdump.wait(5)
            report = json.loads(run.stdout)
            report["pcap"] = f"captures/natcheck/{profile}-client.pcap"
            (OUT / f"{profile}.json").write_text(json.dumps(report, indent=1) + "\n")
            print(profile, run.returncode, report["verdict"])


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for pair in PAIRS:
        record_pair(pair)


if __name__ == "__main__":
    main()
