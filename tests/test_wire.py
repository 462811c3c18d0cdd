"""The codecs, without a network."""

from __future__ import annotations

import pytest

from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.wire import (
    Confirmation,
    FrameDecoder,
    LineDecoder,
    ProtocolError,
    decode_seed_list,
    encode_chat,
    encode_message,
    encode_seed_list,
    looks_like_rendezvous,
    parse_line,
)


def test_seed_list_round_trip_and_exact_bytes() -> None:
    entries = [Endpoint("198.51.100.2", 40000), Endpoint("203.0.113.2", 8086)]
    data = encode_seed_list(entries)
    assert data == bytes([2, 198, 51, 100, 2, 0x9C, 0x40, 203, 0, 113, 2, 0x1F, 0x96])
    assert decode_seed_list(data) == entries
    assert decode_seed_list(b"\x00") == []


@pytest.mark.parametrize("data, message", [
    (b"", "list answer is empty"),
    (b"\x01\x01\x02\x03\x04\x00", "list answer of 6 bytes, expected 7 for 1 entries"),
    (b"\x00\x00", "list answer of 2 bytes, expected 1 for 0 entries"),
])
def test_seed_list_rejects_bad_lengths(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_seed_list(data)


def test_chat_framing_matches_the_original() -> None:
    assert encode_chat("hi") == b"\x02hi"
    assert encode_chat("") == b"\x00"
    assert list(FrameDecoder().feed(b"\x02hi\x00\x03abc")) == [b"hi", b"", b"abc"]


def test_long_lines_split_on_character_boundaries() -> None:
    text = "é" * 300  # 600 bytes of two-byte characters
    data = encode_chat(text)
    frames = list(FrameDecoder().feed(data))
    assert all(len(f) <= 255 for f in frames)
    assert [len(f) for f in frames] == [254, 254, 92]  # never half a character
    assert "".join(f.decode("utf-8") for f in frames) == text


def test_frame_decoder_buffers_partial_frames() -> None:
    dec = FrameDecoder()
    assert list(dec.feed(b"\x05hel")) == []
    assert dec.pending == 4
    assert list(dec.feed(b"lo\x01")) == [b"hello"]
    assert list(dec.feed(b"!")) == [b"!"]


def test_rendezvous_lines_round_trip() -> None:
    line = encode_message("PEER", session="s1", public=Endpoint("198.51.100.2", 1),
                          peer=Endpoint("203.0.113.2", 2), peer_local=None, role="first")
    assert line == b"SSYN1 PEER session=s1 public=198.51.100.2:1 peer=203.0.113.2:2 role=first\n"
    (msg,) = list(LineDecoder().feed(line))
    assert msg.verb == "PEER"
    assert msg.endpoint("peer") == Endpoint("203.0.113.2", 2)
    assert msg.get("peer_local") is None


@pytest.mark.parametrize("line, message", [
    (b"HELLO", "line does not start with 'SSYN1'"),
    (b"SSYN1 register x", "bad verb 'register'"),
    (b"SSYN1 REGISTER session", "bad field 'session'"),
    (b"SSYN1 REGISTER a=1 a=2", "field 'a' repeated"),
    (b"SSYN1 REGISTER s=\xff", "line is not ASCII"),
])
def test_parse_line_errors_are_exact(line: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_line(line)


def test_line_decoder_bounds_line_length() -> None:
    dec = LineDecoder()
    with pytest.raises(ProtocolError, match="longer than 512"):
        list(dec.feed(b"SSYN1 " + b"x" * 600))


def test_protocol_sniffing() -> None:
    assert looks_like_rendezvous(b"SSY")
    assert looks_like_rendezvous(b"SSYN1 REGISTER")
    assert not looks_like_rendezvous(b"")
    assert not looks_like_rendezvous(b"GET / HTTP/1.1")


@pytest.mark.parametrize("text, expected", [
    ("1.2.3.4:80", Endpoint("1.2.3.4", 80)),
    (" 10.0.0.1:65535 ", Endpoint("10.0.0.1", 65535)),
])
def test_endpoint_parse(text: str, expected: Endpoint) -> None:
    assert Endpoint.parse(text) == expected


@pytest.mark.parametrize("text, message", [
    ("1.2.3.4", "expected IP:PORT"),
    ("1.2.3:80", "is not an IP address"),
    ("1.2.3.4:x", "is not a number"),
    ("1.2.3.4:0", "out of range"),
    ("1.2.3.4:70000", "out of range"),
])
def test_endpoint_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Endpoint.parse(text)


def test_confirmation_needs_the_peers_hello_and_the_ack_of_ours() -> None:
    a, b = Confirmation(), Confirmation()
    to_b, to_a = a.opening(), b.opening()
    reply_from_b = b.feed(to_b)  # B gets A's HELLO: answers ACK
    assert reply_from_b == b"\x0a\x00SSYN1 ACK" and not b.done
    reply_from_a = a.feed(to_a + reply_from_b + b"\x02hi")  # HELLO, ACK, then chat
    assert a.done and a.leftover == b"\x02hi"
    assert b.feed(reply_from_a) == b"" and b.done


def test_confirmation_without_the_ack_is_not_done() -> None:
    a = Confirmation()
    assert a.feed(Confirmation.opening()) == b"\x0a\x00SSYN1 ACK"
    assert not a.done  # our HELLO may have died on the way: no proof yet


def test_confirmation_rejects_chat_before_confirming() -> None:
    with pytest.raises(ProtocolError, match="instead of confirming the path"):
        Confirmation().feed(b"\x02hi")
