"""Helpers shared by the tests: run synprobe, start a broker on loopback."""

from __future__ import annotations

import contextlib
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator

SYNPROBE = [sys.executable, "-m", "synprobe"]


@contextlib.contextmanager
def loopback_broker(*extra: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A `synprobe broker` on 127.0.0.1 with a kernel-chosen port; stopped afterwards."""
    proc = subprocess.Popen([*SYNPROBE, "broker", "--bind", "127.0.0.1:0", *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        port = None
        end = time.monotonic() + 10
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stderr, selectors.EVENT_READ)
            while port is None and time.monotonic() < end:
                if sel.select(end - time.monotonic()):
                    line = proc.stderr.readline()
                    if not line:
                        break
                    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
                    if m:
                        port = int(m.group(1))
        assert port is not None, "broker did not start"
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
