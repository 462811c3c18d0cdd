"""Property-based fuzzing of both protocols (hypothesis, bounded: a few seconds each).

* the line protocol's codec: arbitrary bytes, in arbitrary chunks, never raise anything
  but ProtocolError; what encode_message writes parse_line reads back;
* the list protocol's codec: the same for decode_seed_list, and the round trip;
* the broker's handling: arbitrary and mutated lines against a broker on loopback (run
  in a thread of this process): every answer is a valid line with a documented code,
  no internal error, no loop error, every connection released, and a clean pair still
  pairs afterwards.

The longer run against a broker subprocess is bench/fuzz_broker.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.wire import (
    SEED_MAX_ENTRIES,
    LineDecoder,
    ProtocolError,
    decode_seed_list,
    encode_message,
    encode_seed_list,
    parse_line,
)

from .helpers import read_line

# Every ERROR code docs/protocol.md lists.
DOCUMENTED_CODES = {"bad-request", "bad-session", "busy", "timeout", "peer-gone",
                    "untraversable", "replaced", "rate-limited", "evicted",
                    "unknown-token", "relay-off", "relay-full", "relay-busy"}
BROKER_VERBS = {"REGISTERED", "PEER", "GO", "YOUARE", "ERROR", "RELAYED", "RELAY_ENDED"}

FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

keys = st.from_regex(r"[a-z_]{1,32}", fullmatch=True)
values = st.from_regex(r"[!-~]{0,40}", fullmatch=True)
verbs = st.sampled_from(["REGISTER", "WHOAMI", "PRIMED", "OBSERVE", "NC_HELLO", "PEER",
                         "GO", "X", "RELAY", "RELAY_STATUS"]) | st.from_regex(
    r"[A-Z][A-Z_]{0,15}", fullmatch=True)
field_names = st.sampled_from(["session", "local", "strategies", "mapping", "unsolicited",
                               "reply_syn", "sockets", "guesses", "port_range", "port_hot",
                               "close", "token"]) | keys
field_values = st.sampled_from(["s", "a" * 64, "a" * 65, "bad name", "127.0.0.1:1", "::1",
                                "1.2.3.4:99999", "prime,order,sync,birthday", "varies",
                                "same", "drop", "reject", "blocked", "pass", "0", "-1",
                                "1-65535", "65535-1", "1", "450", "99999999999",
                                "relay", "prime,relay", "0" * 32, "A" * 32]) | values


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    """A rendezvous line, valid or nearly so."""
    fields = draw(st.dictionaries(field_names, field_values, max_size=6))
    words = ["SSYN1", draw(verbs)] + [f"{k}={v}" for k, v in fields.items()]
    return (" ".join(words) + draw(st.sampled_from(["\n", "\r\n", "", "\n\n"]))).encode()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(b"".join(draw(st.lists(lines(), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.sampled_from([b"\n", b"\r", b"\x00", b" ", b"=", b"\xff",
                                                b"SSYN1 ", b"A" * 600]))
        else:
            data += data[at:at + 64] * draw(st.integers(1, 10))
    return bytes(data)


stream_inputs = st.binary(min_size=1, max_size=700) | lines() | mutated()


@FAST
@given(stream_inputs, st.lists(st.integers(1, 64), max_size=8))
def test_line_decoder_raises_only_protocol_error(data: bytes, cuts: list[int]) -> None:
    decoder = LineDecoder()
    pos = 0
    chunks = []
    for n in cuts:
        chunks.append(data[pos:pos + n])
        pos += n
    chunks.append(data[pos:])
    try:
        for chunk in chunks:
            for msg in decoder.feed(chunk):
                assert re.fullmatch(r"[A-Z][A-Z_]{0,15}", msg.verb)
    except ProtocolError:
        pass


@FAST
@given(st.binary(max_size=600))
def test_parse_line_raises_only_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_line(data)


@FAST
@given(verbs, st.dictionaries(keys, values, max_size=8))
def test_encoded_lines_parse_back(verb: str, fields: dict[str, str]) -> None:
    try:
        line = encode_message(verb, **fields)
    except ValueError:
        return  # longer than a line, or a text key's value: not encodable, said so
    msg = parse_line(line.rstrip(b"\n"))
    assert msg.verb == verb
    assert msg.fields == {k: (v.replace(" ", "_")[:160] if k in ("message", "why") else v)
                          for k, v in fields.items()}


@FAST
@given(st.binary(max_size=2000))
def test_seed_list_decoder_raises_only_protocol_error(data: bytes) -> None:
    try:
        entries = decode_seed_list(data)
    except ProtocolError:
        return
    assert encode_seed_list(entries) == data


@FAST
@given(st.lists(st.builds(Endpoint, st.ip_addresses(v=4).map(str), st.integers(0, 65535)),
                max_size=SEED_MAX_ENTRIES))
def test_seed_list_round_trip(entries: list[Endpoint]) -> None:
    assert decode_seed_list(encode_seed_list(entries)) == entries


# --- the broker --------------------------------------------------------------------------

class ThreadBroker:
    """A Broker on 127.0.0.1 in its own event loop thread; its log lines kept."""

    def __init__(self) -> None:
        from simulsyn_core._internal.broker import Broker
        from simulsyn_core._internal.relay import RelayLimits, RelayTable

        self.lines: list[str] = []
        self.broker = Broker([Endpoint("127.0.0.1", 0)], log=self.lines.append,
                             relay=RelayTable(RelayLimits(wait_s=1.0)))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.broker.start(), self.loop).result(10)
        self.port = self.broker.listening[0].port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.broker.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def thread_broker() -> Iterator[ThreadBroker]:
    tb = ThreadBroker()
    try:
        yield tb
    finally:
        tb.stop()


_sources = (f"127.{a}.{b}.{c}" for a, b, c in itertools.product(range(120, 128), range(256),
                                                                 range(1, 255)))


def _exchange(port: int, data: bytes, cuts: int) -> bytes:
    """Send ``data`` (in ``cuts`` + 1 pieces) from a fresh source address, half-close, and
    read everything the broker answers until it closes (bounded)."""
    src = next(_sources)
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=(src, 0)) as s:
        step = max(1, len(data) // (cuts + 1))
        try:
            for i in range(0, len(data), step):
                s.sendall(data[i:i + step])
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the broker closed already (an error after the first line)
        out = b""
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                chunk = s.recv(4096)
            except OSError:
                break  # reset: closed with our bytes unread
            if not chunk:
                break
            out += chunk
        return out


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=stream_inputs, cuts=st.integers(0, 3))
def test_broker_answers_any_input_with_valid_lines(thread_broker: ThreadBroker, data: bytes,
                                                   cuts: int) -> None:
    out = _exchange(thread_broker.port, data, cuts)
    if not data:  # silence, then EOF: an original client, it gets the list answer
        assert decode_seed_list(out)
        return
    assert out == b"" or out.endswith(b"\n"), out  # whole lines only
    for raw in out.split(b"\n")[:-1]:
        msg = parse_line(raw)  # every answer is a valid line
        assert msg.verb in BROKER_VERBS, raw
        if msg.verb == "ERROR":
            assert msg.get("code") in DOCUMENTED_CODES, raw


def test_broker_after_the_fuzz(thread_broker: ThreadBroker) -> None:
    """Runs after the fuzz above (same module broker): nothing broke, nothing leaked, and
    a clean pair still pairs."""
    tb = thread_broker
    end = time.monotonic() + 5
    while tb.broker._conns and time.monotonic() < end:
        time.sleep(0.05)
    assert not tb.broker._conns, f"{len(tb.broker._conns)} connections never released"
    assert not [line for line in tb.lines if "internal error" in line], tb.lines[-20:]
    assert tb.broker.stats["loop_errors"] == 0
    start = time.monotonic()
    a = socket.create_connection(("127.0.0.1", tb.port), timeout=5,
                                 source_address=("127.119.0.1", 0))
    b = socket.create_connection(("127.0.0.1", tb.port), timeout=5,
                                 source_address=("127.119.1.1", 0))
    with a, b:
        a.sendall(b"SSYN1 REGISTER session=after-fuzz\n")
        assert read_line(a).startswith(b"SSYN1 REGISTERED")
        b.sendall(b"SSYN1 REGISTER session=after-fuzz\n")
        assert read_line(b).startswith(b"SSYN1 PEER")
        assert read_line(a).startswith(b"SSYN1 PEER")
    print(f"\n[fuzz] pair after the fuzz: {time.monotonic() - start:.3f} s; "
          f"{len(tb.lines)} log lines; broker stats {tb.broker.stats}")
