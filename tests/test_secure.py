"""The PAKE, the sealed records, the codes, and the broker's code numbers (no lab)."""

from __future__ import annotations

import io
import os
import socket
import threading

import pytest

from simulsyn_core._internal import codes
from simulsyn_core._internal.chat import SealedCodec, chat, secure
from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.exitcodes import ExitStatus
from simulsyn_core._internal.rendezvous import SessionTable
from simulsyn_core._internal.secure import (
    ALERT,
    CONFIRM,
    DATA,
    END,
    HEADER,
    RECORD_MAX,
    AuthFailed,
    Channel,
    Handshake,
    Tampered,
)
from simulsyn_core._internal.wire import encode_chat, parse_line


def pair(password_a: bytes, password_b: bytes, timeout_s: float = 5.0
         ) -> tuple[object, object]:
    """Run secure() on both ends of a socketpair at once: each side's result or exception."""
    sa, sb = socket.socketpair()
    out: dict[str, object] = {}

    def side(name: str, sock: socket.socket, password: bytes) -> None:
        try:
            out[name] = secure(sock, password, b"", timeout_s)
        except (AuthFailed, Tampered) as exc:
            out[name] = exc

    threads = [threading.Thread(target=side, args=("a", sa, password_a)),
               threading.Thread(target=side, args=("b", sb, password_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    sa.close()
    sb.close()
    return out["a"], out["b"]


def test_the_same_code_gives_one_key_and_one_verifier() -> None:
    a, b = pair(b"7-guitarist-revenge", b"7-guitarist-revenge")
    assert isinstance(a, tuple) and isinstance(b, tuple)
    ca, cb = a[0], b[0]
    assert ca.verifier == cb.verifier and len(ca.verifier) == 9
    # each direction its own key: what A seals, B opens; A cannot open its own
    record = ca.seal(DATA, b"hi")
    assert list(cb.feed(record)) == [(DATA, b"hi")]
    with pytest.raises(Tampered):
        list(Channel(ca.key, ca.mine, ca.theirs, recv_seq=1).feed(record))


def test_a_wrong_code_fails_on_both_sides() -> None:
    a, b = pair(b"7-guitarist-revenge", b"7-apple-adroitness")
    for result in (a, b):
        assert isinstance(result, AuthFailed)
        assert "does not know our code" in str(result)


def test_a_plain_peer_is_told_apart() -> None:
    sa, sb = socket.socketpair()
    sb.sendall(encode_chat("hello in clear"))
    with pytest.raises(AuthFailed, match="does not encrypt"):
        secure(sa, b"x", b"", 2.0)
    sa.close()
    sb.close()


def test_a_silent_peer_fails_in_bounded_time() -> None:
    sa, sb = socket.socketpair()
    with pytest.raises(AuthFailed, match="within"):
        secure(sa, b"x", b"", 0.3)
    sa.close()
    sb.close()


def test_a_reflected_pake_message_fails() -> None:
    hs = Handshake(b"x")
    with pytest.raises(AuthFailed):
        hs.feed(hs.opening())  # our own message back


def test_both_sides_learn_of_a_wrong_code_whatever_the_arrival_order() -> None:
    """The peer's CONFIRM may come in the same segment as its PAKE message: ours is
    still handed out to be sent before we say that the codes differ."""
    a, b = Handshake(b"1-apple-adroitness"), Handshake(b"1-acme-aggregate")
    b_confirm = b.feed(a.opening())
    a_confirm = a.feed(b.opening() + b_confirm)
    assert a_confirm  # to be sent before check() raises
    with pytest.raises(AuthFailed):
        a.check()
    with pytest.raises(AuthFailed):
        b.feed(a_confirm)
        b.check()


def channels() -> tuple[Channel, Channel]:
    key = os.urandom(32)
    mine, theirs = b"A" * 33, b"B" * 33
    return Channel(key, mine, theirs), Channel(key, theirs, mine)


def test_nonces_never_repeat_and_records_open_in_order() -> None:
    a, b = channels()
    records = [a.seal(DATA, f"m{i}".encode()) for i in range(1000)]
    seqs = [HEADER.unpack(r[: HEADER.size])[1] for r in records]
    assert seqs == list(range(1000))
    assert [p for _, p in b.feed(b"".join(records))] == [f"m{i}".encode() for i in range(1000)]


@pytest.mark.parametrize("attack, kind", [
    ("flip", "altered"), ("replay", "replayed"), ("swap", "reordered"), ("drop", "reordered"),
    ("short", "altered"), ("after-end", "altered"),
])
def test_each_attack_is_named(attack: str, kind: str) -> None:
    a, b = channels()
    if attack == "after-end":
        r0, end, r1 = a.seal(DATA, b"one"), a.seal(END), a.seal(DATA, b"two")
        with pytest.raises(Tampered) as err:
            list(b.feed(r0 + end + r1))
        assert err.value.kind == kind
        return
    r0, r1, r2 = (a.seal(DATA, b"one"), a.seal(DATA, b"two"), a.seal(DATA, b"three"))
    stream = {
        "flip": r0 + r1[:12] + bytes([r1[12] ^ 1]) + r1[13:],
        "replay": r0 + r1 + r1,
        "swap": r0 + r2 + r1,
        "drop": r0 + r2,
        "short": r0 + b"\x00\x05" + b"x" * 5,
    }[attack]
    with pytest.raises(Tampered) as err:
        list(b.feed(stream))
    assert err.value.kind == kind


def test_a_stream_cut_before_its_end_is_truncated() -> None:
    a, b = channels()
    list(b.feed(a.seal(DATA, b"x")))
    with pytest.raises(Tampered, match="truncated"):
        b.check_end()
    list(b.feed(a.seal(END)))
    b.check_end()


def test_long_messages_are_cut_on_character_boundaries() -> None:
    a, b = channels()
    text = "é" * RECORD_MAX  # 2 bytes each
    parts = [p for _, p in b.feed(a.seal_text(text))]
    assert len(parts) == 2 and "".join(p.decode() for p in parts) == text


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback (the chat sets TCP options)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        server, _ = srv.accept()
    return server, client


def run_chat(stream: bytes, channel: Channel) -> tuple[ExitStatus, str]:
    """The receiving chat of ``channel`` given ``stream`` from the peer (then FIN)."""
    sa, sb = tcp_pair()
    r, w = os.pipe()
    os.close(w)  # our stdin: empty
    sb.sendall(stream)
    sb.shutdown(socket.SHUT_WR)
    out = io.StringIO()
    events: list[str] = []
    status = chat(sa, r, out, events.append, codec=SealedCodec(channel))
    os.close(r)
    sb.close()
    return status, out.getvalue() + "".join(f"[{e}]" for e in events)


def test_chat_prints_good_records_and_stops_at_a_tampered_one() -> None:
    a, b = channels()
    r0, r1 = a.seal(DATA, b"first"), a.seal(DATA, b"second")
    status, seen = run_chat(r0 + r1 + r1, b)
    assert status == ExitStatus.TAMPERED
    assert seen.startswith("first\nsecond\n") and "replayed" in seen


def test_chat_reports_truncation_and_accepts_a_proper_end() -> None:
    a, b = channels()
    status, seen = run_chat(a.seal(DATA, b"only"), b)
    assert status == ExitStatus.TAMPERED and "truncated" in seen
    a, b = channels()
    status, seen = run_chat(a.seal(DATA, b"only") + a.seal(END), b)
    assert status == ExitStatus.OK and seen.startswith("only\n")


def test_an_alert_is_the_peers_word_even_after_its_end_and_cannot_be_forged() -> None:
    a, b = channels()
    list(b.feed(a.seal(DATA, b"x") + a.seal(END)))
    with pytest.raises(Tampered, match="reported: record 3 fails") as caught:
        list(b.feed(a.alert(Tampered("altered", "record 3 fails its authentication tag"))))
    assert caught.value.describe().startswith("the peer found our stream tampered with")
    a, b = channels()
    list(b.feed(a.seal(END)))
    with pytest.raises(Tampered, match="altered: record 1 after the peer's end"):
        list(b.feed(a.seal(DATA, b"late")))  # only an ALERT may follow the END
    a, b = channels()
    forged = bytearray(a.seal(ALERT, b"made up"))
    forged[-1] ^= 1
    with pytest.raises(Tampered, match="altered: record 0 fails"):
        list(b.feed(bytes(forged)))


def test_both_chats_say_tampered_when_one_finds_an_altered_record() -> None:
    """B finds an altered record: it prints none of it, sends its ALERT, resets. A, whose
    send fails on that reset, reads the ALERT queued ahead of it: TAMPERED too, with why."""
    a, b = channels()
    sa, sb = tcp_pair()
    ra, wa = os.pipe()
    rb, wb = os.pipe()  # B's stdin stays open: B sends nothing but its ALERT
    results: dict[str, tuple[ExitStatus, list[str]]] = {}

    def run(name: str, sock: socket.socket, fd: int, channel: Channel) -> None:
        events: list[str] = []
        results[name] = chat(sock, fd, io.StringIO(), events.append,
                             codec=SealedCodec(channel)), events

    tb = threading.Thread(target=run, args=("b", sb, rb, b))
    tb.start()
    good = a.seal_text("fine")
    bad = bytearray(a.seal_text("changed on the way"))
    bad[-1] ^= 1
    sa.sendall(good + bytes(bad))  # what the path delivered to B
    tb.join(10)
    # A's chat starts with records still to send after B's reset: its send fails
    os.write(wa, b"more\n" * 4000)  # within a pipe's 64 KiB: the write does not wait
    os.close(wa)
    ta = threading.Thread(target=run, args=("a", sa, ra, a))
    ta.start()
    ta.join(10)
    for fd in (ra, rb, wb):
        os.close(fd)
    sa.close()
    sb.close()
    status_b, events_b = results["b"]
    status_a, events_a = results["a"]
    assert status_b == ExitStatus.TAMPERED, events_b
    assert any("record 1 fails its authentication tag (altered)" in e for e in events_b)
    assert status_a == ExitStatus.TAMPERED, events_a
    assert any(e.startswith("connection closed: the peer found our stream tampered with")
               for e in events_a), events_a


def test_confirm_is_not_a_chat_message() -> None:
    a, b = channels()
    assert list(b.feed(a.seal(CONFIRM, b"simulsyn e2e v1"))) == [(CONFIRM, b"simulsyn e2e v1")]


# --- codes --------------------------------------------------------------------------------

def test_codes_round_trip_and_refuse_what_cannot_be_one() -> None:
    words = codes.make_words()
    assert codes.parse_code(codes.make_code("7", words)) == ("7", words)
    assert codes.parse_code(" 12-Guitarist-Revenge ") == ("12", "guitarist-revenge")
    for bad in ("guitarist-revenge", "0-apple-adroitness", "7", "7-", "٣-apple-adroitness",
                "7-apple adroitness", "1234567-apple-adroitness"):
        with pytest.raises(codes.CodeError):
            codes.parse_code(bad)
    with pytest.raises(codes.CodeError, match="typo"):
        codes.parse_code("7-aple-adroitness")


def test_the_broker_hands_out_the_smallest_free_number_and_never_one_twice() -> None:
    table = SessionTable()
    ep = [Endpoint(f"198.51.100.{i}", 1000 + i) for i in range(5)]
    first = table.new_nameplate()
    assert first == "#1"
    reply = table.register(1, first, ep[0], None, 0.0)[0]
    assert parse_line(reply.data.strip()).fields["nameplate"] == "1"
    second = table.new_nameplate()
    assert second == "#2"
    table.register(2, second, ep[1], None, 0.0)
    # the peer of code 1 comes: paired, PEER names the number; 1 is free again
    replies = table.register(3, "#1", ep[2], None, 0.0)
    assert {parse_line(r.data.strip()).verb for r in replies} == {"PEER"}
    assert all(parse_line(r.data.strip()).fields["nameplate"] == "1" for r in replies)
    assert table.new_nameplate() == "#1"
    # a session named "1" and the code number 1 never meet
    assert parse_line(table.register(4, "1", ep[3], None, 0.0)[0].data.strip()).verb == \
        "REGISTERED"


def test_a_broker_hands_out_numbers_and_pairs_by_them() -> None:
    """Over a real broker on loopback: two new codes get 1 and 2; the peer of number 1
    is paired with its first side only; a bad number is refused."""
    from tests.helpers import loopback_broker, read_line

    def connect(port: int) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        return s

    with loopback_broker() as (_, port):
        a, b, c, d = (connect(port) for _ in range(4))
        try:
            a.sendall(b"SSYN1 REGISTER nameplate=new\n")
            assert parse_line(read_line(a).strip()).fields["nameplate"] == "1"
            b.sendall(b"SSYN1 REGISTER nameplate=new\n")
            assert parse_line(read_line(b).strip()).fields["nameplate"] == "2"
            c.sendall(b"SSYN1 REGISTER nameplate=1\n")
            for s in (a, c):
                msg = parse_line(read_line(s).strip())
                assert msg.verb == "PEER" and msg.fields["nameplate"] == "1"
            d.sendall(b"SSYN1 REGISTER nameplate=01\n")
            msg = parse_line(read_line(d).strip())
            assert msg.verb == "ERROR" and msg.fields["code"] == "bad-request"
        finally:
            for s in (a, b, c, d):
                s.close()


def test_a_confirmation_whose_last_byte_comes_alone_is_still_checked() -> None:
    a, b = Handshake(b"1-apple-adroitness"), Handshake(b"1-apple-adroitness")
    b_confirm = b.feed(a.opening())
    a.feed(b.opening())
    a.feed(b_confirm[:-1])
    a.check()
    assert not a.confirmed
    a.feed(b_confirm[-1:])
    a.check()
    assert a.confirmed


def test_a_session_name_cannot_reach_a_code_number() -> None:
    from tests.helpers import loopback_broker, read_line

    with loopback_broker() as (_, port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as a, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as b:
            a.sendall(b"SSYN1 REGISTER nameplate=new\n")
            assert parse_line(read_line(a).strip()).fields["nameplate"] == "1"
            b.sendall(b"SSYN1 REGISTER session=#1\n")
            msg = parse_line(read_line(b).strip())
            assert msg.verb == "ERROR" and msg.fields["code"] == "bad-session"


def test_an_altered_record_behind_the_confirmation_is_tampering_not_a_wrong_code() -> None:
    sa, sb = socket.socketpair()
    sb.settimeout(5)
    peer = Handshake(b"1-apple-adroitness")

    def peer_side() -> None:
        sb.sendall(peer.opening())
        ours = sb.recv(100)  # our PAKE frame
        confirm = peer.feed(ours)
        assert peer.channel is not None
        data = bytearray(peer.channel.seal(DATA, b"hello"))
        data[-1] ^= 1
        sb.sendall(confirm + bytes(data))

    thread = threading.Thread(target=peer_side)
    thread.start()
    try:
        with pytest.raises(Tampered, match="altered"):
            secure(sa, b"1-apple-adroitness", b"", 2.0)
        thread.join(5)
        # We told the peer: behind our CONFIRM (which its first read may or may not have
        # taken with our PAKE frame), our ALERT
        peer.feed(sb.recv(4096))
        peer.check()
        assert peer.confirmed
        with pytest.raises(Tampered, match="reported: record 1 fails"):
            peer.leftover()
    finally:
        thread.join(5)
        sa.close()
        sb.close()
