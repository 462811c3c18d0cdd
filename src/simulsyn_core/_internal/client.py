"""Learning the peer's endpoint: from our broker (rendezvous) or an original list broker.

Every socket here is bound to the one local port of the run, so the NAT mapping the
broker observes is the one the punch will reuse.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import re
import selectors
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import birthday as bday
from .endpoint import Endpoint
from .exitcodes import ExitStatus, ToolError
from .rendezvous import EXCHANGED
from .sockets import (
    bound_socket,
    connect_nonblocking,
    describe_errno,
    new_socket,
    recv_until_eof,
)
from .wire import (
    LineDecoder,
    Message,
    ProtocolError,
    decode_seed_list,
    encode_message,
    looks_like_rendezvous,
)

BROKER_CONNECT_TIMEOUT_S = 5.0
WHOAMI_TIMEOUT_S = 2.0  # each answer of the mapping check, at most
TUPLE_BUSY_S = 2.0  # reconnecting to an older broker: how long our old 4-tuple may linger
TUPLE_RETRY_S = 0.02
SEED_POLL_INTERVAL_S = 0.25  # how often --seed-broker asks the list broker again
RELAY_WAIT_S = 35.0  # for RELAYED: the broker waits 30 s for the peer's RELAY
RELAY_STATUS_S = 3.0
RELAY_TOKEN_RE = re.compile(r"[0-9a-f]{32}")
STRATEGY_RELAY = "relay"

Event = Callable[[str], None]


@dataclass(frozen=True)
class Rendezvous:
    """What the broker told us."""

    public: Endpoint | None  # our public endpoint as the broker saw it
    peer: Endpoint
    peer_local: Endpoint | None = None
    role: str | None = None  # "first" (registered first) or "second"
    known_at: float = 0.0  # time.monotonic() when the peer became known
    known_wall: float = 0.0  # time.time() of the same moment
    strategy: str | None = None  # what the broker chose for the pair, if one we offered
    control: Control | None = None  # the broker connection, kept for the ordering exchange
    why: str | None = None  # the broker's reason for the strategy
    birthday: tuple[str, bday.Plan] | None = None  # strategy birthday: our side, the plan
    nameplate: str | None = None  # a code's number we registered under (the broker's, for new)
    relay: str | None = None  # the broker relays this pair: the token for RELAY (PEER relay=)
    relay_at: Endpoint | None = None  # where that relay is, if not the broker (PEER relay_at=)


@dataclass(frozen=True)
class NatFacts:
    """What an earlier `synprobe nat-check` found about our NAT; the core reads no files,
    the caller passes it. Told to the broker (REGISTER ``unsolicited=``, ``reply_syn=``)
    and used for the priming TTL only when the broker sees us at ``public_ip``: the same
    network as that nat-check."""

    public_ip: str
    unsolicited: str | None = None  # "drop" or "reject"
    reply_syn: str | None = None  # "pass" or "blocked"
    ttl: int | None = None  # a TTL that crosses our NAT(s) and dies before the peer's
    age_s: float = 0.0
    port_range: tuple[int, int] | None = None  # a port-randomising NAT's external range
    port_hot: tuple[int, int] | None = None  # a band of it allocated more often

    def describe(self) -> str:
        known = [f"{k}={v}" for k, v in (("unsolicited", self.unsolicited),
                                         ("reply_syn", self.reply_syn), ("ttl", self.ttl))
                 if v is not None]
        return (f"nat-check of {self.public_ip}, {self.age_s / 3600:.1f} h old: "
                + (", ".join(known) or "nothing usable"))


def facts_from_natcheck(result: Mapping[str, Any], age_s: float = 0.0) -> NatFacts | None:
    """What the punch may use of a nat-check result (``synprobe nat-check --json``): what
    the NAT does to an unsolicited SYN and to a reply SYN, the TTL it recommends for a
    hole-opening SYN, and the public port range of a port-randomising NAT with its hot
    band (only when the samples showed the allocation is not uniform). None if the check
    failed or names no public endpoint."""
    try:
        if result.get("error"):
            return None
        public = Endpoint.parse(str(result["public"][0])).ip  # [v6]:port too
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    unsolicited = result.get("unsolicited_syn")
    reply = result.get("reply_syn")
    try:
        ttl = result["recommendation"]["ttl"]["value"]
    except (KeyError, TypeError):
        ttl = None
    port_range, port_hot = _port_range_facts(result.get("port_range"))
    return NatFacts(
        public_ip=public,
        # Anything but a silent drop answers a peer's early SYN (the NAT, or the host
        # behind it with "pass"): an RST or ICMP that hurts the peer's hole.
        unsolicited=None if not isinstance(unsolicited, str) else
        "drop" if unsolicited == "drop" else "reject",
        reply_syn=reply if reply in ("pass", "blocked") else None,
        ttl=ttl if isinstance(ttl, int) and not isinstance(ttl, bool) and 1 <= ttl <= 64
        else None,
        age_s=age_s, port_range=port_range, port_hot=port_hot)


def _ports(value: Any) -> tuple[int, int] | None:
    """[lo, hi] of ports as saved, or None if it is not one."""
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(p, int) and not isinstance(p, bool) for p in value)
            and 1 <= value[0] <= value[1] <= 65535):
        return value[0], value[1]
    return None


def _port_range_facts(saved: Any) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(port_range, port_hot) of nat-check's port_range: the hot band only when the
    samples said the allocation is not uniform, and only inside the range."""
    if not isinstance(saved, dict):
        return None, None
    span = _ports(saved.get("range"))
    hot = _ports(saved.get("hot_band")) if saved.get("uniform") is False else None
    if span is None or (hot is not None and not span[0] <= hot[0] <= hot[1] <= span[1]):
        hot = None
    return span, hot


