"""Pure codecs for every byte the project puts on the wire (no sockets here).

Three formats:

* the original example's list answer: one byte N, then N entries of a 4-byte IPv4
  address and a 2-byte big-endian port (the caller's own entry last);
* the chat framing of the original: one length byte, then that many bytes of UTF-8;
* the project's rendezvous protocol: ASCII lines ``SSYN1 VERB key=value ...`` (see
  docs/protocol.md).

Decoders buffer a byte stream and yield whole messages; bad input raises
``ProtocolError`` with an exact message.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from .endpoint import Endpoint

DEFAULT_BROKER_PORT = 8086  # the original example's broker port


class ProtocolError(ValueError):
    """The remote side sent bytes that do not follow the protocol."""


# --- the original list protocol -------------------------------------------------------

SEED_ENTRY = struct.Struct("!4sH")
SEED_MAX_ENTRIES = 255


def encode_seed_list(entries: list[Endpoint]) -> bytes:
    if len(entries) > SEED_MAX_ENTRIES:
        raise ValueError(f"at most {SEED_MAX_ENTRIES} entries, got {len(entries)}")
    out = bytearray([len(entries)])
    for ep in entries:
        out += SEED_ENTRY.pack(ipaddress.IPv4Address(ep.ip).packed, ep.port)
    return bytes(out)


def seed_list_length(data: bytes) -> int | None:
    """Total length of the list answer that ``data`` starts with, or None if unknown yet."""
    if not data:
        return None
    return 1 + data[0] * SEED_ENTRY.size


def decode_seed_list(data: bytes) -> list[Endpoint]:
    """Decode one complete list answer. Raises ProtocolError if it is short or long."""
    need = seed_list_length(data)
    if need is None:
        raise ProtocolError("list answer is empty")
    if len(data) != need:
        raise ProtocolError(
            f"list answer of {len(data)} bytes, expected {need} for {data[0]} entries")
    entries = []
    for i in range(data[0]):
        raw_ip, port = SEED_ENTRY.unpack_from(data, 1 + i * SEED_ENTRY.size)
        entries.append(Endpoint(str(ipaddress.IPv4Address(raw_ip)), port))
    return entries


# --- chat framing ------------------------------------------------------------------------

FRAME_MAX = 255


def encode_chat(text: str) -> bytes:
    """Frame one message; text longer than 255 bytes is split on character boundaries."""
    data = text.encode("utf-8")
    if not data:
        return b"\x00"
    out = bytearray()
    start = 0
    while start < len(data):
        end = min(start + FRAME_MAX, len(data))
        # Never cut a UTF-8 sequence: back off over continuation bytes (0b10xxxxxx).
        while end < len(data) and end > start and (data[end] & 0xC0) == 0x80:
            end -= 1
        out.append(end - start)
        out += data[start:end]
        start = end
    return bytes(out)


@dataclass
class FrameDecoder:
    """Buffers a byte stream and yields the payload of each whole frame."""

    buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> Iterator[bytes]:
        self.buffer += data
        while self.buffer and len(self.buffer) >= 1 + self.buffer[0]:
            n = self.buffer[0]
            payload = bytes(self.buffer[1 : 1 + n])
            del self.buffer[: 1 + n]
            yield payload

    @property
    def pending(self) -> int:
        return len(self.buffer)


# --- the rendezvous protocol ---------------------------------------------------------------

MAGIC = "SSYN1"
LINE_MAX = 512
MESSAGE_MAX = 160  # an error message is cut to this (it may quote what the client sent)
SESSION_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
TEXT_KEYS = ("message", "why")  # free text: spaces travel as "_", cut to MESSAGE_MAX
_KEY_RE = re.compile(r"[a-z_]{1,32}")
_VALUE_RE = re.compile(r"[!-~]{0,200}")  # printable ASCII without spaces

_VERB_RE = re.compile(r"[A-Z][A-Z_]{0,15}")  # REGISTER, REGISTERED, PEER, ERROR, and services'


@dataclass(frozen=True)
class Message:
    verb: str
    fields: dict[str, str]

    def get(self, key: str) -> str | None:
        return self.fields.get(key)

    def require(self, key: str) -> str:
        value = self.fields.get(key)
        if value is None:
            raise ProtocolError(f"{self.verb} without {key}=")
        return value

    def endpoint(self, key: str) -> Endpoint:
        try:
            return Endpoint.parse(self.require(key))
        except ValueError as exc:
            raise ProtocolError(f"{self.verb} {key}=: {exc}") from None


def encode_message(verb: str, **fields: object) -> bytes:
    if not _VERB_RE.fullmatch(verb):
        raise ValueError(f"bad verb {verb!r}")
    parts = [MAGIC, verb]
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if key in TEXT_KEYS:
            text = text.replace(" ", "_")[:MESSAGE_MAX]
        if not _KEY_RE.fullmatch(key) or not _VALUE_RE.fullmatch(text):
            raise ValueError(f"cannot encode {key}={text!r}")
        parts.append(f"{key}={text}")
    line = " ".join(parts) + "\n"
    if len(line) > LINE_MAX:
        raise ValueError(f"message longer than {LINE_MAX} bytes")
    return line.encode("ascii")


def parse_line(line: bytes) -> Message:
    """Parse one line (without its newline)."""
    try:
        text = line.decode("ascii").rstrip("\r")
    except UnicodeDecodeError:
        raise ProtocolError("line is not ASCII") from None
    words = text.split(" ")
    if len(words) < 2 or words[0] != MAGIC:
        raise ProtocolError(f"line does not start with {MAGIC!r}")
    verb = words[1]
    if not _VERB_RE.fullmatch(verb):
        raise ProtocolError(f"bad verb {verb[:20]!r}")
    fields: dict[str, str] = {}
    for word in words[2:]:
        key, sep, value = word.partition("=")
        if not sep or not _KEY_RE.fullmatch(key) or not _VALUE_RE.fullmatch(value):
            raise ProtocolError(f"bad field {word[:40]!r}")
        if key in fields:
            raise ProtocolError(f"field {key!r} repeated")
        fields[key] = value
    return Message(verb, fields)


@dataclass
class LineDecoder:
    """Buffers a byte stream and yields parsed rendezvous messages."""

    buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> Iterator[Message]:
        self.buffer += data
        while True:
            nl = self.buffer.find(b"\n")
            if nl < 0:
                if len(self.buffer) > LINE_MAX:
                    raise ProtocolError(f"line longer than {LINE_MAX} bytes")
                return
            if nl + 1 > LINE_MAX:
                raise ProtocolError(f"line longer than {LINE_MAX} bytes")
            line = bytes(self.buffer[:nl])
            del self.buffer[: nl + 1]
            yield parse_line(line)


def looks_like_rendezvous(first_bytes: bytes) -> bool:
    """True if a stream's first bytes can be the start of a rendezvous line."""
    prefix = (MAGIC + " ").encode()
    n = min(len(first_bytes), len(prefix))
    return n > 0 and first_bytes[:n] == prefix[:n]


