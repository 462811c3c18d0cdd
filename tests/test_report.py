"""synprobe report: the archive holds exactly what it lists, and nothing else."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import tarfile
from pathlib import Path

import pytest

from synprobe import state
from synprobe.cli import main
from tests import schemas

from .test_capture import _tshark

CAPTURES = Path(__file__).resolve().parent.parent / "captures"


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "state"
    monkeypatch.setenv("SYNPROBE_STATE_DIR", str(directory))
    return directory


def _listed(out: str) -> list[str]:
    """Member names from the printed table (after the header and the dashes)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    return [line.split()[0] for line in lines[start:] if line and not line.startswith("(")]


def test_report_holds_what_it_lists_and_nothing_else(
        tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    natcheck = {"mapping": "endpoint-independent", "filtering": "address-and-port-dependent"}
    state.save_last_natcheck(natcheck, ["synprobe", "nat-check", "--server", "192.0.2.10"])
    kept = tmp_path / "run.pcap"
    shutil.copyfile(CAPTURES / "syn-dropped.pcap", kept)
    gone = tmp_path / "gone.pcap"
    gone.write_bytes(b"x")
    state.record_pcap(gone, ["synprobe", "punch", "--pcap", str(gone)])
    state.record_pcap(kept, ["synprobe", "punch", "--session", "s1", "--pcap", str(kept)])
    gone.unlink()  # recorded, then removed: not part of the report
    with (state_dir / state.PCAP_INDEX_FILE).open("a") as index:
        index.write("{damaged line\n")
    archive = tmp_path / "r.tar.gz"

    assert main(["report", "--out", str(archive)]) == 0
    out = capsys.readouterr().out
    expected = ["versions.json", "natcheck-last.json", "pcaps/1-run.pcap", "commands.txt",
                "manifest.json"]
    assert out.startswith(f"{archive} contains:")
    assert _listed(out) == expected
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == expected
        assert all(m.isfile() and m.uid == 0 and m.uname == "" and m.gname == ""
                   for m in members)
        data = {m.name: tar.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    manifest = schemas.loads("report", data["manifest.json"])
    assert [m["name"] for m in manifest["members"]] == expected[:-1]
    for member in manifest["members"]:
        assert hashlib.sha256(data[member["name"]]).hexdigest() == member["sha256"]
        assert len(data[member["name"]]) == member["bytes"]
    assert json.loads(data["natcheck-last.json"]) == natcheck
    assert data["pcaps/1-run.pcap"] == kept.read_bytes()
    commands = data["commands.txt"].decode().splitlines()
    assert len(commands) == 2
    assert commands[0].endswith("synprobe nat-check --server 192.0.2.10  # -> natcheck-last.json")
    assert commands[1].endswith(f"synprobe punch --session s1 --pcap {kept}  # -> pcaps/1-run.pcap")
    assert set(json.loads(data["versions.json"])) == {"synprobe", "python", "scapy", "kernel",
                                                      "machine"}
    host = socket.gethostname()
    text = b"".join(v for k, v in data.items() if not k.startswith("pcaps/"))
    assert len(host) < 4 or host.encode() not in text
    # The pcap in the report opens in tshark like the original.
    extracted = tmp_path / "from-report.pcap"
    extracted.write_bytes(data["pcaps/1-run.pcap"])
    assert len(_tshark(extracted).stdout.splitlines()) > 0


def test_report_with_nothing_recorded(tmp_path: Path, state_dir: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / "empty.tar.gz"
    assert main(["report", "--out", str(archive), "--json"]) == 0
    doc = schemas.loads("report", capsys.readouterr().out)
    assert doc["archive"] == str(archive)
    assert [m["name"] for m in doc["members"]] == ["versions.json", "commands.txt"]
    with tarfile.open(archive) as tar:
        assert tar.getnames() == ["versions.json", "commands.txt", "manifest.json"]


def test_report_to_an_unwritable_place(tmp_path: Path, state_dir: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "missing" / "r.tar.gz"
    assert main(["report", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"synprobe: cannot write {target}: ") and err.count("\n") == 1
    assert not list(tmp_path.glob("missing*"))


def test_state_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SYNPROBE_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert state.state_dir() == tmp_path / "synprobe"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert state.state_dir() == tmp_path / "home" / ".local" / "state" / "synprobe"


def test_pcap_index_keeps_the_newest(state_dir: Path, tmp_path: Path) -> None:
    for n in range(state.MAX_RECORDED_PCAPS + 5):
        path = tmp_path / f"{n}.pcap"
        path.write_bytes(b"")
        state.record_pcap(path, ["synprobe", "punch"])
    names = [Path(p.path).name for p in state.recorded_pcaps()]
    assert names == [f"{n}.pcap" for n in range(5, state.MAX_RECORDED_PCAPS + 5)]