class Control:
    """The broker connection a primed pair keeps after PEER: send PRIMED, wait for GO
    (bounded by a deadline). Every failure is PUNCH_FAILED: the run then punches plain."""

    def __init__(self, sock: socket.socket, broker: Endpoint, decoder: LineDecoder) -> None:
        self.sock = sock
        self.broker = broker
        self.decoder = decoder

    def send(self, verb: str) -> None:
        try:
            self.sock.setblocking(True)
            self.sock.sendall(encode_message(verb))
        except OSError as exc:  # the peer is known: the run goes on with the plain punch
            raise ToolError(ExitStatus.PUNCH_FAILED,
                            f"broker {self.broker}: {exc.strerror or exc}") from None
        finally:
            self.sock.setblocking(False)

    def wait(self, verb: str, deadline: float) -> None:
        """Wait for ``verb``; an ERROR, a close or the deadline raises ToolError
        (PUNCH_FAILED, so that the run goes on with the plain punch)."""
        late = (ExitStatus.PUNCH_FAILED, f"the broker's {verb} did not come in time")
        try:
            msg = _next_message(self.sock, self.decoder, deadline, self.broker, late)
        except ToolError as exc:  # a reset, a protocol error: the peer is known all the same
            raise ToolError(ExitStatus.PUNCH_FAILED, exc.message) from None
        if msg is None:
            raise ToolError(ExitStatus.PUNCH_FAILED, f"broker {self.broker} closed before {verb}")
        if msg.verb == "ERROR":
            raise ToolError(ExitStatus.PUNCH_FAILED, _refusal(msg))
        if msg.verb != verb:
            raise ToolError(ExitStatus.PUNCH_FAILED, f"broker {self.broker}: {msg.verb} instead "
                                                     f"of {verb}")

    def close(self, deadline: float) -> None:
        """The broker closes first after the exchange (TIME_WAIT on its side)."""
        _finish(self.sock, deadline)
        self.sock.close()


def _refusal(msg: Message) -> str:
    code = msg.get("code") or "error"
    text = (msg.get("message") or "").replace("_", " ")
    return f"broker refused: {code}: {text}"


