"""Every number and port a command reads: NaN, infinities and digits of other scripts
("²", "٣", full-width "３") are usage errors (exit 2, click's one message naming the
option), never a crash and never a value. In-process (synprobe.cli.main).

Each case ends with a second, invalid option: had the value been taken, that one fails
(with a message naming it and its value, so the test still fails) and nothing runs."""

from __future__ import annotations

import pytest

from simulsyn_core._internal.birthday import Offer, parse_range
from simulsyn_core._internal.endpoint import Endpoint
from simulsyn_core._internal.numbers import (
    ascii_int,
    parse_finite_float,
    parse_int,
    parse_port,
)
from synprobe.cli import main
from synprobe.natcheck import protocol as P

BAD_NUMBERS = ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "²", "٣", "３", "１２", "1_0"]
BAD_PORTS = ["²", "٣", "３", "８０８６", "1_0", "+80", " 80", "nan"]

# (command words, option, an invalid option that follows)
NUMERIC_OPTIONS = [
    (["punch", "--broker", "127.0.0.1:9", "--session", "s"], opt, ["--strategy", "bogus"])
    for opt in ("--timeout", "--retry-interval", "--attempt-timeout", "--retries",
                "--local-port", "--ttl", "--birthday-sockets", "--birthday-guesses",
                "--birthday-rate")
] + [
    (["nat-check", "--server", "127.0.0.1:9"], opt, ["--port-samples", "-1"])
    for opt in ("--max-wait",)
] + [
    (["nat-check", "--server", "127.0.0.1:9"], "--port-samples", ["--max-wait", "1"]),
] + [
    (["lab", command], opt, ["--a", "bogus"])
    for command in ("up", "demo")
    for opt in ("--delay-a", "--delay-b", "--delay-broker", "--jitter")
] + [
    (["lab", "demo"], "--timeout", ["--a", "bogus"]),
] + [
    (["broker", "--relay"], opt, ["--bind", "not-an-address"])
    for opt in ("--relay-sessions", "--relay-per-ip", "--relay-rate", "--relay-bytes",
                "--relay-idle")
]

ENDPOINT_OPTIONS = [
    (["punch", "--session", "s"], "--broker", ["--strategy", "bogus"]),
    (["punch", "--session", "s"], "--seed-broker", ["--strategy", "bogus"]),
    (["punch", "--local-port", "5"], "--peer", ["--strategy", "bogus"]),
    (["nat-check"], "--server", ["--port-samples", "-1"]),
    (["broker"], "--bind", ["--bind", "not-an-address"]),
]


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out + err


def assert_refused(code: int, text: str, option: str, value: str) -> None:
    where = f"{option} {value!r}: exit {code}: {text!r}"
    assert code == 2, where
    assert "Traceback" not in text and "internal error" not in text, where
    assert "Invalid value for" in text and option in text, where
    assert value in text, where  # the message is about this value, not the one after it


@pytest.mark.parametrize(("words", "option", "then"), NUMERIC_OPTIONS,
                         ids=[f"{' '.join(w[:2])} {o}" for w, o, _ in NUMERIC_OPTIONS])
def test_numeric_options_refuse_nan_inf_and_other_digits(
        capsys: pytest.CaptureFixture[str], words: list[str], option: str,
        then: list[str]) -> None:
    for value in BAD_NUMBERS:
        code, text = run(capsys, [*words, option, value, *then])
        assert_refused(code, text, option, value)


@pytest.mark.parametrize(("words", "option", "then"), ENDPOINT_OPTIONS,
                         ids=[f"{w[0]} {o}" for w, o, _ in ENDPOINT_OPTIONS])
def test_endpoint_options_refuse_other_digits(
        capsys: pytest.CaptureFixture[str], words: list[str], option: str,
        then: list[str]) -> None:
    values = [f"127.0.0.1:{port}" for port in BAD_PORTS] + ["１２７.0.0.1:8086",
                                                           "١٢٧.0.0.1:8086"]
    for value in values:
        code, text = run(capsys, [*words, option, value, *then])
        assert_refused(code, text, option, value)


def test_ordinary_numbers_still_work(capsys: pytest.CaptureFixture[str]) -> None:
    """Valid values get past their own option to the invalid one after them."""
    for words, option, then in NUMERIC_OPTIONS:
        value = "5" if option != "--max-wait" else "3"
        code, text = run(capsys, [*words, option, value, *then])
        assert code == 2 and option not in text.split("Invalid value for")[-1], (option, text)
        assert then[0] in text, (option, text)


@pytest.mark.parametrize("text", ["١٢", "３", "²", "1_0", "+1", "-1", " 1", "1 ", "", "1.0"])
def test_ascii_int_refuses(text: str) -> None:
    assert ascii_int(text) is None


def test_numbers_module() -> None:
    assert ascii_int("0065535") == 65535 and ascii_int("123456", max_digits=5) is None
    assert ascii_int("9" * 5000) is None  # over Python's int() digit limit: refused, not raised
    assert parse_int("-3") == -3 and parse_int("+3") == 3
    for bad in ("٣", "-", "", "3.0"):
        with pytest.raises(ValueError):
            parse_int(bad)
    assert parse_port("0", allow_zero=True) == 0 and parse_port("65535") == 65535
    for bad in ("0", "65536", "٣", "３", "²", "123456", "8_0"):
        with pytest.raises(ValueError):
            parse_port(bad)
    assert parse_finite_float("1e-3") == 0.001 and parse_finite_float(".5") == 0.5
    assert parse_finite_float("-2") == -2.0
    for bad in BAD_NUMBERS + ["", ".", "1.2.3", "0x10"]:
        with pytest.raises(ValueError):
            parse_finite_float(bad)


@pytest.mark.parametrize("port", BAD_PORTS + ["0", "65536"])
def test_endpoint_parse_refuses_other_digits(port: str) -> None:
    with pytest.raises(ValueError):
        Endpoint.parse(f"127.0.0.1:{port}")
    assert Endpoint.parse("127.0.0.1:0", allow_zero_port=True).port == 0


def test_wire_fields_refuse_other_digits() -> None:
    good = {"sockets": "450", "guesses": "450", "port_range": "1024-65535"}
    assert Offer.parse(good.get) is not None
    for key, bad in (("sockets", "٤٥٠"), ("guesses", "４５０"), ("port_range", "١٠٢٤-65535"),
                     ("port_range", "1024-６５５３５"), ("sockets", "²")):
        offer = Offer.parse({**good, key: bad}.get)
        assert offer is None or getattr(offer, key) is None, (key, bad)
    assert parse_range("1024-٦٥٥٣٥") is None and parse_range("1024-65535") == (1024, 65535)
    for bad in ("٣", "３,4", "1,²"):
        with pytest.raises(ValueError):
            P.parse_ports(bad, 10)
    for bad in ("nan", "inf", "٣"):
        with pytest.raises(ValueError):
            P.parse_waits(bad)
