"""Sessions shared through Redis by several brokers (``broker --redis``; docs/protocol.md,
"Scaling out on Redis").

A waiting registration is one Redis key with a TTL; the second registration takes it in
one Lua script (so two brokers never pair one client twice) and decides the pair with
rendezvous.SessionTable's own code. What the other peer's broker must write to its
client goes on that broker's channel. The entry and bus codecs are pure (tested without
Redis); ``RedisHub`` is the thin asyncio layer over ``redis.asyncio``, imported only
when a broker runs with --redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

from .birthday import Offer
from .endpoint import Endpoint
from .limits import LogThrottle
from .rendezvous import SESSION_WAIT_MAX_S, V6_KEY, Facts

KEY_PREFIX = "ssyn:"
ALIVE_TTL_S = 3  # a broker's alive key lives this long; it renews it every ALIVE_EVERY_S
ALIVE_EVERY_S = 1.0
REDIS_TIMEOUT_S = 1.0  # every Redis command and connect: an outage is told, never waited on
REDIS_POOL_MAX = 32  # connections to Redis at most (the bus listener's is one more)
RETRY_EVERY_S = 0.5  # the bus listener's reconnect interval while Redis is down
CLOSE_WAIT_S = 2.0  # on stop: each step of leaving Redis takes at most this long
OUTBOX_MAX = 65536  # bus messages queued for Redis at most; past it they are dropped (logged)
NAMEPLATE_MAX = 999999

# Both scripts that decide a pair: the session's entry, if its broker is alive, is taken
# (a pair), else ours is stored. @FIRST runs after the GET; @SAME when the live entry has
# our public endpoint (the same client again).
_PAIR_OR_STORE = """
local v = redis.call('GET', KEYS[1])
@FIRST
if v then
  local owner, pub = string.match(v, '^(%S+) (%S+) ')
  if owner and redis.call('EXISTS', 'ssyn:alive:' .. owner) == 1 then
    if pub == ARGV[3] then
      @SAME
    end
    redis.call('DEL', KEYS[1])
    return {'paired', v}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return {'waiting', ''}
"""


def _pair_or_store(first: str, same: str) -> str:
    return _PAIR_OR_STORE.replace("@FIRST", first).replace("@SAME", same)


# KEYS[1]: the session key. ARGV: our entry, its TTL (s), our public endpoint.
# {"waiting"}: ours is stored; {"paired", theirs}: theirs was taken (gone from Redis);
# {"replaced", theirs}: the same endpoint registered again (ours replaces theirs).
# An entry whose broker's alive key is gone (the broker died) is stale: ours replaces it.
TAKE_OR_WAIT = _pair_or_store(
    "", "redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])\n      return {'replaced', v}")
# The smallest code number no live entry holds: claimed by storing our entry under it.
# ARGV[4]: the key's family suffix ("" or "@6": IPv6 clients' numbers are their own).
NEW_NAMEPLATE = """
for n = 1, tonumber(ARGV[3]) do
  local k = 'ssyn:s:#' .. n .. ARGV[4]
  local v = redis.call('GET', k)
  local owner = v and string.match(v, '^(%S+) ')
  if not v or redis.call('EXISTS', 'ssyn:alive:' .. owner) == 0 then
    redis.call('SET', k, string.gsub(ARGV[1], '#new', '#' .. n, 1), 'EX', ARGV[2])
    return n
  end