def _connect_broker(broker: Endpoint, local_port: int, deadline: float,
                    busy_s: float = 0.0) -> socket.socket:
    """A connection to the broker from our port. ``busy_s``: for that long, retry while
    the 4-tuple is still held by our previous connection to it (LAST_ACK until the
    broker's ACK of our FIN comes: EADDRNOTAVAIL)."""
    busy_until = time.monotonic() + busy_s
    while True:
        try:
            sock = bound_socket(local_port, family=broker.family)
        except OSError as exc:
            raise ToolError(ExitStatus.ADDRESS_IN_USE,
                            f"cannot bind local port {local_port}: {exc.strerror}") from None
        code = connect_nonblocking(sock, broker, min(BROKER_CONNECT_TIMEOUT_S,
                                                     deadline - time.monotonic()))
        if not code:
            return sock
        sock.close()
        if code != errno.EADDRNOTAVAIL or time.monotonic() + TUPLE_RETRY_S > min(busy_until,
                                                                                deadline):
            raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                            f"broker {broker}: connect failed: {describe_errno(code)}")
        time.sleep(TUPLE_RETRY_S)


NOT_RENDEZVOUS = ("answered with something else than the rendezvous protocol (an original "
                  "list broker? use --seed-broker)")


def _next_message(sock: socket.socket, decoder: LineDecoder, deadline: float,
                  broker: Endpoint, late: tuple[ExitStatus, str], first: bool = False
                  ) -> Message | None:
    """The next whole message from the broker, None if it closed first. ``late``: the
    ToolError (status, text) when ``deadline`` passes; ``first``: these are the
    connection's first bytes, which must look like the rendezvous protocol."""
    pending = next(decoder.feed(b""), None)
    if pending is not None:
        return pending
    sock.setblocking(False)
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                raise ToolError(*late)
            try:
                chunk = sock.recv(4096)
            except OSError as exc:
                raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                                f"broker {broker}: {exc.strerror or exc}") from None
            if not chunk:
                return None
            if first and not looks_like_rendezvous(chunk):
                raise ToolError(ExitStatus.BROKER_UNREACHABLE, f"broker {broker} {NOT_RENDEZVOUS}")
            first = False
            try:
                message = next(decoder.feed(chunk), None)
            except ProtocolError as exc:
                raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                                f"broker {broker}: protocol error: {exc}") from None
            if message is not None:
                return message


def _whoami(sock: socket.socket, broker: Endpoint, deadline: float, close: bool
            ) -> Message | None:
    """Ask the broker which public endpoint it sees (YOUARE), None from an older broker."""
    try:
        sock.setblocking(True)
        sock.sendall(encode_message("WHOAMI", close="1" if close else None))
    except OSError as exc:
        raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                        f"broker {broker}: {exc.strerror or exc}") from None
    late = (ExitStatus.BROKER_UNREACHABLE, f"broker {broker} did not answer in time")
    answer = _next_message(sock, LineDecoder(), min(deadline, time.monotonic() +
                                                    WHOAMI_TIMEOUT_S), broker, late, first=True)
    return answer if answer is not None and answer.verb == "YOUARE" else None


