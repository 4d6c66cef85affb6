"""PortalRelay: one process of the installation packs a portal's requests for every worker process.

A `PortalSession` packs the commands of its own process's jobs. With several worker processes each
would send half-empty batches of its own, and the same read (a lead's facts) asked by jobs in two
processes would be sent twice. So one process at a time *holds* the portal (a lease in Redis) and
every other process forwards its jobs' parts to it:

- the holder renews the lease (`holder` key, SET NX PX) while it runs; a process that stops gives it
  up, and a process that dies loses it after LEASE seconds, when any process with work takes it;
- a process that does not hold the portal pushes each part (a job's reads, or a write group of stages,
  with its low-priority flag and the name of its stop rule) to the portal's `inbox` list; taking the
  lease when nobody holds it and pushing are one script, so a part never waits for a holder that
  is not there;
- the holder moves parts from the inbox to the `taken` list (BLMOVE: a part is always in one of them
  until it is answered), hands them to its session, which packs them with its own jobs' commands,
  and answers each on the sender's `reply` list (one per process, read with a blocking pop on a
  connection of its own): the results, or the error, and the requests and commands that carried it,
  which the sending job's meter counts;
- a holder that stops gives every part it has not sent back to the inbox, and answers the writes
  it may have sent "fate unknown" (a TransientError: the executor re-reads and sends what is missing);
  a holder that dies leaves its parts in `taken`, and the next holder does the same with them: a
  read is sent again, a write is answered "fate unknown";
- when Redis fails, a process sends its own requests (as before the relay) and says so in one line;
  parts it waited for: the reads are sent here, the writes are answered "fate unknown";
- the keys name the portal's settings (a digest), so processes whose rules files differ on a portal
  (a change some have reloaded, others not yet) pack apart, each with its own settings; a portal idle
  for IDLE seconds is given up, so with many portals only the busy ones hold connections.

Only parts whose stop rule is registered (`stop_rule`) travel: the holder must judge the results
with the same rule, and a rule is code, so it travels by name. Anything else is sent by its own process.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.bitrix.commands import Command, CommandResult
from app.bitrix.errors import (
    B24Error,
    ConfigError,
    MethodBlocked,
    PermanentError,
    RateLimited,
    TokenExpired,
    TransientError,
)
from app.bitrix.portal import PortalConfig
from app.bitrix.session import Meter, Part, stops_group
from app.store.namespace import prefixed
from app.store.outage import describe
from app.store.replies import awaited

if TYPE_CHECKING:
    from app.bitrix.session import PortalSession

log = logging.getLogger(__name__)

LEASE = 5.0  # seconds a dead holder keeps the portal; its parts wait that long at most
RENEW_EVERY = 1.0  # seconds between renewals; also the blocking pops' timeout
REPLY_KEEP = 300  # seconds a reply list outlives its last answer (a sender that died leaves nothing)
TAKE_AT_ONCE = 200  # parts moved from the inbox in one round trip
# Seconds without a part after which a process gives the portal up (and stops listening for answers):
# with many portals, only the busy ones cost each process a blocking connection and a renewal a second.
IDLE = 30.0
MIN_REDIS = (6, 2)  # BLMOVE and LMOVE; an older Redis (Debian 11 ships 6.0) gets no relay

# Take the portal when nobody holds it; otherwise queue the part for the holder. Returns {held, holder}.
_HOLD_OR_FORWARD = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, ARGV[1]} end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, holder}
end
redis.call('LPUSH', KEYS[2], ARGV[3])
return {0, holder}
"""
# Keep the portal: renewed while it is ours, taken again if it lapsed and nobody took it meanwhile.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not holder then return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) and 1 or 0 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_TAKE_MORE = """
local taken = {}
for i = 1, tonumber(ARGV[1]) do
  local part = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not part then break end
  taken[#taken + 1] = part
end
return taken
"""
# Answer a part and forget it. With ARGV[4] = 1, only if it is still taken (nobody answered it yet).
_ANSWER = """
local removed = redis.call('LREM', KEYS[2], 1, ARGV[3])
if ARGV[4] == '1' and removed == 0 then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
# A part not sent goes back to the inbox's taking end: the next holder takes it first.
_GIVE_BACK = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then redis.call('RPUSH', KEYS[2], ARGV[1]) return 1 end
return 0
"""

STOP_RULES: dict[str, Callable[[CommandResult], bool]] = {}

_ERRORS: dict[str, type[B24Error]] = {cls.__name__: cls for cls in (
    B24Error, TransientError, RateLimited, MethodBlocked, PermanentError, ConfigError, TokenExpired)}


def stop_rule(rule: Callable[[CommandResult], bool]) -> Callable[[CommandResult], bool]:
    """Registers a write group's stop rule by name, so that groups judged by it may be sent by the holder."""
    STOP_RULES[f"{rule.__module__}.{rule.__qualname__}"] = rule
    return rule


stop_rule(stops_group)


def settings_digest(portal: PortalConfig) -> str:
    """Names the portal's settings: processes whose rules files say different things about a portal (a
    change some have reloaded and others not yet) each pack with their own kind. A digest: no secret
    reaches Redis."""
    def plain(value: Any) -> Any:
        return value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    settings = orjson.dumps(portal.model_dump(), default=plain, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(settings).hexdigest()[:16]


def fate_unknown(method: str = "batch") -> TransientError:
    return TransientError(method, "RELAY_FATE_UNKNOWN", "the process sending these writes stopped before it "
                          "answered; they may or may not have landed",
                          hint="Temporary; the job reads what landed and sends the rest.")


class PortalRelay:
    """One portal's lease and inbox, for one process's session (see the module's docstring)."""

    def __init__(self, redis: Redis, portal: PortalConfig, *, lease: float = LEASE,
                 renew_every: float = RENEW_EVERY, idle: float = IDLE) -> None:
        self._redis = redis
        self.portal = portal.name
        self.me = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        base = prefixed(f"b24:relay:{portal.name}:{settings_digest(portal)}")
        self._holder_key, self._inbox, self._taken = f"{base}:holder", f"{base}:inbox", f"{base}:taken"
        self._reply = f"{base}:reply:{self.me}"
        self._lease_ms = int(lease * 1000)
        self._renew_every = renew_every
        self._idle = idle
        self._used = time.monotonic()  # when a part of this portal last came by, from any process
        self._hold_or_forward = redis.register_script(_HOLD_OR_FORWARD)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._take_more = redis.register_script(_TAKE_MORE)
        self._answer_script = redis.register_script(_ANSWER)
        self._give_back = redis.register_script(_GIVE_BACK)
        self._session: PortalSession | None = None
        self.holding = False
        self._may_hold = True  # False once the process stops, or the portal's settings changed
        self._closed = False
        self._holder = ""  # the process parts were last forwarded to
        self._said = ""  # the last state logged: each change is one line
        # Parts of this process's jobs waiting for the holder's answer, by id.
        self._waiting: dict[str, tuple[Part, asyncio.Future[dict[str, Any]], bytes]] = {}
        # Parts this process sends for others: their entry as taken, their message, their part here.
        self._serving: dict[str, tuple[bytes, dict[str, Any], Part, asyncio.Task[None]]] = {}
        self._holding_task: asyncio.Task[None] | None = None
        self._replies_task: asyncio.Task[None] | None = None
        self._dropping: set[asyncio.Task[None]] = set()
        self.forwarded = self.served = 0
        self._redis_fits: bool | None = None  # whether Redis has what the relay needs; asked once

    async def _fits(self) -> bool:
        """Whether this Redis has the commands the holder takes parts with; an older one leaves every
        process to send its own requests (said once), rather than leave parts in an inbox nobody takes."""
        if self._redis_fits is None:
            try:
                version = str((await self._redis.info("server")).get("redis_version", "0"))
            except RedisError as exc:  # asked again next time
                self._say(f"Redis failed ({describe(exc)}); this process sends its own requests meanwhile",
                          warn=True)
                return False
            self._redis_fits = relay_fits(version)
            if not self._redis_fits:
                log.warning("portal %s: Redis %s lacks BLMOVE (6.2 and later have it): each worker process "
                            "sends its own requests, in emptier batches; upgrade Redis to pack them together",
                            self.portal, version)
        return self._redis_fits

    def attach(self, session: PortalSession) -> None:
        self._session = session

    # -------------------------------------------------------- a process that does not hold the portal

    async def forward(self, part: Part) -> list[list[CommandResult]] | None:
        """The part's results, sent by the holder; None when this process sends it (it holds the
        portal, or just took it, or Redis failed, or the part's stop rule cannot travel)."""
        self._used = time.monotonic()
        if self.holding or not self._may_hold or self._session is None or not await self._fits():
            return None
        rule = next((name for name, known in STOP_RULES.items() if known is part.stops), None)
        if rule is None:
            return None
        part_id = secrets.token_hex(8)
        entry = orjson.dumps({"id": part_id, "to": self._reply, "write": part.write, "low": part.low, "stops": rule,
                              "stages": [[[c.method, c.params, c.fields] for c in stage] for stage in part.stages]},
                             option=orjson.OPT_NON_STR_KEYS)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[part_id] = (part, future, entry)  # before the push: the answer may come at once
        try:
            held, holder = await self._hold_or_forward(keys=[self._holder_key, self._inbox],
                                                       args=[self.me, self._lease_ms, entry])
        except RedisError as exc:
            self._waiting.pop(part_id, None)
            self._say(f"Redis failed ({describe(exc)}); this process sends its own requests meanwhile", warn=True)
            return None
        if held:
            self._waiting.pop(part_id, None)
            self._start_holding()
            return None
        self.forwarded += 1
        self._holder = holder.decode() if isinstance(holder, bytes) else str(holder)
        self._say(f"sending through process {self._holder}, which holds the portal")  # said once a change
        self._listen_for_replies()
        try:
            answer = await future
        finally:
            self._waiting.pop(part_id, None)
        if answer.get("here"):
            return None
        return _results(part, answer)

    def _listen_for_replies(self) -> None:
        if self._replies_task is None or self._replies_task.done():
            self._replies_task = asyncio.create_task(self._replies())

    async def _replies(self) -> None:
        """Hands each answer to the job waiting for it; takes the portal over from a holder gone silent."""
        connection = self._redis.client()  # a blocking pop holds its connection: one of its own
        looked = time.monotonic()
        try:
            while not self._closed:
                if not self._waiting and time.monotonic() - self._used > self._idle:
                    self._replies_task = None  # the next part forwarded starts another listener
                    return
                try:
                    # Redis 6 and later take a fraction of a second; redis-py's annotation says int.
                    popped = await awaited(connection.blpop([self._reply], timeout=self._renew_every))  # type: ignore[arg-type]
                    if popped:
                        more = await awaited(connection.lpop(self._reply, TAKE_AT_ONCE)) or []
                        for raw in [popped[1], *more]:
                            with contextlib.suppress(ValueError):  # not an answer this version reads
                                self._answered(orjson.loads(raw))
                    if self._waiting and time.monotonic() - looked >= self._renew_every:
                        looked = time.monotonic()
                        await self._take_over_if_nobody_holds()
                except RedisError as exc:
                    self._say(f"Redis failed ({describe(exc)}) while this process waited for the holder's "
                              "answers; it sends its own requests meanwhile", warn=True)
                    for part_id, (part, future, _) in list(self._waiting.items()):
                        if not future.done():  # a read is sent here; a write may have landed
                            future.set_result({"id": part_id, "here": True} if not part.write else
                                              {"id": part_id, "error": _error_record(fate_unknown())})
                    await asyncio.sleep(self._renew_every)
        finally:
            with contextlib.suppress(Exception):
                await connection.aclose()

    def _answered(self, answer: dict[str, Any]) -> None:
        waiting = self._waiting.get(str(answer.get("id")))
        if waiting is not None and not waiting[1].done():  # a part answered twice (read again after a
            waiting[1].set_result(answer)  # takeover) counts once

    async def _take_over_if_nobody_holds(self) -> None:
        if self.holding or await awaited(self._redis.exists(self._holder_key)):
            return
        if self._may_hold:
            if await self._redis.set(self._holder_key, self.me, nx=True, px=self._lease_ms):
                self._start_holding()
            return
        # Retired (the portal's settings changed): parts nobody took yet come back and are sent here.
        for part_id, (_, future, entry) in list(self._waiting.items()):
            if await awaited(self._redis.lrem(self._inbox, 1, entry.decode())) and not future.done():
                future.set_result({"id": part_id, "here": True})

    # -------------------------------------------------------- the holder

    def _start_holding(self) -> None:
        if self.holding or not self._may_hold:
            return
        self.holding = True
        self._holder = self.me
        self._holding_task = asyncio.create_task(self._hold())

    async def _hold(self) -> None:
        """Takes parts from the inbox while this process holds the portal, renewing its lease."""
        self._say("this process sends the portal's requests for every worker process")
        connection = self._redis.client()
        renewed = time.monotonic()
        try:
            await self._recover()
            while self._may_hold:
                try:
                    if time.monotonic() - renewed >= self._renew_every:
                        if not await self._renew(keys=[self._holder_key], args=[self.me, self._lease_ms]):
                            self._say("another process took the portal over (this one was silent too long)",
                                      warn=True)
                            self._drop_unsent()
                            return
                        renewed = time.monotonic()
                    first = await awaited(connection.blmove(self._inbox, self._taken, self._renew_every,  # type: ignore[arg-type]
                                                            "RIGHT", "LEFT"))
                    if first is None:
                        if not self._serving and time.monotonic() - self._used > self._idle:
                            await self._release(keys=[self._holder_key], args=[self.me])
                            self._say("the portal was idle; this process gave it up (the next process "
                                      "with work for it takes it)")
                            return
                        continue
                    entries = [first, *(await self._take_more(keys=[self._inbox, self._taken],
                                                              args=[TAKE_AT_ONCE]))]
                    if not self._may_hold:  # handing over: taken after it began, given back untouched
                        for entry in entries:
                            await self._give_back(keys=[self._taken, self._inbox], args=[entry])
                        return
                    for entry in entries:
                        self._serve(entry)
                except RedisError as exc:
                    self._say(f"Redis failed ({describe(exc)}) while this process held the portal; "
                              "it goes on when Redis is back", warn=True)
                    await asyncio.sleep(self._renew_every)
        except RedisError:
            pass  # recovering failed: the parts stay taken, for this or the next holder
        finally:
            self.holding = False
            with contextlib.suppress(Exception):
                await connection.aclose()

    def _drop_unsent(self) -> None:
        """The portal was taken over: the new holder found the parts taken here unanswered and sends the
        reads again (the writes it answered 'fate unknown'), so those not sent yet are not sent here too."""
        for _, _, part, task in list(self._serving.values()):
            if not _may_have_gone(part):
                part.done.cancel()
                task.cancel()

    async def _recover(self) -> None:
        """Parts a holder that is gone had taken but not answered: reads go back to the inbox, writes
        are answered 'fate unknown'."""
        sent_again = unknown = 0
        for entry in await awaited(self._redis.lrange(self._taken, 0, -1)):
            message = orjson.loads(entry)
            if message["id"] in self._serving:
                continue
            if message["write"]:
                answer = orjson.dumps({"id": message["id"], "error": _error_record(fate_unknown()),
                                       **_counts(Meter())})
                unknown += await self._answer_script(keys=[message["to"], self._taken],
                                                     args=[answer, REPLY_KEEP, entry, 1])
            else:
                sent_again += await self._give_back(keys=[self._taken, self._inbox], args=[entry])
        if sent_again or unknown:
            log.warning("portal %s: took over from a sender that stopped without answering: %d reads sent again, "
                        "%d write groups reported of unknown fate (their jobs read what landed)",
                        self.portal, sent_again, unknown)

    def _serve(self, entry: bytes) -> None:
        try:
            message = orjson.loads(entry)
            part_id = str(message["id"])
            stops = STOP_RULES.get(message["stops"])
            stages = [[Command(method, params, tuple(fields)) for method, params, fields in stage]
                      for stage in message["stages"]]
            part = Part(Meter(), stages, write=bool(message["write"]), low=bool(message["low"]), stops=stops)
        except (ValueError, KeyError, TypeError) as exc:  # not a part this version can read: said, not kept
            log.warning("portal %s: dropped a part this process cannot read (%s); its job retries when its "
                        "time is up", self.portal, type(exc).__name__)
            task = asyncio.create_task(self._drop(entry))
            self._dropping.add(task)
            task.add_done_callback(self._dropping.discard)
            return
        self._used = time.monotonic()
        if part_id in self._serving:
            return
        if stops is None:  # a rule this process does not know (another version): its sender sends it
            task = asyncio.create_task(self._answer(entry, message, {"id": part_id, "here": True}))
        else:
            task = asyncio.create_task(self._send_for(entry, message, part))
        self.served += 1
        self._serving[part_id] = (entry, message, part, task)
        task.add_done_callback(lambda _: self._serving.pop(part_id, None))

    async def _drop(self, entry: bytes) -> None:
        with contextlib.suppress(RedisError):
            await awaited(self._redis.lrem(self._taken, 1, entry.decode(errors="replace")))

    async def _send_for(self, entry: bytes, message: dict[str, Any], part: Part) -> None:
        assert self._session is not None
        answer: dict[str, Any] = {"id": message["id"]}
        try:
            results = await self._session.send_here(part)
            answer["results"] = [[[r.result, _error_record(r.error) if r.error else None, r.total, r.next]
                                  for r in stage] for stage in results]
        except asyncio.CancelledError:
            raise  # handed over: `close` gave the part back or answered it
        except Exception as exc:  # the sender learns it as if it had sent alone
            answer["error"] = _error_record(exc)
        await self._answer(entry, message, {**answer, **_counts(part.meter)})

    async def _answer(self, entry: bytes, message: dict[str, Any], answer: dict[str, Any]) -> None:
        try:
            await self._answer_script(keys=[message["to"], self._taken],
                                      args=[orjson.dumps(answer), REPLY_KEEP, entry, 0])
        except RedisError as exc:  # its sender, waiting on Redis too, learns that Redis failed
            self._say(f"Redis failed ({describe(exc)}) answering another process's part", warn=True)

    # -------------------------------------------------------- stopping

    async def close(self) -> None:
        """The process stops: its jobs' parts are no longer waited for (the jobs are being stopped), and
        the portal is handed over."""
        if self._closed:
            return
        self._closed = True
        if self._replies_task is not None:
            self._replies_task.cancel()
            await asyncio.gather(self._replies_task, return_exceptions=True)
        for _, future, _ in self._waiting.values():
            future.cancel()
        await self._hand_over()

    async def retire(self) -> None:
        """The rules file changed the portal: a session with its new settings takes it over; this one
        sends only the parts of the jobs that started before (its own answers still come)."""
        await self._hand_over()

    async def _hand_over(self) -> None:
        """Parts this process sends for others go back (or are answered 'fate unknown' when they may
        have been sent), and the portal is free for another process at once."""
        if not self._may_hold:
            return
        self._may_hold = False
        if self._holding_task is not None:  # ends within a pop's timeout; no part is left half-taken
            await asyncio.wait([self._holding_task], timeout=self._renew_every + 1.0)
            self._holding_task.cancel()
            await asyncio.gather(self._holding_task, return_exceptions=True)
        served = list(self._serving.values())
        verdicts = [(entry, message, part.write and _may_have_gone(part)) for entry, message, part, _ in served]
        for _, _, part, task in served:
            part.done.cancel()
            task.cancel()
        await asyncio.gather(*(task for *_, task in served), return_exceptions=True)
        given = unknown = 0
        try:
            for entry, message, gone in verdicts:
                if gone:
                    await self._answer(entry, message, {"id": message["id"],
                                                        "error": _error_record(fate_unknown()), **_counts(Meter())})
                    unknown += 1
                else:
                    given += await self._give_back(keys=[self._taken, self._inbox], args=[entry])
            await self._release(keys=[self._holder_key], args=[self.me])
        except RedisError as exc:  # the lease lapses instead, and the next holder finds the parts taken
            log.warning("portal %s: could not hand the portal over (%s); another process takes it within %.0f s",
                        self.portal, describe(exc), self._lease_ms / 1000)
            return
        if served or self._holding_task is not None:
            log.info("portal %s: handed over to the other processes: %d parts given back, %d write groups "
                     "answered of unknown fate", self.portal, given, unknown)

    def _say(self, what: str, *, warn: bool = False) -> None:
        if what != self._said:
            self._said = what
            log.log(logging.WARNING if warn else logging.INFO, "portal %s: %s", self.portal, what)


def relay_fits(redis_version: str) -> bool:
    """Whether a Redis of this version (`INFO server`'s `redis_version`) has what the relay needs."""
    try:
        major, minor = (int(n) for n in (redis_version.split(".") + ["0"])[:2])
    except ValueError:
        return False
    return (major, minor) >= MIN_REDIS


def _may_have_gone(part: Part) -> bool:
    """Whether any command of a write group was handed to a call (then its fate is unknown)."""
    return bool(part.out or (part.stage, part.sent) != (0, 0)
                or any(r is not None for stage in part.results for r in stage))


def _counts(meter: Meter) -> dict[str, Any]:
    return {"requests": meter.requests, "commands": meter.commands,
            "calls": [[method, outcome, via, n] for (method, outcome, via), n in meter.calls.items()]}


def _results(part: Part, answer: dict[str, Any]) -> list[list[CommandResult]]:
    """The holder's answer as the sending job's results; what it cost goes on the job's meter."""
    meter = part.meter
    meter.requests += int(answer.get("requests", 0))
    meter.commands += int(answer.get("commands", 0))
    for method, outcome, via, n in answer.get("calls", []):
        meter.calls[(method, outcome, via)] += n
    if answer.get("error"):
        raise _error_of(answer["error"])
    return [[CommandResult(command, result=result, error=_error_of(error) if error else None, total=total, next=next_)
             for command, (result, error, total, next_) in zip(stage, results)]
            for stage, results in zip(part.stages, answer["results"])]


def _error_record(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, B24Error):
        return {"kind": type(exc).__name__, "method": exc.method, "code": exc.code, "description": exc.description,
                "status": exc.status, "hint": exc.hint, "retry_at": getattr(exc, "retry_at", None)}
    # Not the portal's answer (the limiter's Redis failed, say): a passing failure, its kind only.
    return {"kind": "TransientError", "method": "batch", "code": "SENDER_FAILED", "description": type(exc).__name__,
            "status": None, "hint": "Temporary; the job retries by itself."}


def _error_of(record: dict[str, Any]) -> B24Error:
    kind = _ERRORS.get(str(record.get("kind")), TransientError)
    method, code, description = str(record["method"]), str(record["code"]), str(record["description"])
    if kind is MethodBlocked:
        return MethodBlocked(method, code, description, retry_at=record.get("retry_at"), status=record.get("status"))
    return kind(method, code, description, status=record.get("status"), hint=str(record.get("hint") or ""))
