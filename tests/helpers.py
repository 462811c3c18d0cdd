"""Helpers shared by the tests: run synprobe, start a broker on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

SYNPROBE = [sys.executable, "-m", "synprobe"]
# Ports for tests that bind a given port: below Linux's ephemeral range (32768-60999), so
# that the thousands of connections other tests make in parallel (the broker's flood
# tests) are never given the port between our check and the bind.
_TEST_PORTS = (20000, 32000)


def free_port() -> int:
    """A loopback port that is free now, outside the ephemeral range (bounded tries)."""
    import random

    for _ in range(200):
        port = random.randrange(*_TEST_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free test port in 200 tries")


@contextlib.contextmanager
def loopback_broker(*extra: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A `synprobe broker` on 127.0.0.1 with a kernel-chosen port; stopped afterwards."""
    proc = subprocess.Popen([*SYNPROBE, "broker", "--bind", "127.0.0.1:0", *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = wait_for_stderr(proc, re.compile(r"listening on 127\.0\.0\.1:(\d+)"), 10)
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", seen)
        port = int(m.group(1)) if m else None
        assert port is not None, "broker did not start"
        yield proc, port
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[Any], kill: bool = False) -> None:
    """End a process we started (SIGTERM, or SIGKILL with ``kill``) and reap it; SIGKILL
    if it has not exited within 5 s."""
    if proc.poll() is None:
        if kill:
            proc.kill()
        else:
            proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_for_stderr(proc: subprocess.Popen[Any], wanted: str | re.Pattern[str],
                    timeout_s: float) -> str:
    """Read proc's stderr until ``wanted`` shows up, at most ``timeout_s``; returns what
    was read (the caller's communicate() gets the rest). Fails the test on the deadline or
    if stderr ends first: a bug must fail the run, never hang it."""
    assert proc.stderr is not None
    return wait_for_output(proc.stderr, wanted, timeout_s)


def wait_for_output(stream: Any, wanted: str | re.Pattern[str], timeout_s: float) -> str:
    """wait_for_stderr for any pipe of a process (read from its file descriptor, never
    through the buffered file, so a later communicate() misses nothing)."""
    fd = stream.fileno()
    end = time.monotonic() + timeout_s
    data = b""

    def found() -> bool:
        text = data.decode(errors="replace")
        return (wanted in text) if isinstance(wanted, str) else bool(wanted.search(text))

    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not found():
            remaining = end - time.monotonic()
            assert remaining > 0, f"no {wanted!r} on stderr within {timeout_s:g} s: {data!r}"
            if sel.select(remaining):
                chunk = os.read(fd, 65536)
                assert chunk, f"stderr ended before {wanted!r}: {data!r}"
                data += chunk
    return data.decode(errors="replace")


def communicate_within(proc: subprocess.Popen[bytes], timeout_s: float
                       ) -> tuple[bytes, bytes]:
    """``proc``'s stdout and stderr once it ended; killed (and reaped) when it takes over
    ``timeout_s``."""
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=10)


def read_line(s: socket.socket) -> bytes:
    """One line from a socket with a timeout set (bytes up to and with the newline)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return data


class RedisServer:
    """A Debian `redis-server` on 127.0.0.1 (no persistence) that a test starts, stops
    and starts again on the same port; ``close`` stops it on every exit path."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "yes"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"redis-server exited with {self.proc.returncode}"
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise AssertionError(f"redis-server did not answer on {self.port} in {timeout_s:g} s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scapy_modules_after(statements: str) -> list[str]:
    """The scapy modules a fresh interpreter has loaded after running ``statements``."""
    code = (f"import json, sys; {statements}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'scapy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return [str(name) for name in json.loads(out)]