def check_mapping(sock: socket.socket, broker: Endpoint, local_port: int, deadline: float,
                  event: Event, on_alt: Callable[[Endpoint], None] | None = None
                  ) -> tuple[str | None, bool, Endpoint | None]:
    """Is our NAT's mapping the same towards another destination? Ask the broker on
    ``sock`` and through its other address (``alt``) from the same local port: two public
    ports mean a port-randomising (endpoint-dependent) NAT. Returns (mapping: "same",
    "varies" or None when the broker cannot tell, whether ``sock`` is still usable, our
    public endpoint as the broker sees it, if it said)."""
    first = _whoami(sock, broker, deadline, close=False)
    if first is None:
        return None, False, None  # an older broker refused the verb and closed
    try:
        public = first.endpoint("public")
    except ProtocolError:
        public = None
    alt = first.endpoint("alt") if first.get("alt") else None
    if alt is None:
        event("mapping check skipped: the broker has one address")
        return None, True, public
    if on_alt is not None:
        on_alt(alt)
    # Best effort: an alt we cannot reach (a broker behind a 1:1 NAT advertising its
    # private address, a firewall) leaves the mapping unknown, never ends the run.
    try:
        other = _connect_broker(alt, local_port, min(deadline, time.monotonic() +
                                                     WHOAMI_TIMEOUT_S))
        try:
            second = _whoami(other, alt, deadline, close=True)
            _finish(other, min(deadline, time.monotonic() + 1.0))
        finally:
            other.close()
    except ToolError as exc:
        event(f"mapping check skipped: the broker's other address: {exc.message}")
        return None, True, public
    if second is None:
        return None, True, public
    try:
        seen = (first.endpoint("public"), second.endpoint("public"))
    except ProtocolError as exc:
        event(f"mapping check skipped: {exc}")
        return None, True, public
    mapping = "same" if seen[0] == seen[1] else "varies"
    event(f"mapping check: the broker sees us as {seen[0]} via {broker} and as {seen[1]} via "
          f"{alt}: " + ("one mapping for both" if mapping == "same"
                        else "our NAT maps each destination to another public "
                             + ("port" if seen[0].ip == seen[1].ip else "address")))
    return mapping, True, public


# A broker whose session store is down (--redis, Redis unreachable) answers REGISTER with
# ERROR code=unavailable: registering again after these waits, the last one repeated,
# as long as --timeout leaves time.
REGISTER_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)


class _Unavailable(Exception):
    """The broker answered ERROR code=unavailable."""


def rendezvous(broker: Endpoint, session: str, local_port: int, deadline: float,
               event: Event, *args: Any, **kwargs: Any) -> Rendezvous:
    """``register``, again with backoff (REGISTER_BACKOFF_S) while the broker says it is
    unavailable, within ``deadline``."""
    # Our port stays bound from the first registration to the last: between two, no
    # connection of ours is on it, and for seconds another program's bind(0) or connect()
    # could be handed it (the next registration then ended the run with EADDRINUSE).
    with _port_held(local_port, broker.family):
        for attempt in itertools.count():
            try:
                return register(broker, session, local_port, deadline, event, *args,
                                **kwargs)
            except _Unavailable as exc:
                wait_s = REGISTER_BACKOFF_S[min(attempt, len(REGISTER_BACKOFF_S) - 1)]
                if time.monotonic() + wait_s >= deadline:
                    raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                                    f"{exc}; no time left to register again (--timeout)"
                                    ) from None
                event(f"{exc}; registering again in {wait_s:g} s")
                time.sleep(wait_s)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _port_held(local_port: int, family: socket.AddressFamily) -> Iterator[None]:
    """A socket bound to our port for as long as the block runs, so that no other
    program is handed the port while no connection of ours is on it. Bound with
    SO_REUSEADDR and never listening, it is no obstacle to our own sockets. Best effort:
    a port taken already is told by our next bind."""
    try:
        holder = bound_socket(local_port, family=family) if local_port else None
    except OSError:
        holder = None
    try:
        yield
    finally:
        if holder is not None:
            holder.close()


