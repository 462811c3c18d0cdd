"""Shared fixtures. Lab tests need root: as root they are required (a missing tool is a
failure with a clear message, never a skip); as an ordinary user they are skipped, unless
SYNPROBE_REQUIRE_LAB=1 (CI sets it): then a run without root fails instead of skipping.

A lab that a test leaves behind (a namespace, or a process still running in one of its
namespaces) fails that test: teardown checks it, and the session's last sweep fails the
run if it still finds one of this run's labs."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from synprobe import lab as labmod
from tests import schemas

LAB_TOOLS = ("ip", "ss", "sysctl", "iptables-restore", "nft", "tcpdump", "tshark", "ethtool")
REQUIRE_LAB_ENV = "SYNPROBE_REQUIRE_LAB"
_counter = itertools.count()


def lab_required() -> bool:
    return os.environ.get(REQUIRE_LAB_ENV) == "1"


def require_lab() -> None:
    if os.geteuid() != 0:
        if lab_required():
            pytest.fail(f"lab tests required ({REQUIRE_LAB_ENV}=1) but not running as root: "
                        "the NAT lab needs root (network namespaces, iptables)", pytrace=False)
        pytest.skip("the NAT lab needs root (network namespaces, iptables)")
    missing = [t for t in LAB_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"the NAT lab needs {', '.join(missing)}: install them (README: "
                    "'Running the tests' installs everything)", pytrace=False)


def netns_inode(ns: str) -> int | None:
    """The inode of a named network namespace (what /proc/PID/ns/net of its processes
    points to), or None if it is gone."""
    try:
        return os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return None


def processes_in(inodes: set[int]) -> list[str]:
    """'PID command' of every process whose network namespace is one of ``inodes``: a
    process outlives `ip netns del`, so a deleted namespace can still hold one."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino not in inodes:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        found.append(f"{entry} {cmd}")
    return found


def lab_inodes(namespaces: list[str]) -> set[int]:
    return {ino for ns in namespaces if (ino := netns_inode(ns)) is not None}


def leftovers(namespaces: list[str], inodes: set[int]) -> list[str]:
    """What is left of a lab after it was taken down: its namespaces, its processes.

    A deleted namespace's inode number can be given to a namespace made since (another
    lab's): an inode that a named namespace has now is not this lab's any more. (One that
    a process of this lab still holds cannot be reused: the process keeps it alive.)"""
    existing = set(labmod.lab_namespaces())
    left = [f"namespace {ns}" for ns in namespaces if ns in existing]
    try:
        named_now = {os.stat(f"/run/netns/{n}").st_ino for n in os.listdir("/run/netns")}
    except OSError:
        named_now = set()
    gone = {ino for ino in inodes if ino not in named_now}
    # Another lab's `ip netns add` runs in the namespace it is making (its mount under
    # /run/netns comes a moment later): when that namespace got one of our inode numbers,
    # it is not ours.
    ours = {f"ip netns add {ns}" for ns in namespaces}
    return left + [f"process {p}" for p in processes_in(gone)
                   if not (" ip netns add " in f" {p.split(' ', 1)[-1]}"
                           and p.split(" ", 1)[-1] not in ours)]


def take_down_and_check(lab: labmod.Lab) -> list[str]:
    """lab.down(), then what it left behind (empty when nothing): an error of down()
    counts as a leak too, and is never swallowed."""
    inodes = lab_inodes(lab.namespaces)
    problems = []
    try:
        lab.down()
    except Exception as exc:  # reported below with what it left
        problems.append(f"lab.down() failed: {exc!r}")
    return problems + leftovers(lab.namespaces, inodes)


@pytest.fixture(autouse=True)
def _state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """What synprobe records (last nat-check, pcaps) goes to a temporary directory of
    each test, never to the user's own state, and no test sees another's: a punch reads
    the last nat-check (the lab's public addresses are the same in every lab)."""
    old = os.environ.get("SYNPROBE_STATE_DIR")
    os.environ["SYNPROBE_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SYNPROBE_STATE_DIR", None)
        else:
            os.environ["SYNPROBE_STATE_DIR"] = old


@pytest.fixture(autouse=True)
def _punch_reports_match_their_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every punch --json object a lab test reads through PeerRun.report is checked against
    docs/schema/punch.schema.json."""
    unchecked = labmod.PeerRun.report

    def checked(run: labmod.PeerRun) -> dict[str, object] | None:
        value = unchecked.fget(run)  # type: ignore[attr-defined]
        return None if value is None else schemas.check("punch", value)

    monkeypatch.setattr(labmod.PeerRun, "report", property(checked))


@pytest.fixture
def make_lab() -> Iterator[Callable[..., labmod.Lab]]:
    """make_lab(profile_a, profile_b[, links]) -> a Lab that is up; taken down after the test, and
    the test fails if anything of it (namespace or process) is left."""
    require_lab()
    labs: list[labmod.Lab] = []

    def factory(profile_a: str = "home", profile_b: str = "home",
                links: labmod.LinkDelays | None = None,
                v6: tuple[str, str] | None = None) -> labmod.Lab:
        lab = labmod.Lab(profile_a, profile_b, lab_id=f"t{os.getpid() % 100000}x{next(_counter)}",
                         links=links or labmod.LinkDelays(), v6=v6)
        labs.append(lab)
        lab.up()
        return lab

    yield factory
    problems = [p for lab in labs for p in take_down_and_check(lab)]
    if problems:
        pytest.fail("the lab was not removed cleanly:\n  " + "\n  ".join(problems),
                    pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A lab of this run still there at the end is a leak: it is removed, and the run
    fails, naming it (a test that crashed mid-teardown must not pass silently)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        return
    prefix = f"t{os.getpid() % 100000}x"
    names = [n for n in labmod.lab_namespaces() if n.startswith(f"{labmod.PREFIX}-{prefix}")]
    if not names:
        return
    labmod.sweep(prefix, id_prefix=True)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"lab leak: {len(names)} namespace(s) of this run were left: {' '.join(names)}"
    if reporter is not None:
        reporter.write_line(message, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
