"""The one place a nat-check report becomes text: the table (tabulate) and the JSON."""

from __future__ import annotations

import json
from typing import Any

from .report import KEYS, NatCheckReport

LABELS = {
    "public": "public endpoint(s)",
    "behind_nat": "behind a NAT",
    "mapping": "mapping",
    "port_preservation": "port preservation",
    "port_allocation": "port allocation",
    "filtering": "filtering",
    "unsolicited_syn": "unsolicited SYN answered with",
    "reply_syn": "reply SYN (simultaneous open)",
    "syn_sent_lifetime_s": "SYN hole lifetime (s)",
    "hairpin": "hairpin",
    "hops": "hops to the NAT",
    "host_stack": "host TCP on RST/ICMP/TTL",
    "port_range": "public port range",
}
REASON_WIDTH = 58


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


def _port_range(value: dict[str, Any] | None) -> str:
    """port_range in a few words: the range, then hot band, uniform or not telling."""
    if value is None:
        return "-"
    if value["range"] is None:
        return f"{value['samples']} sample(s)"
    lo, hi = value["range"]
    if value["hot_band"]:
        how = "hot {}-{}".format(*value["hot_band"])
    else:
        how = {True: "uniform", False: "not uniform", None: "uniform not told"}[value["uniform"]]
    return f"{lo}-{hi}, {how} ({value['samples']} samples)"


def table(report: NatCheckReport) -> str:
    from tabulate import tabulate

    data = report.to_json()
    rows = [(LABELS[k], _port_range(data[k]) if k == "port_range" else _value(data[k]),
             data["reasons"].get(k, "")) for k in KEYS]
    out = [tabulate(rows, headers=["", "value", "how it was measured"],
                    maxcolwidths=[None, 28, REASON_WIDTH])]
    rec = data["recommendation"]
    rec_rows = [(name.replace("_", " "), _value(item["value"]), item["reason"])
                for name, item in rec.items()]
    out.append(tabulate(rec_rows, headers=["recommendation", "value", "why"],
                        maxcolwidths=[None, 12, REASON_WIDTH + 16]))
    pk = data["packets"]
    figures = f"checked {data['server']} in {data['duration_s']:.2f} s"
    if pk:
        figures += (f"; packets: {pk['sent_by_client']} sent by this host, "
                    f"{pk['sent_by_server_raw']} raw probes sent by the server")
    if report.rfc5382_asked:
        out.append(rfc5382_table(report))
    out.append(figures)
    out.append("verdict: " + data["verdict"])
    return "\n\n".join(out)


def rfc5382_table(report: NatCheckReport) -> str:
    """RFC 5382, one row per requirement: level, result, why."""
    from tabulate import tabulate

    rows = [(r.req, r.level, str(r.status), r.reason) for r in report.rfc5382]
    return tabulate(rows, headers=["RFC 5382", "level", "result", "why"],
                    maxcolwidths=[None, None, None, REASON_WIDTH + 10])


def evidence_lines(report: NatCheckReport) -> list[str]:
    """--verbose --rfc5382: each requirement's packets and times (times from the first
    packet of the capture; the pcap holds the same packets)."""
    out = []
    for r in report.rfc5382:
        out.append(f"{r.req}: {r.status}: {r.reason}")
        out += [f"  {r.req} evidence: {line}" for line in r.evidence]
    return out


def as_json(report: NatCheckReport) -> str:
    return json.dumps(report.to_json(), sort_keys=False)