def register(broker: Endpoint, session: str, local_port: int, deadline: float,
             event: Event, strategies: tuple[str, ...] = (),
             on_alt: Callable[[Endpoint], None] | None = None,
             facts: NatFacts | None = None,
             birthday: tuple[int, int] = (bday.DEFAULT_SOCKETS, bday.DEFAULT_GUESSES),
             nameplate: bool = False, on_nameplate: Callable[[str], None] | None = None
             ) -> Rendezvous:
    """Register under ``session`` and wait (until ``deadline``) for the broker's PEER.

    First the mapping check (``check_mapping``): a port-randomising NAT is declared in
    REGISTER, and the broker tells both peers at once that no punch can work.
    ``strategies`` are offered to the broker (``strategies=`` of REGISTER); when it
    answers PEER with one of them, the connection stays open as ``Rendezvous.control``
    and the caller closes it. ``facts`` (an earlier nat-check's) are told to the broker
    when it sees us at the same public address. ``birthday``: the (sockets, guesses)
    offered for birthday punching; the one of our side is told (sockets when our
    mapping varies). ``nameplate``: ``session`` is a code's number (``new``: the broker
    hands one out, told to ``on_nameplate`` with REGISTERED)."""
    sock = _connect_broker(broker, local_port, deadline)
    keep = False
    try:
        local = Endpoint.from_sockaddr(sock.getsockname())
        mapping, usable, public_seen = check_mapping(sock, broker, local_port, deadline,
                                                     event, on_alt)
        told: dict[str, str | None] = {}
        known = facts if facts is not None and public_seen is not None and \
            public_seen.ip == facts.public_ip else None
        if facts is not None and public_seen is not None:
            if known is not None:
                told = {"unsolicited": known.unsolicited, "reply_syn": known.reply_syn}
                event(f"telling the broker what the last {facts.describe()}")
            else:
                event(f"the last nat-check was of {facts.public_ip}, the broker sees us at "
                      f"{public_seen.ip}: another network, not used")
        if not usable:
            # An older broker refused the verb and closes: let it close first (TIME_WAIT
            # on its side, not on our port), then register as before from the same port
            # (the old 4-tuple lingers until the broker ACKs our FIN).
            _finish(sock, min(deadline, time.monotonic() + 1.0))
            sock.close()
            sock = _connect_broker(broker, local_port, deadline, busy_s=TUPLE_BUSY_S)
        if "birthday" in strategies:
            told.update((bday.Offer(sockets=birthday[0],
                                    port_range=known.port_range if known else None,
                                    port_hot=known.port_hot if known else None)
                         if mapping == "varies" else bday.Offer(guesses=birthday[1])).fields())
        sock.setblocking(True)
        try:
            key = {"nameplate" if nameplate else "session": session}
            sock.sendall(encode_message("REGISTER", **key, local=local,
                                        strategies=",".join(strategies) or None,
                                        mapping=mapping, **told))
        except OSError as exc:
            raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                            f"broker {broker}: {exc.strerror or exc}") from None
        decoder = LineDecoder()
        answered = False
        what = f"code {session}" if nameplate else f"session {session!r}"
        while True:
            # Not even REGISTERED by the deadline: the broker timed out, not the peer.
            late = ((ExitStatus.NO_PEER, f"no peer joined {what} in time")
                    if answered else
                    (ExitStatus.BROKER_UNREACHABLE, f"broker {broker} did not answer in time"))
            msg = _next_message(sock, decoder, deadline, broker, late, first=not answered)
            if msg is None:
                raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                                f"broker {broker} closed the connection before pairing")
            answered = True
            if msg.verb == "REGISTERED":
                try:
                    public = msg.endpoint("public")
                except ProtocolError as exc:
                    raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                                    f"broker {broker}: protocol error: {exc}") from None
                number = msg.get("nameplate")
                if nameplate and (number is None or not number.isascii()
                                  or not number.isdigit()):
                    raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                                    f"broker {broker}: protocol error: REGISTERED without the "
                                    "code's number")
                if number is not None and nameplate:
                    session = number
                    what = f"code {number}"
                    if on_nameplate is not None:
                        on_nameplate(number)
                event(f"registered {'under' if nameplate else 'in'} {what}; the broker sees "
                      f"us as {public}; "
                      "waiting for the peer")
            elif msg.verb == "PEER":
                result = _peer(msg, broker, strategies, sock, decoder)
                if nameplate:
                    result = replace(result, nameplate=session)
                if result.control is not None:
                    keep = True
                else:
                    _finish(sock, deadline)
                return result
            elif msg.verb == "ERROR" and msg.get("code") == "untraversable":
                text = (msg.get("message") or "").replace("_", " ")
                raise ToolError(ExitStatus.PUNCH_FAILED, f"untraversable: {text}")
            elif msg.verb == "ERROR" and nameplate and msg.get("code") == "bad-request" and \
                    "session" in (msg.get("message") or ""):
                raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                                f"broker {broker} hands out no codes (an older synprobe "
                                "broker): use --session NAME --secret WORDS")
            elif msg.verb == "ERROR" and msg.get("code") == "unavailable":
                raise _Unavailable(_refusal(msg))
            elif msg.verb == "ERROR":
                status = (ExitStatus.NO_PEER if msg.get("code") == "timeout"
                          else ExitStatus.BROKER_UNREACHABLE)
                raise ToolError(status, _refusal(msg))
            else:
                raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                                f"broker {broker}: protocol error: unexpected {msg.verb}")
    finally:
        if not keep:
            sock.close()


