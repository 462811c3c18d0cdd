"""`synprobe report`: one archive for a bug report, holding exactly what it lists.

Members: versions.json (synprobe, Python, scapy, kernel), commands.txt (the command lines
that produced the nat-check result and each pcap), natcheck-last.json (if any),
pcaps/N-NAME (every pcap the tool recorded that still exists) and manifest.json (every
other member with its size and SHA-256). Nothing else from the machine: no host name,
no environment, no file owners (tar headers carry uid 0 and empty user names).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import platform
import shlex
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import click

from simulsyn_core import __version__
from simulsyn_core._internal.exitcodes import ExitStatus, ToolError

from . import state
from .cliutil import EPILOG
from .schema import SCHEMA_VERSION

UTC = datetime.timezone.utc  # noqa: UP017 (datetime.UTC needs Python 3.11)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Member:
    name: str  # path inside the archive
    data: bytes
    what: str  # one line for the listing


def versions() -> dict[str, str]:
    """Versions without importing scapy (its import is slow and touches the network
    configuration); only the kernel's name and release, nothing host-specific."""
    from importlib import metadata

    try:
        scapy_version = metadata.version("scapy")
    except metadata.PackageNotFoundError:
        scapy_version = "not installed"
    return {"synprobe": __version__, "python": platform.python_version(),
            "scapy": scapy_version, "kernel": f"{platform.system()} {platform.release()}",
            "machine": platform.machine()}


def _stamp(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def collect() -> list[Member]:
    """Everything the report will hold, manifest last. Pure apart from reading state."""
    members: list[Member] = []
    commands: list[str] = []
    members.append(Member("versions.json", (json.dumps(versions(), indent=2) + "\n").encode(),
                          "versions of synprobe, Python, scapy and the kernel"))
    natcheck = state.load_last_natcheck()
    if natcheck is not None:
        members.append(Member("natcheck-last.json",
                              (json.dumps(natcheck.get("result"), indent=2) + "\n").encode(),
                              "the last nat-check result (--json form)"))
        commands.append(f"{_stamp(float(natcheck.get('time') or 0))}  "
                        f"{shlex.join(str(w) for w in natcheck.get('command') or [])}"
                        "  # -> natcheck-last.json")
    for n, pcap in enumerate(state.recorded_pcaps(), 1):
        try:
            with open(pcap.path, "rb") as capture:
                data = capture.read()
        except OSError:
            continue  # removed or unreadable since it was recorded: not part of the report
        name = f"pcaps/{n}-{os.path.basename(pcap.path)}"
        members.append(Member(name, data, f"capture written by: {shlex.join(pcap.command)}"))
        commands.append(f"{_stamp(pcap.time)}  {shlex.join(pcap.command)}  # -> {name}")
    members.append(Member("commands.txt", "".join(c + "\n" for c in commands).encode(),
                          f"the {len(commands)} command line(s) that produced the above"))
    manifest = {"schema_version": SCHEMA_VERSION, "created": _stamp(time.time()), "members": [
        {"name": m.name, "bytes": len(m.data), "sha256": hashlib.sha256(m.data).hexdigest(),
         "what": m.what} for m in members]}
    members.append(Member(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(),
                          "this list, with sizes and SHA-256"))
    return members


def write_archive(path: str, members: Sequence[Member]) -> None:
    now = int(time.time())
    tmp = f"{path}.partial"
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for member in members:
                info = tarfile.TarInfo(member.name)
                info.size, info.mtime, info.mode = len(member.data), now, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(member.data))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def listing(path: str, members: Sequence[Member]) -> str:
    from tabulate import tabulate

    rows = [(m.name, len(m.data), m.what) for m in members]
    return f"{path} contains:\n" + tabulate(rows, headers=["member", "bytes", "what"])


def default_name() -> str:
    return "synprobe-report-" + datetime.datetime.now(UTC).strftime(
        "%Y%m%dT%H%M%SZ") + ".tar.gz"


@click.command("report", epilog=EPILOG)
@click.option("--out", "out", metavar="FILE", help="Archive to write [default: "
              "./synprobe-report-<UTC time>.tar.gz].")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def report(out: str | None, as_json: bool) -> None:
    """Bundle what a bug report needs into one .tar.gz, and list it.

    \b
    It holds the last nat-check result, the pcaps synprobe recorded (punch --pcap,
    nat-check --pcap) that still exist, the command lines that made them, and the
    versions of synprobe, Python, scapy and the kernel; nothing else from the
    machine. These are kept in $SYNPROBE_STATE_DIR, else $XDG_STATE_HOME/synprobe,
    else ~/.local/state/synprobe.
    """
    path = out or default_name()
    members = collect()
    try:
        write_archive(path, members)
    except OSError as exc:
        raise ToolError(ExitStatus.USAGE, f"cannot write {path}: "
                                          f"{exc.strerror or exc}") from None
    if as_json:
        manifest: dict[str, Any] = json.loads(members[-1].data)
        click.echo(json.dumps({"archive": path, **manifest}, indent=2))
        return
    click.echo(listing(path, members))
    if len(members) == 3:
        click.echo(f"(no nat-check result and no pcap recorded yet in {state.state_dir()})")
