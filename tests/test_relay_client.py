"""The punch's side of the relay verbs (client.relay_connect, relay_status, PEER relay=),
against a scripted broker on loopback."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from simulsyn_core._internal.client import relay_connect, relay_status
from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.exitcodes import ExitStatus, ToolError

TOKEN = "0123456789abcdef0123456789abcdef"


class Scripted:
    """A listener on loopback that reads one line per connection and answers ``reply``."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.lines: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(5)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.listener.getsockname()[1])

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            self.lines.append(data)
            conn.sendall(self.reply)
            time.sleep(0.2)

    def close(self) -> None:
        self.thread.join(5)
        self.listener.close()


def test_relayed_returns_the_connection_and_the_bytes_after_the_line() -> None:
    broker = Scripted(b"SSYN1 RELAYED\n\x05hello")
    try:
        sock, leftover = relay_connect(broker.endpoint, TOKEN, time.monotonic() + 5)
        sock.close()
    finally:
        broker.close()
    assert broker.lines == [f"SSYN1 RELAY token={TOKEN}\n".encode()]
    assert leftover == b"\x05hello"


@pytest.mark.parametrize("reply, status, said", [
    (b"SSYN1 ERROR code=unknown-token message=no_such_token\n", ExitStatus.PUNCH_FAILED,
     "unknown-token: no such token"),
    (b"SSYN1 ERROR code=relay-full\n", ExitStatus.PUNCH_FAILED, "relay-full"),
    (b"SSYN1 PEER x=1\n", ExitStatus.BROKER_UNREACHABLE, "unexpected PEER"),
    (b"", ExitStatus.BROKER_UNREACHABLE, "closed the connection before RELAYED"),
])
def test_a_refusal_is_a_clear_error(reply: bytes, status: ExitStatus, said: str) -> None:
    broker = Scripted(reply)
    try:
        with pytest.raises(ToolError) as caught:
            relay_connect(broker.endpoint, TOKEN, time.monotonic() + 5)
    finally:
        broker.close()
    assert caught.value.status == status and said in caught.value.message


def test_relay_status_says_why() -> None:
    broker = Scripted(b"SSYN1 RELAY_ENDED reason=budget message=over_its_budget_of_1000_bytes\n")
    try:
        text = relay_status(broker.endpoint, TOKEN)
    finally:
        broker.close()
    assert broker.lines == [f"SSYN1 RELAY_STATUS token={TOKEN}\n".encode()]
    assert text == "the relay ended the session: budget: over its budget of 1000 bytes"


def test_relay_status_without_a_broker_is_said_too() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    assert "cannot be asked why" in relay_status(Endpoint("127.0.0.1", port), TOKEN)


def test_a_chat_over_its_relay_budget_ends_with_the_brokers_reason() -> None:
    """Two `synprobe punch --relay only` on loopback, a broker whose relay allows 20 kB
    per session: the side that sends 200 kB is cut, both exit 9 (peer-lost) and say the
    broker's reason; the broker serves a new pair afterwards."""
    import subprocess

    from tests.helpers import SYNPROBE, loopback_broker

    with loopback_broker("--relay", "--relay-bytes", "20000") as (broker, port):
        def args(session: str) -> list[str]:
            return [*SYNPROBE, "punch", "--broker", f"127.0.0.1:{port}", "--session", session,
                    "--relay", "only", "-v", "--timeout", "15"]

        procs = [subprocess.Popen(args("cut"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(2)]
        big = b"".join(b"%05d " % i + b"x" * 94 + b"\n" for i in range(2000))
        results = []
        for proc, data in zip(procs, (big, b"hi\n"), strict=True):
            try:
                out, err = proc.communicate(data, timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            results.append((proc.returncode, out.decode(), err.decode()))
        for rc, _, err in results:
            assert rc == 9, results
            assert "the relay ended the session: budget" in err and "20000 bytes" in err, err
        # A new pair is served as before.
        again = [subprocess.Popen([*args("again"), "--no-chat"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]
        for proc in again:
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            assert proc.returncode == 0
