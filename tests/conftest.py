"""Shared fixtures. Lab tests need root: as root they are required (a missing tool is a
failure with a clear message, never a skip); as an ordinary user they are skipped."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from synprobe import lab as labmod

LAB_TOOLS = ("ip", "ss", "sysctl", "iptables-restore", "nft", "tcpdump", "tshark")
_counter = itertools.count()


def require_lab() -> None:
    if os.geteuid() != 0:
        pytest.skip("the NAT lab needs root (network namespaces, iptables)")
    missing = [t for t in LAB_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"the NAT lab needs {', '.join(missing)}: install them (README: "
                    "'Running the tests' installs everything)", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """What synprobe records for `synprobe report` (last nat-check, pcaps) goes to a
    temporary directory during the tests, never to the user's own state."""
    old = os.environ.get("SYNPROBE_STATE_DIR")
    os.environ["SYNPROBE_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SYNPROBE_STATE_DIR", None)
        else:
            os.environ["SYNPROBE_STATE_DIR"] = old


@pytest.fixture
def make_lab() -> Iterator[Callable[..., labmod.Lab]]:
    """make_lab(profile_a, profile_b) -> a Lab that is up; taken down after the test."""
    require_lab()
    labs: list[labmod.Lab] = []

    def factory(profile_a: str = "home", profile_b: str = "home") -> labmod.Lab:
        lab = labmod.Lab(profile_a, profile_b, lab_id=f"t{os.getpid() % 100000}x{next(_counter)}")
        labs.append(lab)
        lab.up()
        return lab

    try:
        yield factory
    finally:
        for lab in labs:
            with contextlib.suppress(Exception):
                lab.down()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Whatever a crashed test left behind of this run's labs goes too."""
    if os.geteuid() == 0 and shutil.which("ip"):
        with contextlib.suppress(Exception):
            labmod.sweep(f"t{os.getpid() % 100000}x", id_prefix=True)