def _peer(msg: Message, broker: Endpoint, strategies: tuple[str, ...], sock: socket.socket,
          decoder: LineDecoder) -> Rendezvous:
    """What PEER says; the connection is kept (``control``) when the broker chose one of
    the strategies we offered."""
    now, wall = time.monotonic(), time.time()
    try:
        peer_local = msg.endpoint("peer_local") if msg.get("peer_local") else None
        public, peer = msg.endpoint("public"), msg.endpoint("peer")
    except ProtocolError as exc:
        raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                        f"broker {broker}: protocol error: {exc}") from None
    strategy = msg.get("strategy")
    why = (msg.get("why") or "").replace("_", " ") or None
    token = msg.get("relay") if STRATEGY_RELAY in strategies else None
    if token is not None and not RELAY_TOKEN_RE.fullmatch(token):
        raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                        f"broker {broker}: protocol error: PEER relay= is not a token")
    try:
        relay_at = msg.endpoint("relay_at") if token is not None and msg.get("relay_at") \
            else None
    except ProtocolError as exc:
        raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                        f"broker {broker}: protocol error: {exc}") from None
    if strategy == STRATEGY_RELAY and token is not None:
        return Rendezvous(public, peer, peer_local, msg.get("role"), now, wall, strategy,
                          None, why, relay=token, relay_at=relay_at)
    if strategy is not None and strategy in strategies and strategy != STRATEGY_RELAY:
        plan = bday.Plan.parse(msg.get) if strategy == "birthday" else None
        if strategy == "birthday" and plan is None:
            raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                            f"broker {broker}: protocol error: PEER strategy=birthday without "
                            "a whole plan")
        control = Control(sock, broker, decoder) if strategy in EXCHANGED else None
        return Rendezvous(public, peer, peer_local, msg.get("role"), now, wall, strategy,
                          control, why, plan, relay=token, relay_at=relay_at)
    return Rendezvous(public, peer, peer_local, msg.get("role"), now, wall, relay=token,
                      relay_at=relay_at)


def _finish(sock: socket.socket, deadline: float) -> None:
    """Let the broker close first, so TIME_WAIT stays on its side, not on our port."""
    try:
        recv_until_eof(sock, min(deadline, time.monotonic() + 1.0), limit=4096)
    except (OSError, TimeoutError, ValueError):
        pass