# --- path confirmation (both peers are synprobe: broker mode) ------------------------------

CONFIRM_HELLO = b"\x00SSYN1 HELLO"  # a NUL first: no chat line looks like it
CONFIRM_ACK = b"\x00SSYN1 ACK"


@dataclass
class Confirmation:
    """Proof that data passes both ways before a punch is called established.

    Each side sends HELLO and answers the peer's HELLO with ACK; a side is confirmed once
    it has the peer's HELLO and the ACK of its own. A connection that came up but whose
    data dies in one direction (a NAT whose conntrack entry stayed in SYN_SENT2 sends our
    packets out un-NATed) never confirms. Bytes after the ACK belong to the chat.
    """

    got_hello: bool = False
    got_ack: bool = False
    buffer: bytearray = field(default_factory=bytearray)

    @staticmethod
    def opening() -> bytes:
        return encode_frame(CONFIRM_HELLO)

    @property
    def done(self) -> bool:
        return self.got_hello and self.got_ack

    def feed(self, data: bytes) -> bytes:
        """Take received bytes; return the bytes to send back."""
        self.buffer += data
        reply = bytearray()
        while not self.done and self.buffer and len(self.buffer) >= 1 + self.buffer[0]:
            n = self.buffer[0]
            frame = bytes(self.buffer[1 : 1 + n])
            del self.buffer[: 1 + n]
            if frame == CONFIRM_HELLO and not self.got_hello:
                self.got_hello = True
                reply += encode_frame(CONFIRM_ACK)
            elif frame == CONFIRM_ACK and not self.got_ack:
                self.got_ack = True
            else:
                raise ProtocolError(f"peer sent {frame[:20]!r} instead of confirming the path")
        return bytes(reply)

    @property
    def leftover(self) -> bytes:
        return bytes(self.buffer)


def encode_frame(payload: bytes) -> bytes:
    if len(payload) > FRAME_MAX:
        raise ValueError(f"frame payload of {len(payload)} bytes")
    return bytes([len(payload)]) + payload
