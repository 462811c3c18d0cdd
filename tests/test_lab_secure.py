"""Codes, the PAKE and the sealed chat through the NAT lab (issue: peers prove who they are).

Each scenario runs real `synprobe punch` processes behind the lab's NATs: a code handed
out by the broker and typed on the other side; a wrong code; a stranger who registers
under the code's number (or the session) before the intended peer; a tcpdump at host A's
NAT checks what crossed it in clear.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from synprobe import lab as labmod
from synprobe.lab.harness import BROKER_IPS, BROKER_PORT, SYNPROBE
from tests import schemas
from tests.make_captures import tcpdump

BROKER = f"{BROKER_IPS[0]}:{BROKER_PORT}"
CODE_WAIT_S = 10.0
RUN_LIMIT_S = 30.0


class Peer:
    """One `synprobe punch --json` in a lab namespace, its stdin given at once."""

    def __init__(self, lab: labmod.Lab, node: str, args: list[str], message: str | None,
                 state: str) -> None:
        """``message``: the whole stdin; None: stdin stays open (nothing typed) until the
        run ends."""
        self.proc = lab.popen(node, [*SYNPROBE, "punch", "--broker", BROKER, "--json", "-v",
                                     *args],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env={**os.environ, "SYNPROBE_STATE_DIR": state})
        assert self.proc.stdin is not None
        if message is not None:
            self.proc.stdin.write(message.encode())
            self.proc.stdin.close()
        self.err_seen = b""
        self.rc: int | None = None
        self.out = self.err = ""

    def wait_code(self) -> str:
        """The code this side printed (it asked the broker for a new one)."""
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), False)
        end = time.monotonic() + CODE_WAIT_S
        while time.monotonic() < end:
            select.select([self.proc.stderr], [], [], 0.1)
            self.err_seen += self.proc.stderr.read() or b""
            m = re.search(rb"your code is (\S+)", self.err_seen)
            if m:
                return m.group(1).decode()
            if self.proc.poll() is not None:
                break
        raise AssertionError(f"no code printed: {self.err_seen!r}")

    def finish(self) -> Peer:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), True)
        try:
            self.rc = self.proc.wait(RUN_LIMIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.rc = self.proc.wait(5)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.out = self.proc.stdout.read().decode(errors="replace")
        self.err = (self.err_seen + self.proc.stderr.read()).decode(errors="replace")
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self

    @property
    def report(self) -> dict[str, object]:
        value = schemas.loads("punch", self.out.split("\n", 1)[0])
        assert isinstance(value, dict)
        return value

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()[1:]

    def __str__(self) -> str:
        return f"rc={self.rc}\nstdout={self.out!r}\nstderr={self.err!r}"


@pytest.fixture
def state() -> object:
    with tempfile.TemporaryDirectory(prefix="synprobe-lab-state-") as path:
        yield path


def _kill(*peers: Peer) -> None:
    for p in peers:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(5)


@pytest.mark.lab
@pytest.mark.parametrize("plain", [False, True], ids=["code", "plain-control"])
def test_code_pair_chats_and_the_nat_sees_no_message(make_lab, state: str, plain: bool,
                                                     tmp_path: Path) -> None:
    lab = make_lab("home", "home")
    labmod.start_broker(lab)
    secret_a, secret_b = "MARKER-alpha-7f3a9c from A", "MARKER-bravo-41d0e2 from B"
    pcap = tmp_path / "ga-wan.pcap"
    with tcpdump(lab, "ga-wan", pcap):
        if plain:
            a = Peer(lab, "ha", ["--session", "pl", "--plain"], secret_a + "\n", state)
            time.sleep(0.3)
            b = Peer(lab, "hb", ["--session", "pl", "--plain"], secret_b + "\n", state)
        else:
            a = Peer(lab, "ha", [], secret_a + "\n", state)
            code = a.wait_code()
            assert re.fullmatch(r"\d+-[a-z]+-[a-z]+", code), code
            b = Peer(lab, "hb", ["--code", code], secret_b + "\n", state)
        try:
            a.finish(), b.finish()
        finally:
            _kill(a, b)
        time.sleep(0.3)  # the last segments reach the capture
    diag = f"A {a}\nB {b}"
    assert (a.rc, b.rc) == (0, 0), diag
    assert a.lines == [secret_b] and b.lines == [secret_a], diag
    raw = pcap.read_bytes()
    assert raw.count(b"\x00SSYN1 HELLO") >= 1, "the capture did not see the session's packets"
    if plain:  # the control: the same check sees a plain chat
        assert secret_a.encode() in raw and secret_b.encode() in raw
        assert a.report["security"] == b.report["security"] and \
            a.report["security"]["mode"] == "plain", diag  # type: ignore[index]
        assert "NOT encrypted (--plain)" in a.err, diag
        return
    assert secret_a.encode() not in raw and secret_b.encode() not in raw, \
        "a message crossed the NAT in clear"
    assert b"MARKER" not in raw
    assert b"\x00SSYN1 PAKE " in raw  # the PAKE messages are the only clear text after HELLO
    for run in (a, b):
        sec = run.report["security"]
        assert sec["mode"] == "code" and sec["authenticated"] is True, diag  # type: ignore[index]
        assert sec["encrypted"] is True and sec["cipher"] == "ChaCha20-Poly1305"  # type: ignore[index]
        assert run.report["nameplate"] == code.split("-")[0]
        assert code.split("-", 1)[1] not in run.out  # the words are never in the JSON
    assert a.report["security"]["verifier"] == b.report["security"]["verifier"]  # type: ignore[index]
    assert f"verification string {a.report['security']['verifier']}" in a.err  # type: ignore[index]


@pytest.mark.lab
def test_wrong_code_fails_on_both_sides_and_sends_nothing(make_lab, state: str) -> None:
    lab = make_lab("home", "home")
    labmod.start_broker(lab)
    a = Peer(lab, "ha", [], "from A: must not arrive\n", state)
    try:
        number = a.wait_code().split("-")[0]
        b = Peer(lab, "hb", ["--code", f"{number}-apple-adroitness"],
                 "from B: must not arrive\n", state)
        a.finish(), b.finish()
    finally:
        _kill(a)
    diag = f"A {a}\nB {b}"
    for run in (a, b):
        assert run.rc == 11, diag
        assert run.lines == [], diag
        assert "authentication failed: the peer does not know our code" in run.err, diag
        assert run.report["exit_code"] == 11 and run.report["error"].startswith(  # type: ignore[union-attr]
            "authentication failed"), diag
        assert run.report["security"]["authenticated"] is False  # type: ignore[index]
        assert "Traceback" not in run.err, diag


@pytest.mark.lab
@pytest.mark.parametrize("kind", ["code", "secret"])
def test_a_stranger_who_takes_the_session_first_reads_and_injects_nothing(
        make_lab, state: str, kind: str) -> None:
    """C (a stranger behind B's NAT) registers under A's code number (or A's session name)
    before B does. C and A are paired, the PAKE fails: neither sees the other's line, both
    exit 11. B, who comes with the right code afterwards, finds nobody (exit 4): the code
    was used up by the one wrong guess, and A was told to start again."""
    lab = make_lab("home", "home")
    labmod.start_broker(lab)
    injected = "INJECTED by the stranger"
    if kind == "code":
        a = Peer(lab, "ha", ["--timeout", "10"], "A's private line\n", state)
        code = a.wait_code()
        number = code.split("-")[0]
        c_args = ["--code", f"{number}-apple-adroitness", "--timeout", "6"]
        b_args = ["--code", code, "--timeout", "3"]
    else:
        c_args = ["--session", "demo", "--secret", "guess", "--timeout", "6"]
        b_args = ["--session", "demo", "--secret", "tulip garden", "--timeout", "3"]
    try:
        if kind == "code":
            c = Peer(lab, "hb", c_args, injected + "\n", state)
        else:
            c = Peer(lab, "hb", c_args, injected + "\n", state)
            time.sleep(0.5)  # the stranger waits first under the session
            a = Peer(lab, "ha", ["--session", "demo", "--secret", "tulip garden",
                                 "--timeout", "10"], "A's private line\n", state)
        a.finish(), c.finish()
        b = Peer(lab, "hb", b_args, "B's line\n", state).finish()
    finally:
        _kill(a, c)
    diag = f"A {a}\nC {c}\nB {b}"
    assert (a.rc, c.rc) == (11, 11), diag
    assert injected not in a.out and a.lines == [], diag
    assert "private" not in c.out and c.lines == [], diag
    assert "authentication failed" in a.err and "Traceback" not in a.err + c.err, diag
    assert b.rc == 4, diag  # nobody waits under the code any more: start again


@pytest.mark.lab
def test_a_bit_flipped_on_the_path_stops_the_chat_as_tampered(make_lab, state: str) -> None:
    """A man in the middle on A's link (the lab's element, between A's NAT and the router)
    flips one bit of A's long line in flight and writes the TCP checksum that fits: the
    kernel at B takes the segment, the record's tag does not. B prints nothing of it,
    sends a sealed ALERT, resets the connection and exits 12; A reads the ALERT ahead of
    the reset and exits 12 too, saying why. (B's stdin stays open: B sends nothing else.)"""
    lab = make_lab("home", "home", links=labmod.LinkDelays(tamper_a=600))
    labmod.start_broker(lab)
    long_line = "L" * 1000  # one record of ~1 kB: the only TCP payload of 600 bytes or more
    auth = ["--session", "mitm", "--secret", "tulip garden", "--timeout", "15"]
    a = Peer(lab, "ha", auth, long_line + "\n", state)
    b = Peer(lab, "hb", auth, None, state)
    try:
        a.finish()
        b.finish()
    finally:
        _kill(a, b)
    diag = f"A {a}\nB {b}"
    assert lab.tampered() == 1, diag
    assert b.rc == 12 and b.lines == [], diag  # the altered line is never printed
    assert "record 1 fails its authentication tag (altered): not the peer's stream, " \
        "tampered with on the way" in b.err, diag
    # A learns it from B's sealed ALERT, read before B's reset: not "connection lost"
    assert a.rc == 12, diag
    assert "the peer found our stream tampered with on the way (record 1 fails its " \
        "authentication tag (altered))" in a.err, diag
    assert "Traceback" not in a.err + b.err, diag
