"""Send a file to whoever holds the code, through NATs (simulsyn_core's public API only).

    python examples/send_file.py send --broker HOST:PORT FILE
        prints a code; give it to the receiver
    python examples/send_file.py receive --broker HOST:PORT --code CODE [--out DIR]

The sender sends one header line (JSON: name, size, sha256), then the file; the receiver
writes it to DIR, checks its SHA-256 and answers ``ok`` or ``bad``. A progress bar goes
to stderr. ``--aio``: the same over ``simulsyn_core.aio.connect`` (asyncio streams).
Exit status: 0 when the file arrived intact, 1 when its checksum differs, else the
exception's ``exit_code`` (the same as ``synprobe punch``'s).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import simulsyn_core
from simulsyn_core import aio

CHUNK = 256 * 1024
HEADER_MAX = 4096


class Progress:
    """A progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.started = self.drawn = time.monotonic()

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.drawn >= 0.1 or self.done >= self.total:
            self.drawn = now
            share = self.done / self.total if self.total else 1.0
            rate = self.done / max(now - self.started, 1e-6) / 1e6
            bar = "#" * int(share * 30)
            print(f"\r{self.label} [{bar:<30}] {share:6.1%} {rate:7.1f} MB/s", end="",
                  file=sys.stderr, flush=True)

    def finish(self) -> None:
        print(file=sys.stderr)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def header_for(path: Path) -> bytes:
    return json.dumps({"name": path.name, "size": path.stat().st_size,
                       "sha256": sha256_of(path)}).encode() + b"\n"


def parse_header(line: bytes) -> tuple[str, int, str]:
    head: dict[str, Any] = json.loads(line)
    name = Path(str(head["name"])).name  # never a path the sender chose
    if not name or name in (".", ".."):
        raise ValueError("the sender gave no usable file name")
    return name, int(head["size"]), str(head["sha256"])


def tell_code(code: str) -> None:
    print(f"code: {code}", flush=True)
    print(f"on the other machine: python examples/send_file.py receive --broker ... "
          f"--code {code}", file=sys.stderr, flush=True)


def send(broker: str, path: Path, timeout: float) -> int:
    with simulsyn_core.connect(broker, on_code=tell_code, timeout=timeout) as conn:
        print(f"connected ({conn.path}) to {conn.peer}, verification {conn.verifier}",
              file=sys.stderr)
        conn.sendall(header_for(path))
        progress = Progress("sending", path.stat().st_size)
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                conn.sendall(chunk)
                progress.add(len(chunk))
        progress.finish()
        conn.shutdown_write()
        verdict = b""
        while chunk := conn.recv():
            verdict += chunk
    print(f"receiver says: {verdict.decode(errors='replace').strip()}", file=sys.stderr)
    return 0 if verdict.strip() == b"ok" else 1


def receive(broker: str, code: str, out: Path, timeout: float) -> int:
    with simulsyn_core.connect(broker, code=code, timeout=timeout) as conn:
        print(f"connected ({conn.path}) to {conn.peer}, verification {conn.verifier}",
              file=sys.stderr)
        buffered = b""
        while b"\n" not in buffered:
            chunk = conn.recv()
            if not chunk or len(buffered) > HEADER_MAX:
                raise SystemExit("the sender sent no header")
            buffered += chunk
        line, rest = buffered.split(b"\n", 1)
        name, size, expected = parse_header(line)
        target = out / name
        digest, progress = hashlib.sha256(), Progress("receiving", size)
        with target.open("wb") as f:
            chunk = rest
            while True:
                f.write(chunk)
                digest.update(chunk)
                progress.add(len(chunk))
                if not (chunk := conn.recv(CHUNK)):
                    break
        progress.finish()
        good = digest.hexdigest() == expected and progress.done == size
        conn.sendall(b"ok\n" if good else b"bad\n")
    print(f"{target}: {progress.done} bytes, sha256 "
          f"{'matches' if good else 'DIFFERS'}", file=sys.stderr)
    return 0 if good else 1


async def send_aio(broker: str, path: Path, timeout: float) -> int:
    reader, writer, report = await aio.connect(broker, on_code=tell_code, timeout=timeout)
    print(f"connected ({report.path}) to {report.peer}", file=sys.stderr)
    try:
        writer.write(header_for(path))
        progress = Progress("sending", path.stat().st_size)
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                writer.write(chunk)
                await writer.drain()
                progress.add(len(chunk))
        progress.finish()
        writer.write_eof()
        verdict = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()  # in the bridge: delivered before the program ends
    print(f"receiver says: {verdict.decode(errors='replace').strip()}", file=sys.stderr)
    return 0 if verdict.strip() == b"ok" else 1


async def receive_aio(broker: str, code: str, out: Path, timeout: float) -> int:
    reader, writer, report = await aio.connect(broker, code=code, timeout=timeout)
    print(f"connected ({report.path}) to {report.peer}", file=sys.stderr)
    try:
        name, size, expected = parse_header(await reader.readuntil(b"\n"))
        target = out / name
        digest, progress = hashlib.sha256(), Progress("receiving", size)
        with target.open("wb") as f:
            while chunk := await reader.read(CHUNK):
                f.write(chunk)
                digest.update(chunk)
                progress.add(len(chunk))
        progress.finish()
        good = digest.hexdigest() == expected and progress.done == size
        writer.write(b"ok\n" if good else b"bad\n")
        writer.write_eof()
        await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()  # in the bridge: delivered before the program ends
    print(f"{target}: {progress.done} bytes, sha256 "
          f"{'matches' if good else 'DIFFERS'}", file=sys.stderr)
    return 0 if good else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aio", action="store_true", help="use simulsyn_core.aio")
    parser.add_argument("--timeout", type=float, default=30.0)
    commands = parser.add_subparsers(dest="command", required=True)
    sender = commands.add_parser("send")
    sender.add_argument("--broker", required=True)
    sender.add_argument("file", type=Path)
    receiver = commands.add_parser("receive")
    receiver.add_argument("--broker", required=True)
    receiver.add_argument("--code", required=True)
    receiver.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    try:
        if args.command == "send":
            if args.aio:
                return asyncio.run(send_aio(args.broker, args.file, args.timeout))
            return send(args.broker, args.file, args.timeout)
        if args.aio:
            return asyncio.run(receive_aio(args.broker, args.code, args.out, args.timeout))
        return receive(args.broker, args.code, args.out, args.timeout)
    except simulsyn_core.SimulsynError as exc:
        print(f"send_file: {exc}", file=sys.stderr)
        return int(exc.exit_code)


if __name__ == "__main__":
    sys.exit(main())