end
return 0
"""
# After an outage (Redis restarted empty): store one of our waiting entries again, or,
# if another client of the session registered meanwhile, take it (the pair is decided
# by the restoring broker, as by a second REGISTER). KEYS[1]: the session key; ARGV: our
# entry, its TTL left (s), our public endpoint. {"kept"}: ours is there already;
# {"superseded", theirs}: a newer registration of the same endpoint holds it (ours goes).
RESTORE = _pair_or_store("if v == ARGV[1] then return {'kept', ''} end",
                         "return {'superseded', v}")
# Delete a key only if it still holds our entry (a waiting client that left).
DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class Held:
    """One of our clients whose entry waits in Redis."""

    key: str
    value: str
    since: float
    session: str
    ip: str


async def _nothing_restored(conn: int, verdict: str, theirs: Entry) -> None:
    return None


class Unavailable(Exception):
    """Redis cannot be reached (answered ERROR code=unavailable)."""


@dataclass(frozen=True)
class Entry:
    """A waiting registration as Redis keeps it: who holds its connection, and its facts."""

    broker: str
    conn: int
    session: str
    public: Endpoint
    local: Endpoint | None
    facts: Facts

    def encode(self) -> str:
        f = self.facts
        body = {"c": self.conn, "k": self.session,
                "l": str(self.local) if self.local else None,
                "s": sorted(f.strategies), "m": f.mapping, "u": f.unsolicited,
                "r": f.reply_syn, "o": f.birthday.fields()}
        return f"{self.broker} {self.public} {json.dumps(body, separators=(',', ':'))}"

    @classmethod
    def decode(cls, value: str) -> Entry:
        """ValueError on anything but what ``encode`` wrote."""
        try:
            broker, public, text = value.split(" ", 2)
            body = json.loads(text)
            offer = body["o"]
            facts = Facts(frozenset(body["s"]), body["m"], body["u"], body["r"],
                          Offer.parse(offer.get))
            local = Endpoint.parse(body["l"]) if body["l"] else None
            return cls(broker, int(body["c"]), str(body["k"]), Endpoint.parse(public),
                       local, facts)
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a waiting entry: {exc}") from None


def session_key(session: str) -> str:
    return f"{KEY_PREFIX}s:{session}"


def channel(broker: str) -> str:
    return f"{KEY_PREFIX}broker:{broker}"


def alive_key(broker: str) -> str:
    return f"{KEY_PREFIX}alive:{broker}"


# Bus messages, on the channel of the broker holding ``conn``:
#   reply: write ``data`` to conn (close after it if ``close``); ``owner`` holds the pair
#   step:  conn's client (at broker ``from``) said ``verb`` (PRIMED) to the pair's owner
#   gone:  conn's client (at broker ``from``) left: the pair's owner tells its peer
def bus_reply(conn: int, data: bytes, close: bool, owner: str) -> str:
    return json.dumps({"op": "reply", "conn": conn, "data": data.decode(), "close": close,
                       "owner": owner})


def bus_from(op: str, sender: str, conn: int, verb: str = "") -> str:
    return json.dumps({"op": op, "from": sender, "conn": conn, "verb": verb})


def remote(broker: str, conn: int) -> tuple[str, str, int]:
    """How the deciding broker's table names a connection held by another broker."""
    return ("r", broker, conn)


def is_remote(conn: Hashable) -> bool:
    return isinstance(conn, tuple)


# What a broker does with a waiting client whose entry, stored again, met another's.
Restored = Callable[[int, str, Entry], Awaitable[None]]


