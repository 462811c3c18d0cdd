"""End-to-end protection of a session: a PAKE over the punched connection, then sealed
records (the wire format is in docs/protocol.md, "End-to-end protection").

1. Each side sends one frame in the path check's framing (a length byte):
   ``\\x00SSYN1 PAKE `` + its SPAKE2 message (the symmetric variant, Ed25519, identity
   ``simulsyn-v1``: the ``spake2`` package magic-wormhole uses), keyed by the code (or the
   session's secret). The broker never sees the code's words.
2. Both derive the same key K only if both used the same code. From K, HKDF-SHA256 gives
   one key per direction (bound to the sender's own PAKE message, so the two directions
   never share a key and a record cannot be reflected back), and a short verification
   string both people can compare.
3. From then on every byte is a record: ``length:u16 | seq:u64 | ciphertext``, the
   ciphertext ChaCha20-Poly1305 of ``type:u8 | payload`` with the nonce ``0:u32 | seq``
   and the 10-byte header as associated data. ``seq`` counts from 0 in each direction, so
   no nonce is ever used twice under a key. The first record is CONFIRM: a peer with
   another code cannot open it (authentication failed, nothing else was sent). The last is
   END: a stream that stops without it was cut (truncated).

A record out of sequence is reported as replayed (an old seq) or reordered (a later one:
one was dropped or moved); one that fails its tag as altered. Each closes the connection
with an RST, after an ALERT record that tells the peer what was found (``tell_peer``), so
that both sides report the tampering (the peer reads the ALERT ahead of the reset).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

PAKE_ID = b"simulsyn-v1"
PAKE_PREFIX = b"\x00SSYN1 PAKE "  # a NUL first, like the path check's HELLO and ACK
HEADER = struct.Struct("!HQ")  # length of what follows the length field, seq
TAG_LEN = 16
RECORD_MAX = 16384  # payload bytes per record; longer chat lines are cut into several
CONFIRM, DATA, END = 0, 1, 2
# A relayed session numbers its messages, so that they can move to a direct connection
# (moving.py): NUMBERED is ``number:u64 | text``, MOVE ``next number:u64`` (the sender's
# messages from that number on come over the direct connection).
NUMBERED, MOVE = 3, 4
# The last record a side sends before it resets a connection whose records it found
# tampered with: ``what it found`` (UTF-8), so that the sender of the altered stream says
# "tampered" too, not "connection lost". Sealed, so nobody on the path can forge one.
ALERT = 5
ALERT_MAX = 512  # bytes of its text
NUMBER = struct.Struct("!Q")
KINDS = frozenset({CONFIRM, DATA, END, NUMBERED, MOVE, ALERT})
CONFIRM_TEXT = b"simulsyn e2e v1"
CIPHER = "ChaCha20-Poly1305"
PAKE = "SPAKE2 (Ed25519, symmetric)"


class AuthFailed(Exception):
    """The peer did not prove it knows the code."""


class Tampered(Exception):
    """A record that cannot be the peer's, in its place: ``kind`` is replayed, reordered,
    altered or truncated."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    def describe(self) -> str:
        """For "connection closed: ..."."""
        if self.kind == "reported":
            return (f"the peer found our stream tampered with on the way ({self.message}) "
                    "and reset the connection")
        return f"{self.message} ({self.kind}): not the peer's stream, tampered with on the way"


def _hkdf(key: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869), no salt, from ``cryptography``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


def _aead(key: bytes):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return ChaCha20Poly1305(key)


