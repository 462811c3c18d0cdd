"""One set of rules from the caller's arguments to a PunchConfig, for ``connect()`` and for
``synprobe punch`` alike (so that the command has nothing the API lacks). The messages
name the arguments the caller's way: ``session=`` for the API, ``--session`` for the
command."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import birthday as bday
from .client import NatFacts, facts_from_natcheck
from .endpoint import Endpoint
from .punch import ATTEMPT_TIMEOUT_S, DEFAULT_RETRIES, RETRY_INTERVAL_S, STRATEGIES
from .session import RELAY_MODES, PunchConfig

ROLES = ("first", "second")
# How the command spells an argument where it is not --name-with-dashes.
_CLI_NAMES = {"role": "--first/--second", "natcheck": "--nat-check"}


@dataclass(frozen=True)
class Tuning:
    """The punch's knobs, each as ``synprobe punch``'s option of the same name (rarely
    needed: the defaults are the command's).

    ``retries``: connect() attempts at most; ``retry_interval``: seconds to pause after
    an attempt refused at once; ``attempt_timeout``: seconds one connect() may wait while
    the kernel resends the SYN; ``ttl``: the priming SYN's TTL (hop limit), None: measured;
    ``birthday_sockets`` (N), ``birthday_guesses`` (M), ``birthday_rate`` (SYNs a second):
    birthday punching through a port-randomising NAT."""

    retries: int = DEFAULT_RETRIES
    retry_interval: float = RETRY_INTERVAL_S
    attempt_timeout: float = ATTEMPT_TIMEOUT_S
    ttl: int | None = None
    birthday_sockets: int = bday.DEFAULT_SOCKETS
    birthday_guesses: int = bday.DEFAULT_GUESSES
    birthday_rate: float = bday.DEFAULT_RATE

    def check(self, name: Callable[[str], str]) -> None:
        """ValueError naming the first knob out of its range."""
        ranges: list[tuple[str, float | None, float, float]] = [
            ("retries", self.retries, 1, 100000),
            ("retry_interval", self.retry_interval, 0, 60),
            ("attempt_timeout", self.attempt_timeout, 0.05, 3600),
            ("ttl", self.ttl, 1, 64),
            ("birthday_sockets", self.birthday_sockets, 1, bday.MAX_SOCKETS),
            ("birthday_guesses", self.birthday_guesses, 1, bday.MAX_GUESSES),
            ("birthday_rate", self.birthday_rate, 1, bday.MAX_RATE)]
        for key, value, low, high in ranges:
            if value is None and key == "ttl":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or \
                    not math.isfinite(value) or not low <= value <= high:
                raise ValueError(f"{name(key)}: a number from {low:g} to {high:g}")
        for key in ("retries", "ttl", "birthday_sockets", "birthday_guesses"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, int):
                raise ValueError(f"{name(key)}: a whole number")


def namer(cli: bool) -> Callable[[str], str]:
    """How messages name an argument: ``session=`` (API) or ``--session`` (command)."""
    if cli:
        return lambda key: _CLI_NAMES.get(key, "--" + key.replace("_", "-"))
    return lambda key: f"{key}="


def _endpoint(value: str | Endpoint | None, key: str, name: Callable[[str], str],
              server: bool) -> Endpoint | None:
    if value is None or isinstance(value, Endpoint):
        return value
    try:
        return Endpoint.parse(str(value))
    except ValueError as exc:
        what = "\"ip:port\" or \"[ipv6]:port\"" if server else "\"ip:port\""
        raise ValueError(f"{name(key)}: {exc} (expected {what})") from None


def build_config(*, broker: str | Endpoint | None = None, session: str | None = None,
                 code: str | None = None, peer: str | Endpoint | None = None,
                 seed_broker: str | Endpoint | None = None, role: str | None = None,
                 local_port: int | None = None, timeout: float = 30.0,
                 strategy: str = "auto", relay: str = "auto", secret: str | None = None,
                 plain: bool = False, tuning: Tuning | None = None,
                 natcheck: Mapping[str, Any] | NatFacts | None = None,
                 new_code: bool = True, cli: bool = False) -> PunchConfig:
    """The PunchConfig of these arguments, or ValueError saying which rule they break
    (in the caller's spelling, ``cli``). ``new_code``: without session or code, the
    broker hands out a new code (the API needs an ``on_code`` for that)."""
    from .codes import CodeError, make_words, parse_code
    from .wire import SESSION_RE

    name = namer(cli)
    tuning = tuning or Tuning()
    tuning.check(name)
    broker_ep = _endpoint(broker, "broker", name, True)
    seed_ep = _endpoint(seed_broker, "seed_broker", name, True)
    peer_ep = _endpoint(peer, "peer", name, False)
    chosen = [k for k, v in (("broker", broker_ep), ("seed_broker", seed_ep),
                             ("peer", peer_ep)) if v is not None]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one of {name('broker')}, {name('seed_broker')} or "
                         f"{name('peer')}")
    if strategy not in STRATEGIES:
        raise ValueError(f"{name('strategy')}: one of {', '.join(STRATEGIES)}")
    if relay not in RELAY_MODES:
        raise ValueError(f"{name('relay')}: one of {', '.join(RELAY_MODES)}")
    if role is not None and role not in ROLES:
        raise ValueError(f"role=: one of {', '.join(ROLES)}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
            not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"{name('timeout')}: a positive number of seconds")
    if local_port is not None and (isinstance(local_port, bool)
                                   or not isinstance(local_port, int)
                                   or not 0 <= local_port <= 65535):
        raise ValueError(f"{name('local_port')}: a port from 0 to 65535")
    if session is not None and broker_ep is None:
        raise ValueError(f"{name('session')} goes with {name('broker')}")
    if code is not None and (broker_ep is None or session is not None):
        raise ValueError(f"{name('code')} goes with {name('broker')}, without "
                         f"{name('session')}")
    if secret is not None and session is None and peer_ep is None:
        raise ValueError(f"{name('secret')} goes with {name('session')} or {name('peer')} (a "
                         "code carries its own words)")
    if plain and (code is not None or secret is not None):
        raise ValueError(f"{name('plain')} turns authentication off: not with {name('code')} "
                         f"or {name('secret')}")
    if plain and broker_ep is not None and session is None:
        raise ValueError(f"{name('plain')} with {name('broker')} needs {name('session')} NAME "
                         "(a code's words serve only the authentication)")
    if session is not None and not SESSION_RE.fullmatch(session):
        raise ValueError(f"{name('session')}: 1-64 of A-Z a-z 0-9 . _ -")
    if secret is not None and not secret.strip():
        raise ValueError(f"{name('secret')}: an empty secret authenticates nothing")
    nameplate = words = None
    if broker_ep is not None and session is None:
        if code is None:
            if not new_code:
                raise ValueError(f"give {name('session')}, {name('code')}, or on_code= (to "
                                 "be told a new code)")
            nameplate, words = "new", make_words()
        else:
            try:
                nameplate, words = parse_code(code)
            except CodeError as exc:
                raise ValueError(f"{name('code')}: {exc}") from None
    if peer_ep is not None and not local_port:
        raise ValueError(f"{name('peer')} needs {name('local_port')} (the peer must know "
                         "where to aim)")
    if role is not None and broker_ep is not None:
        said = f"--{role}" if cli else name("role")
        raise ValueError(f"{said} goes with {name('peer')} or {name('seed_broker')} (a "
                         "synprobe broker sets the order itself)")
    facts = natcheck if isinstance(natcheck, NatFacts) or natcheck is None else \
        facts_from_natcheck(natcheck)
    if natcheck is not None and broker_ep is None:
        raise ValueError(f"{name('natcheck')} goes with {name('broker')} (it is told to the "
                         "broker)")
    return PunchConfig(local_port=local_port or 0, broker=broker_ep, session=session,
                       seed_broker=seed_ep, peer=peer_ep, retries=tuning.retries,
                       timeout_s=float(timeout), retry_interval_s=tuning.retry_interval,
                       attempt_timeout_s=tuning.attempt_timeout, strategy=strategy,
                       ttl=tuning.ttl, role=role, facts=facts,
                       birthday_sockets=tuning.birthday_sockets,
                       birthday_guesses=tuning.birthday_guesses,
                       birthday_rate=tuning.birthday_rate, nameplate=nameplate, words=words,
                       secret=secret, plain=plain, relay=relay)
