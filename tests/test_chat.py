"""The chat on a real loopback TCP pair: big inputs both ways, files on stdin, half-close."""

from __future__ import annotations

import io
import os
import socket
import threading
from pathlib import Path

from simulsyn_core._internal.chat import chat
from simulsyn_core._internal.exitcodes import ExitStatus


def _run_pair(stdin_a: int, stdin_b: int) -> tuple[list[object], io.StringIO, io.StringIO]:
    a, b = _tcp_pair()
    outs = (io.StringIO(), io.StringIO())
    results: list[object] = [None, None]

    def run(i: int, sock: socket.socket, fd: int) -> None:
        results[i] = chat(sock, fd, outs[i], lambda _msg: None)

    threads = [threading.Thread(target=run, args=(0, a, stdin_a)),
               threading.Thread(target=run, args=(1, b, stdin_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "chat did not finish"
    a.close()
    b.close()
    return results, outs[0], outs[1]


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    srv.close()
    return a, b


def _lines(n: int, tag: str) -> str:
    return "".join(f"{tag} line {i:06d} " + "x" * 180 + "\n" for i in range(n))


def test_big_files_on_both_sides_cross_without_waiting_on_each_other(tmp_path: Path) -> None:
    # 20 MB each way from regular files (poll() takes them; nothing is cut at any size).
    fa, fb = tmp_path / "a.txt", tmp_path / "b.txt"
    fa.write_text(_lines(100_000, "A"))
    fb.write_text(_lines(100_000, "B"))
    with open(fa, "rb") as in_a, open(fb, "rb") as in_b:
        results, out_a, out_b = _run_pair(in_a.fileno(), in_b.fileno())
    assert results == [ExitStatus.OK, ExitStatus.OK]
    got_b, got_a = out_b.getvalue().splitlines(), out_a.getvalue().splitlines()
    assert len(got_b) == 100_000 and got_b[-1].startswith("A line 099999 ")
    assert len(got_a) == 100_000 and got_a[0].startswith("B line 000000 ")


def test_pipes_and_an_unfinished_last_line(tmp_path: Path) -> None:
    ra, wa = os.pipe()
    rb, wb = os.pipe()
    os.write(wa, "one\ntwo é\nno newline at the end".encode())
    os.close(wa)
    os.close(wb)  # B says nothing
    try:
        results, out_a, out_b = _run_pair(ra, rb)
    finally:
        os.close(ra)
        os.close(rb)
    assert results == [ExitStatus.OK, ExitStatus.OK]
    assert out_b.getvalue() == "one\ntwo é\nno newline at the end\n"
    assert out_a.getvalue() == ""