@dataclass
class Channel:
    """The sealing and opening state of one protected connection."""

    key: bytes  # the PAKE's shared key
    mine: bytes  # our PAKE message
    theirs: bytes  # the peer's
    send_seq: int = 0
    recv_seq: int = 0
    ended: bool = False  # the peer's END came
    buffer: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self._seal = _aead(_hkdf(self.key, b"simulsyn-v1 record " + self.mine))
        self._open = _aead(_hkdf(self.key, b"simulsyn-v1 record " + self.theirs))

    @property
    def verifier(self) -> str:
        """What both people see if both hold the same key (compare it aloud)."""
        raw = _hkdf(self.key, b"simulsyn-v1 verifier", 4).hex()
        return f"{raw[:4]}-{raw[4:]}"

    def seal(self, kind: int, payload: bytes = b"") -> bytes:
        if len(payload) > RECORD_MAX:
            raise ValueError(f"record payload of {len(payload)} bytes")
        header = HEADER.pack(8 + 1 + len(payload) + TAG_LEN, self.send_seq)
        nonce = b"\x00" * 4 + header[2:]
        sealed = self._seal.encrypt(nonce, bytes([kind]) + payload, header)
        self.send_seq += 1
        return header + sealed

    def alert(self, exc: Tampered) -> bytes:
        """The ALERT record that tells the peer what we found (see ALERT)."""
        text = f"{exc.message} ({exc.kind})".encode()[:ALERT_MAX]
        return self.seal(ALERT, text)

    def seal_text(self, text: str) -> bytes:
        """A chat message as DATA records, cut on character boundaries."""
        return b"".join(self.seal(DATA, chunk) for chunk in cut_text(text, RECORD_MAX))

    def seal_numbered(self, first: int, text: str) -> tuple[bytes, int]:
        """A chat message as NUMBERED records (one number each, from ``first``): the
        records and how many."""
        chunks = cut_text(text, RECORD_MAX - NUMBER.size)
        return b"".join(self.seal(NUMBERED, NUMBER.pack(first + i) + chunk)
                        for i, chunk in enumerate(chunks)), len(chunks)

    def seal_numbered_bytes(self, first: int, data: bytes) -> tuple[bytes, int]:
        """A stream's bytes as NUMBERED records (one number each, from ``first``; the
        library's moving Connection): the records and how many."""
        step = RECORD_MAX - NUMBER.size
        chunks = [data[i:i + step] for i in range(0, len(data), step)]
        return b"".join(self.seal(NUMBERED, NUMBER.pack(first + i) + chunk)
                        for i, chunk in enumerate(chunks)), len(chunks)

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """The records in ``data`` (buffered across calls), opened: (type, payload).
        Raises Tampered."""
        self.buffer += data
        while len(self.buffer) >= 2:
            (length,) = struct.unpack_from("!H", self.buffer)
            if length < 8 + 1 + TAG_LEN:
                raise Tampered("altered", f"a record of {length} bytes, shorter than any")
            if len(self.buffer) < 2 + length:
                return
            header = bytes(self.buffer[: HEADER.size])
            sealed = bytes(self.buffer[HEADER.size : 2 + length])
            del self.buffer[: 2 + length]
            seq = HEADER.unpack(header)[1]
            if seq < self.recv_seq:
                raise Tampered("replayed", f"record {seq} again (record {self.recv_seq} was due)")
            if seq > self.recv_seq:
                raise Tampered("reordered", f"record {seq} came when record {self.recv_seq} "
                               "was due (one was dropped or moved)")
            from cryptography.exceptions import InvalidTag

            try:
                plain = self._open.decrypt(b"\x00" * 4 + header[2:], sealed, header)
            except InvalidTag:
                raise Tampered("altered", f"record {seq} fails its authentication tag") \
                    from None
            self.recv_seq += 1
            kind, payload = plain[0], plain[1:]
            if self.ended and kind != ALERT:  # after its END, the peer may only alert
                raise Tampered("altered", f"record {seq} after the peer's end")
            if kind == END:
                self.ended = True
            elif kind == ALERT:
                raise Tampered("reported", payload[:ALERT_MAX].decode(errors="replace"))
            elif kind not in KINDS or (kind in (NUMBERED, MOVE) and len(payload) < 8):
                raise Tampered("altered", f"record {seq} of unknown type or size ({kind})")
            yield kind, payload

    def check_end(self) -> None:
        """The peer closed its side: raises Tampered unless its END came first."""
        if not self.ended:
            raise Tampered("truncated", "the peer's stream stopped without its end record "
                           "(cut off on the way, or the peer was killed)")

    @property
    def pending(self) -> int:
        return len(self.buffer)