class RedisHub:
    """One broker's link to Redis: the waiting entries it stored, its alive key, its
    channel's listener, and an outbox that publishes in order."""

    def __init__(self, url: str, log: Callable[[str], None],
                 wait_max_s: float = SESSION_WAIT_MAX_S) -> None:
        import redis.asyncio as aioredis  # only with --redis: a plain broker never loads it

        self.url = url
        self.log = log
        self.wait_max_s = wait_max_s
        self.id = secrets.token_hex(6)
        # Registrations in flight share a bounded pool and wait (at most REDIS_TIMEOUT_S)
        # for a free connection: a burst never opens one connection per client.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=REDIS_POOL_MAX, timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
            decode_responses=True)
        self.redis = aioredis.Redis(connection_pool=pool)
        self._errors: tuple[type[BaseException], ...] = (
            aioredis.RedisError, OSError, asyncio.TimeoutError)
        self._take = self.redis.register_script(TAKE_OR_WAIT)
        self._new = self.redis.register_script(NEW_NAMEPLATE)
        self._delete_if = self.redis.register_script(DELETE_IF)
        self._restore = self.redis.register_script(RESTORE)
        self.waiting: dict[int, Held] = {}  # our clients whose entry waits in Redis
        self.per_ip: dict[str, int] = {}  # of those, per address (a local cap)
        self.owner_of: dict[int, str] = {}  # a conn of ours in a pair another broker holds
        self.up = True
        # Set by every failure, cleared only by a whole pass of _restore_all (a command
        # that succeeds meanwhile says Redis is back, not that our entries are in it).
        self.restore_needed = False
        self._throttle = LogThrottle(10.0)
        self._outbox: asyncio.Queue[tuple[str, str]] = asyncio.Queue(OUTBOX_MAX)
        self._tasks: list[asyncio.Task[None]] = []
        self._on_bus: Callable[[dict[str, Any]], None] = lambda m: None
        self._on_restored: Restored = _nothing_restored

    @classmethod
    def check(cls, url: str, log: Callable[[str], None]) -> Callable[[], RedisHub]:
        """Before the loop runs: ValueError if ``url`` is no Redis URL, ImportError
        without the redis package; the hub is made inside the loop (the returned call)."""
        import redis.asyncio as aioredis

        aioredis.connection.parse_url(url)
        return lambda: cls(url, log)

    async def start(self, on_bus: Callable[[dict[str, Any]], None],
                    on_restored: Restored | None = None) -> None:
        """``on_restored(conn, verdict, theirs)``: after an outage, what storing the
        waiting entry of our client ``conn`` again found ("paired": take ``theirs``;
        "superseded": a newer registration of the same endpoint replaced it)."""
        self._on_bus = on_bus
        self._on_restored = on_restored or _nothing_restored
        try:
            await self.redis.set(alive_key(self.id), "1", ex=ALIVE_TTL_S)
        except self._errors as exc:
            self.down(exc)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen()), loop.create_task(self._alive()),
                       loop.create_task(self._send())]
        self.log(f"redis {self.url}: broker id {self.id}, channel {channel(self.id)}")

    def down(self, exc: BaseException) -> None:
        """Redis failed: one log line per interval (README "Scaling out on Redis")."""
        self.up = False
        self.restore_needed = True
        say, quiet = self._throttle.note("down", time.monotonic())
        if say:
            more = f" ({quiet} more failures)" if quiet else ""
            self.log(f"redis {self.url} unreachable: {exc.__class__.__name__}: {exc}: new "
                     f"registrations get ERROR code=unavailable until it is back{more}")

    def _back(self) -> None:
        if not self.up:
            self.up = True
            self.log(f"redis {self.url} reachable again: registering as before")

    async def take_or_wait(self, entry: Entry) -> tuple[str, Entry | None]:
        """Store ``entry`` or take the one waiting: ("waiting", None), ("paired", theirs)
        or ("replaced", theirs); for a new code ("#new"): ("waiting", None) under the
        number claimed, or ("full", None). Unavailable if Redis is."""
        try:
            if entry.session.removesuffix(V6_KEY) == "#new":
                family = entry.session.removeprefix("#new")  # "" or V6_KEY
                n = await self._new(keys=[], args=[entry.encode(), int(self.wait_max_s),
                                                   NAMEPLATE_MAX, family])
                if not n:
                    return "full", None
                entry = Entry(entry.broker, entry.conn, f"#{n}{family}", entry.public,
                              entry.local, entry.facts)
                self._hold(entry)  # (its number: self.waiting[conn].session)
                self._back()
                return "waiting", None
            verdict, theirs = await self._take(
                keys=[session_key(entry.session)],
                args=[entry.encode(), int(self.wait_max_s), str(entry.public)])
        except self._errors as exc:
            self.down(exc)
            raise Unavailable(str(exc)) from None
        self._back()
        if verdict in ("waiting", "replaced"):
            self._hold(entry)
        return verdict, Entry.decode(theirs) if theirs else None

    def _hold(self, entry: Entry) -> None:
        self.waiting[entry.conn] = Held(session_key(entry.session), entry.encode(),
                                        time.monotonic(), entry.session, entry.public.ip)
        self.per_ip[entry.public.ip] = self.per_ip.get(entry.public.ip, 0) + 1

    def hold_again(self, conn: int, held: Held) -> None:
        """``conn`` waits again under ``held`` (its pairing after an outage fell through):
        stored in Redis again on the next tick of the alive loop."""
        self.waiting[conn] = held
        self.per_ip[held.ip] = self.per_ip.get(held.ip, 0) + 1
        self.restore_needed = True

    def paired(self, conn: int) -> Held | None:
        """``conn`` no longer waits (paired, or gone): its entry is no longer ours."""
        held = self.waiting.pop(conn, None)
        if held is not None:
            left = self.per_ip.get(held.ip, 1) - 1
            if left > 0:
                self.per_ip[held.ip] = left
            else:
                self.per_ip.pop(held.ip, None)
        return held

    def restore(self, entry: Entry) -> None:
        """Put back an entry taken for a client that left meanwhile (if nobody took its
        place)."""
        self._queue("restore", json.dumps([session_key(entry.session), entry.encode()]))

    def forget(self, conn: int) -> None:
        """``conn`` closed: its waiting entry goes, and a pair's owner elsewhere is told."""
        held = self.paired(conn)
        if held is not None:
            self._queue("delete", json.dumps([held.key, held.value]))
        owner = self.owner_of.pop(conn, None)
        if owner is not None:
            self.publish(owner, bus_from("gone", self.id, conn))

    async def alive(self, broker: str) -> bool:
        """Does ``broker``'s alive key exist (False if Redis fails)?"""
        try:
            return bool(await self.redis.exists(alive_key(broker)))
        except self._errors as exc:
            self.down(exc)
            return False

    async def deliver(self, broker: str, messages: list[str]) -> bool:
        """Publish now (not through the outbox) on ``broker``'s channel: False if nobody
        listens there (that broker is gone) or Redis failed."""
        try:
            for message in messages:
                if not await self.redis.publish(channel(broker), message):
                    return False
        except self._errors as exc:
            self.down(exc)
            return False
        return True

    def step(self, conn: int, verb: str) -> None:
        self.publish(self.owner_of[conn], bus_from("step", self.id, conn, verb))

    def publish(self, broker: str, message: str) -> None:
        self._queue(channel(broker), message)

    def _queue(self, target: str, message: str) -> None:
        try:
            self._outbox.put_nowait((target, message))
        except asyncio.QueueFull:
            self.down(RuntimeError("outbox full"))

    def expire(self, now: float) -> list[int]:
        """Our waiting clients past the wait (their keys expired in Redis already)."""
        stale = [c for c, held in self.waiting.items() if now - held.since > self.wait_max_s]
        for c in stale:
            self.paired(c)
        return stale

    async def _send(self) -> None:
        """Publish in order (a PEER is never overtaken by its GO)."""
        while True:
            target, message = await self._outbox.get()
            try:
                if target == "delete":
                    key, value = json.loads(message)
                    await self._delete_if(keys=[key], args=[value])
                elif target == "restore":
                    key, value = json.loads(message)
                    await self.redis.set(key, value, ex=int(self.wait_max_s), nx=True)
                else:
                    await self.redis.publish(target, message)
            except self._errors as exc:
                self.down(exc)

    async def _alive(self) -> None:
        """Renew the alive key; after an outage (Redis restarted empty), store the waiting
        entries again, so that our waiting clients can still be found."""
        while True:
            await asyncio.sleep(ALIVE_EVERY_S)
            try:
                await self.redis.set(alive_key(self.id), "1", ex=ALIVE_TTL_S)
                if self.restore_needed:
                    await self._restore_all()
            except self._errors as exc:
                self.down(exc)
                continue
            self._back()

    async def _restore_all(self) -> None:
        """Store each of our waiting entries again (RESTORE); a client of the same session
        that registered meanwhile is paired with ours (``on_restored``). Raises Redis's
        errors: the pass is then made again whole, on the next tick."""
        self.restore_needed = False
        try:
            for conn, held in list(self.waiting.items()):
                if self.waiting.get(conn) is not held:
                    continue  # paired or gone while we awaited
                left = int(self.wait_max_s - (time.monotonic() - held.since)) + 1
                verdict, theirs = await self._restore(
                    keys=[held.key], args=[held.value, max(1, left), held.value.split(" ")[1]])
                if verdict in ("paired", "superseded") and self.waiting.get(conn) is held:
                    await self._on_restored(conn, verdict, Entry.decode(theirs))
        except BaseException:
            self.restore_needed = True
            raise

    async def _listen(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(channel(self.id))
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=1.0)
                    if message is not None:
                        self._deliver(message.get("data"))
            except self._errors as exc:
                self.down(exc)
            finally:
                with contextlib.suppress(*self._errors):
                    await pubsub.aclose()
            await asyncio.sleep(RETRY_EVERY_S)

    def _deliver(self, data: object) -> None:
        try:
            message = json.loads(data) if isinstance(data, str) else None
        except json.JSONDecodeError:
            message = None
        if not isinstance(message, dict):
            self.log(f"redis: ignored a bus message that is not ours: {str(data)[:80]!r}")
            return
        self._on_bus(message)

    async def _leave(self) -> None:
        """Our entries and alive key go: nobody is paired with a client we no longer hold."""
        for held in self.waiting.values():
            await self._delete_if(keys=[held.key], args=[held.value])
        await self.redis.delete(alive_key(self.id))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a task stuck in the client's clean-up is left behind
            await asyncio.wait(self._tasks, timeout=CLOSE_WAIT_S)
        with contextlib.suppress(*self._errors):
            await asyncio.wait_for(self._leave(), CLOSE_WAIT_S)
        with contextlib.suppress(*self._errors):
            await asyncio.wait_for(self.redis.aclose(), CLOSE_WAIT_S)
