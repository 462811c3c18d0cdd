"""A broker and a client written to the original example's protocol, independently of
simulsyn_core (no imports from it), for the interop tests and the benchmark's baseline.

Protocol (shared/seed/NOTES.md): the broker answers a silent client at once with one
byte N and N entries of 4-byte IPv4 + 2-byte big-endian port, the caller's own entry
last (at most 255, none older than 60 s, no duplicate endpoint); the client binds one
local port with SO_REUSEADDR for every socket, asks the list until a peer shows up,
then calls connect() up to --retries times; chat messages are one length byte + UTF-8.

    python original_example.py broker --bind IP:PORT
    python original_example.py client --master IP:PORT [--local IP:PORT] [--retries N]
                                      [--message TEXT] [--poll S] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time


def serve(bind: str, max_connections: int) -> None:
    host, port = bind.rsplit(":", 1)
    entries: list[tuple[bytes, int, float]] = []
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, int(port)))
    srv.listen(64)
    for _ in range(max_connections):
        conn, (ip, cport) = srv.accept()
        now = time.time()
        raw = socket.inet_aton(ip)
        entries = [e for e in entries if now - e[2] <= 60 and (e[0], e[1]) != (raw, cport)]
        entries.append((raw, cport, now))
        entries = entries[-255:]
        conn.sendall(bytes([len(entries)]) + b"".join(struct.pack("!4sH", r, p)
                                                       for r, p, _ in entries))
        conn.close()


def _sock(local: tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(local)
    return s


def _ask(master: tuple[str, int], local: tuple[str, int]) -> list[tuple[str, int]]:
    s = _sock(local)
    s.settimeout(5)
    s.connect(master)
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    n = data[0]
    return [(socket.inet_ntoa(data[1 + 6 * i:5 + 6 * i]),
             struct.unpack("!H", data[5 + 6 * i:7 + 6 * i])[0]) for i in range(n)]


def client(master: tuple[str, int] | None, remote: tuple[str, int] | None,
           local: tuple[str, int], retries: int, message: str, poll_s: float,
           timeout_s: float) -> int:
    if local[1] == 0:
        probe = _sock(local)
        local = (local[0], probe.getsockname()[1])
        probe.close()
    deadline = time.monotonic() + timeout_s
    registered_wall = time.time()
    if remote is None:
        assert master is not None
        while True:
            entries = _ask(master, local)
            own = entries[-1]
            others = [e for e in entries[:-1] if e != own]
            if others:
                remote = others[-1]
                break
            if time.monotonic() > deadline:
                print(json.dumps({"established": False, "error": "no peer"}), flush=True)
                return 4
            time.sleep(poll_s)  # the first client has to ask again, as in the original
    known_wall = time.time()
    sock = None
    for _ in range(retries):
        s = _sock(local)
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            s.connect(remote)
            sock = s
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                break
    if sock is None:
        print(json.dumps({"established": False, "error": "connect failed"}), flush=True)
        return 5
    established_wall = time.time()
    print(json.dumps({"established": True, "peer": f"{remote[0]}:{remote[1]}",
                      "registered_at": registered_wall, "peer_known_at": known_wall,
                      "established_at": established_wall}), flush=True)
    data = message.encode()
    sock.sendall(bytes([len(data)]) + data)
    sock.settimeout(10)
    buf = b""
    while not buf or len(buf) < 1 + buf[0]:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    if buf and len(buf) >= 1 + buf[0]:
        print(buf[1:1 + buf[0]].decode("utf-8", errors="replace"), flush=True)
    sock.shutdown(socket.SHUT_WR)
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass
    sock.close()
    return 0


def _ep(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("broker")
    b.add_argument("--bind", default="0.0.0.0:8086")
    b.add_argument("--max-connections", type=int, default=10000)
    c = sub.add_parser("client")
    c.add_argument("--master", type=_ep)
    c.add_argument("--remote", type=_ep)
    c.add_argument("--local", type=_ep, default=("0.0.0.0", 0))
    c.add_argument("--retries", type=int, default=50)
    c.add_argument("--message", default="hello from the original client")
    c.add_argument("--poll", type=float, default=1.0)
    c.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()
    if args.cmd == "broker":
        serve(args.bind, args.max_connections)
        return 0
    return client(args.master, args.remote, args.local, args.retries, args.message,
                  args.poll, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
