"""nat-check's codec (natcheck/protocol.py): every message both ways, the one escaping
rule, the sequence tags, and the exact errors of bad input. No network."""

from __future__ import annotations

import pytest

from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.wire import LineDecoder, ProtocolError, parse_line
from synprobe.natcheck import protocol as P

PUBLIC = Endpoint("198.51.100.2", 40000)


@pytest.mark.parametrize("msg", [
    P.Observe(), P.Observed(PUBLIC), P.Hello(),
    P.ServerInfo(PUBLIC, ("192.0.2.10", "192.0.2.11"), 8086, True, "", P.PROBE_BUDGET),
    P.ServerInfo(PUBLIC, ("192.0.2.10",), 8086, False,
                 "the broker needs CAP_NET_RAW and CAP_NET_ADMIN (100% sure)", 15),
    P.Probe(40000, 40001, 250), P.Probe(40000, 40001), P.Armed(3),
    P.Reflect((6001, 6002, 6003)), P.Reflected(3), P.Timers((1.0, 2.0, 4.5)),
    P.TimersArmed(3), P.Done(), P.Result("rst", 7, (PUBLIC,)), P.Result(None, 0),
])
def test_every_message_comes_back_from_its_bytes(msg: P.NcMessage) -> None:
    data = bytes(msg)
    assert data.startswith(f"SSYN1 {msg.VERB}".encode()) and data.endswith(b"\n")
    (line,) = LineDecoder().feed(data)
    assert P.parse_message(line) == msg


def test_the_wire_form_is_the_documented_one() -> None:
    info = P.ServerInfo(PUBLIC, ("192.0.2.10", "192.0.2.11"), 8086, False,
                        "the broker needs CAP_NET_RAW", 15)
    assert bytes(info) == (b"SSYN1 NC_INFO public=198.51.100.2:40000 addrs=192.0.2.10,"
                           b"192.0.2.11 port=8086 raw=no "
                           b"raw_reason=the_broker_needs_CAP%5FNET%5FRAW budget=15\n")
    assert bytes(P.Probe(40000, 40001, 250)) == (
        b"SSYN1 NC_PROBE unsolicited=40000 filter=40001 window_ms=250\n")
    assert bytes(P.Timers((1.0, 2.0, 4.5))) == b"SSYN1 NC_TIMERS waits=1,2,4.5\n"
    assert bytes(P.Result(None, 0)) == b"SSYN1 NC_RESULT sent=0\n"


def test_one_escaping_rule_for_free_text() -> None:
    # a space is "_" as in the broker's own ERROR message=; "_" and "%" are kept whole
    assert P.escape_text("needs CAP_NET_RAW: 100%") == "needs_CAP%5FNET%5FRAW:_100%25"
    for text in ("", "a b", "CAP_NET_RAW", "%5F", "_ _%", "100% sure_"):
        assert P.unescape_text(P.escape_text(text)) == text
    # what the core's encode_message writes for message= (spaces only) reads back
    assert P.unescape_text("one_NC_PROBE_per_check") == "one NC PROBE per check"


def test_sequence_tags_do_not_overlap() -> None:
    used = {P.Seq.REPLY: 1, P.Seq.HOPS: 1 + P.MAX_REFLECT, P.Seq.TIMER: P.MAX_TIMERS,
            P.Seq.HAIRPIN: 1, P.Seq.UNSOLICITED: 1, P.Seq.FILTERING: 2,
            P.Seq.REPLY_ANSWER: 1, P.Seq.REFLECT: P.MAX_REFLECT,
            P.Seq.TIMER_ANSWER: P.MAX_TIMERS, P.Seq.FOLLOW: 1, P.Seq.ICMP_KEEP: 1,
            P.Seq.FOLLOWED: 1, P.Seq.ICMP_KEEP_ANSWER: 1}
    assert set(used) == set(P.Seq)
    ranges = sorted((int(tag), int(tag) + n) for tag, n in used.items())
    assert all(end <= start for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False))


@pytest.mark.parametrize(("line", "error"), [
    ("SSYN1 REGISTER session=x", "REGISTER is not a nat-check message"),
    ("SSYN1 OBSERVED", "OBSERVED without public="),
    ("SSYN1 OBSERVED public=1.2.3.4", "OBSERVED public=: '1.2.3.4': expected IP:PORT"),
    ("SSYN1 NC_INFO public=1.2.3.4:5 addrs=1.2.3.4 raw=yes", "NC_INFO without port="),
    ("SSYN1 NC_INFO public=1.2.3.4:5 addrs=, port=8086 raw=yes",
     "NC_INFO without an address in addrs="),
    ("SSYN1 NC_INFO public=1.2.3.4:5 addrs=1.2.3.4 port=8086 raw=maybe",
     "NC_INFO raw=: yes or no, not 'maybe'"),
    ("SSYN1 NC_INFO public=1.2.3.4:5 addrs=1.2.3.4 port=0 raw=yes", "bad port '0'"),
    ("SSYN1 NC_INFO public=1.2.3.4:5 addrs=1.2.3.4 port=8086 raw=yes budget=x",
     "NC_INFO budget=: bad number 'x'"),
    ("SSYN1 NC_PROBE filter=40001", "NC_PROBE without unsolicited="),
    ("SSYN1 NC_PROBE unsolicited=70000 filter=40001", "bad port '70000'"),
    ("SSYN1 NC_PROBE unsolicited=40000 filter=40001 window_ms=-1",
     "NC_PROBE window_ms=: bad number '-1'"),
    ("SSYN1 NC_ARMED", "NC_ARMED without sent="),
    ("SSYN1 NC_REFLECT ports=1,2,3,4", "ports=: at most 3 values, got 4"),
    ("SSYN1 NC_REFLECT ports=1,x", "ports=: bad port 'x'"),
    ("SSYN1 NC_TIMERS", "NC_TIMERS without waits="),
    ("SSYN1 NC_TIMERS waits=1,1,1,1,1,1,1,1,1", "waits=: at most 8 waits, got 9"),
    ("SSYN1 NC_TIMERS waits=1,soon", "waits=: bad wait 'soon'"),
    ("SSYN1 NC_TIMERS waits=300", "waits=: wait 300.0 outside (0, 280]"),
    ("SSYN1 NC_TIMERS_ARMED holes=two", "NC_TIMERS_ARMED holes=: bad number 'two'"),
    ("SSYN1 NC_RESULT sent=1 reply_seen=x:1",
     "NC_RESULT reply_seen=: 'x:1': 'x' is not an IP address"),
])
def test_bad_input_raises_an_exact_value_error(line: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        P.parse_message(parse_line(line.encode()))
    assert isinstance(info.value, ProtocolError)  # the broker answers it with ERROR
    assert str(info.value) == error


def test_unknown_fields_are_ignored() -> None:
    msg = parse_line(b"SSYN1 NC_ARMED sent=3 later=1")
    assert P.parse_message(msg) == P.Armed(3)