def seed_rendezvous(broker: Endpoint, local_port: int, deadline: float,
                    event: Event) -> Rendezvous:
    """Poll an original list broker until another endpoint is listed; take the newest."""
    polls = 0
    while True:
        polls += 1
        sock = _connect_broker(broker, local_port, deadline)
        try:
            data = recv_until_eof(sock, min(deadline, time.monotonic() + 5.0), limit=1 + 255 * 6)
            entries = decode_seed_list(data)
        except TimeoutError:
            if time.monotonic() >= deadline and polls > 1:  # our --timeout, not the broker's
                raise ToolError(ExitStatus.NO_PEER,
                                f"no other endpoint appeared on list broker {broker} in "
                                f"time ({polls} polls)") from None
            raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                            f"list broker {broker} did not answer in time") from None
        except (ValueError, OSError) as exc:
            raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                            f"list broker {broker}: bad answer: {exc}") from None
        finally:
            sock.close()
        if not entries:
            raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                            f"list broker {broker} answered an empty list (it should list us)")
        own = entries[-1]
        others = [ep for ep in entries[:-1] if ep != own]
        if polls == 1:
            event(f"list broker sees us as {own}; {len(others)} other endpoint(s) listed")
        if others:
            return Rendezvous(own, others[-1], None, None, time.monotonic(), time.time())
        if time.monotonic() + SEED_POLL_INTERVAL_S >= deadline:
            raise ToolError(ExitStatus.NO_PEER,
                            f"no other endpoint appeared on list broker {broker} in time "
                            f"({polls} polls)")
        time.sleep(SEED_POLL_INTERVAL_S)


def relay_connect(broker: Endpoint, token: str, deadline: float) -> tuple[socket.socket, bytes]:
    """Join the broker's relay for our pair (docs/protocol.md, "Relay"): a new connection
    from any port, ``RELAY token=``, then RELAYED once the peer is there too. Returns the
    connection (raw bytes to and from the peer from then on) and what came after RELAYED.
    Raises ToolError(PUNCH_FAILED) when the broker refuses, BROKER_UNREACHABLE when it
    cannot be reached."""
    sock = new_socket(family=broker.family)
    try:
        code = connect_nonblocking(sock, broker, min(BROKER_CONNECT_TIMEOUT_S,
                                                     deadline - time.monotonic()))
        if code:
            raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                            f"relay {broker}: connect failed: {describe_errno(code)}")
        sock.setblocking(True)
        try:
            sock.sendall(encode_message("RELAY", token=token))
        except OSError as exc:
            raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                            f"relay {broker}: {exc.strerror or exc}") from None
        decoder = LineDecoder()
        late = (ExitStatus.PUNCH_FAILED, f"relay {broker}: the peer did not join the relay "
                                         "in time")
        msg = _next_message(sock, decoder, min(deadline, time.monotonic() + RELAY_WAIT_S),
                            broker, late, first=True)
        if msg is None:
            raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                            f"relay {broker} closed the connection before RELAYED")
        if msg.verb == "ERROR":
            raise ToolError(ExitStatus.PUNCH_FAILED, f"relay {broker}: {_refusal(msg)}")
        if msg.verb != "RELAYED":
            raise ToolError(ExitStatus.BROKER_UNREACHABLE,
                            f"relay {broker}: protocol error: unexpected {msg.verb}")
        leftover = bytes(decoder.buffer)
        decoder.buffer.clear()
        return sock, leftover
    except BaseException:
        sock.close()
        raise


def relay_status(broker: Endpoint, token: str) -> str:
    """Why the broker ended our relayed session (RELAY_STATUS), as a sentence; best effort
    (a broker that cannot say gets "the relay connection broke")."""
    deadline = time.monotonic() + RELAY_STATUS_S
    sock = new_socket(family=broker.family)
    try:
        if connect_nonblocking(sock, broker, RELAY_STATUS_S):
            return "the relay connection broke (the broker cannot be asked why)"
        sock.setblocking(True)
        sock.sendall(encode_message("RELAY_STATUS", token=token))
        late = (ExitStatus.BROKER_UNREACHABLE, "no answer")
        msg = _next_message(sock, LineDecoder(), deadline, broker, late, first=True)
    except (OSError, ToolError):
        return "the relay connection broke (the broker cannot be asked why)"
    finally:
        sock.close()
    if msg is None or msg.verb != "RELAY_ENDED":
        return "the relay connection broke (the broker did not say why)"
    reason = msg.get("reason") or "unknown"
    text = (msg.get("message") or "").replace("_", " ")
    return f"the relay ended the session: {reason}" + (f": {text}" if text else "")