def cut_text(text: str, size: int) -> list[bytes]:
    """``text`` in UTF-8, cut into pieces of at most ``size`` bytes on character
    boundaries (one empty piece for an empty text)."""
    data = text.encode("utf-8")
    pieces = []
    start = 0
    while True:
        end = min(start + size, len(data))
        while end < len(data) and end > start and (data[end] & 0xC0) == 0x80:
            end -= 1
        pieces.append(data[start:end])
        start = end
        if start >= len(data):
            return pieces


class Handshake:
    """The PAKE and the key confirmation, fed bytes as they come (no socket here: the
    caller sends ``outgoing()`` and feeds what it receives)."""

    def __init__(self, password: bytes) -> None:
        from spake2 import SPAKE2_Symmetric  # 40 ms to import: only when used

        self._pake = SPAKE2_Symmetric(password, idSymmetric=PAKE_ID)
        self.mine = self._pake.start()
        self.channel: Channel | None = None
        self.confirmed = False
        self._buffer = bytearray()

    def opening(self) -> bytes:
        payload = PAKE_PREFIX + self.mine
        return bytes([len(payload)]) + payload

    def feed(self, data: bytes) -> bytes:
        """Take received bytes; return what to send (our CONFIRM, once the key is known).
        Send it before ``check()``: a peer with another code must get our CONFIRM to
        find out, even when we already found out from its. Raises AuthFailed."""
        self._buffer += data
        if self.channel is not None or not self._buffer or \
                len(self._buffer) < 1 + self._buffer[0]:
            return b""
        n = self._buffer[0]
        frame = bytes(self._buffer[1 : 1 + n])
        del self._buffer[: 1 + n]
        if not frame.startswith(PAKE_PREFIX):
            raise AuthFailed("the peer does not encrypt (it runs with --plain, or is an "
                             "older synprobe): nothing sent")
        try:
            key = self._pake.finish(frame[len(PAKE_PREFIX):])
        except Exception as exc:  # the spake2 package's own errors (bad point, reflection)
            raise AuthFailed(f"the peer's PAKE message is invalid ({exc.__class__.__name__})"
                             ) from None
        self.channel = Channel(key, self.mine, frame[len(PAKE_PREFIX):])
        return self.channel.seal(CONFIRM, CONFIRM_TEXT)

    def check(self) -> None:
        """Open the peer's first record once it is whole: ``confirmed`` if it is the
        peer's CONFIRM under the key we derived. Raises AuthFailed."""
        if self.channel is None or self.confirmed or not self._buffer:
            return
        try:
            records = self.channel.feed(bytes(self._buffer))
            self._buffer.clear()
            first = next(records, None)
        except Tampered:
            raise AuthFailed("the peer does not know our code (a wrong code, or someone "
                             "else took the session at the broker)") from None
        if first is None:
            return
        if first != (CONFIRM, CONFIRM_TEXT):
            raise AuthFailed("the peer's first record is not its confirmation")
        self.confirmed = True
        self._rest = records

    def leftover(self) -> list[tuple[int, bytes]]:
        """Records that came with the peer's CONFIRM (opened), then the channel's buffer
        holds the rest."""
        rest = getattr(self, "_rest", None)
        return list(rest) if rest is not None else []


def tell_peer(sock: socket.socket, channel: Channel | None, exc: Exception,
              pending: bytes = b"") -> None:
    """Before a reset for tampering: send (without waiting) whatever of ours is
    ``pending``, then the ALERT that says what we found, so that the peer reads it before
    the reset. Nothing for a peer's own alert, or with no channel."""
    if channel is None or not isinstance(exc, Tampered) or exc.kind == "reported":
        return
    with contextlib.suppress(OSError):
        sock.send(pending + channel.alert(exc), socket.MSG_DONTWAIT)
