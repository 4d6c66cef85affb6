"""RestClient: the only code that builds portal URLs and reads portal answers."""
from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson

from app.bitrix.budget import MethodBudget
from app.bitrix.errors import (
    B24Error,
    ConfigError,
    MethodBlocked,
    RateLimited,
    TokenExpired,
    TransientError,
    error_for,
)
from app.bitrix.oauth import OAuthSession
from app.bitrix.portal import PortalConfig
from app.bitrix.query import http_build_query
from app.bitrix.ratelimit import RateLimiter

if TYPE_CHECKING:
    from app.bitrix.sharing import SharedBatches

log = logging.getLogger(__name__)

BATCH_LIMIT = 50  # commands per batch call (b24restdocs: settings/how-to-call-rest-api/batch.md)
PAGE_SIZE = 50
MAX_MOVES = 2  # a portal that moved redirects once; more is a loop
JSON_BODY = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Answer:
    result: Any
    total: int | None = None
    next: int | None = None
    time: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    method: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CommandResult:
    command: Command
    result: Any = None
    error: B24Error | None = None
    total: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter."""

    attempts: int = 5
    base: float = 0.5
    cap: float = 8.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap, self.base * 2**attempt))


class RestClient:
    """Calls one portal through its inbound webhook, within its request limit.

    Reads are retried on transient failures. A write is re-sent only after the portal refused it
    for the rate limit (then nothing ran); after a 5xx or a timeout the caller re-reads instead.
    """

    def __init__(self, session: aiohttp.ClientSession, portal: PortalConfig, limiter: RateLimiter,
                 *, retry: RetryPolicy = RetryPolicy(), timeout: float = 30.0, low_priority: bool = False,
                 budget: MethodBudget | None = None, oauth: OAuthSession | None = None,
                 shared: SharedBatches | None = None) -> None:
        self._session = session
        self.portal = portal
        self._limiter = limiter
        self._retry = retry
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # An application calls the portal's own address, never an endpoint named in an event's payload.
        self._base = portal.rest_url.get_secret_value() if portal.rest_url else f"https://{portal.domain}/rest/"
        self._oauth = oauth
        self._token = ""
        # Low-priority work (backfill) leaves half the burst to live events.
        self._reserve = portal.rate_limit.burst // 2 if low_priority else 0
        self._budget = budget
        self._shared = shared
        self.requests = 0
        # For metrics: (method, outcome, via); via "request" is one HTTP request, "batch" a command in one.
        self.calls: Counter[tuple[str, str, str]] = Counter()

    async def call(self, method: str, params: dict[str, Any] | None = None, *, write: bool = False,
                   uses: Sequence[str] = ()) -> Answer:
        """Call a method; `uses` names the methods a batch runs, whose time budgets it spends."""
        payload = params or {}
        if self._budget:
            await self._budget.check(uses or [method])
        refreshed = False
        for attempt in range(self._retry.attempts):
            try:
                answer = await self._send(method, await self._authorised(payload))
                self.calls[(method, "ok", "request")] += 1
                if self._budget and method != "batch":
                    await self._budget.note(method, answer.time)
                return answer
            except MethodBlocked as blocked:
                if self._budget:
                    await self._budget.block(blocked.method)
                raise
            except TokenExpired:
                if self._oauth is None or refreshed:
                    raise
                await self._oauth.refresh(self._token)  # the token the portal refused
                refreshed = True
                continue
            except RateLimited:
                await self._limiter.slow_down(self.portal.name, self.portal.rate_limit.burst)
                if attempt + 1 == self._retry.attempts:
                    raise
            except TransientError:
                if write or attempt + 1 == self._retry.attempts:
                    raise
            await asyncio.sleep(self._retry.delay(attempt))
        raise AssertionError("unreachable")

    async def batch(self, commands: Sequence[Command], *, write: bool = False,
                    halt: bool = False) -> list[CommandResult]:
        """Run commands in `batch` calls of at most 50; results keep the commands' order.

        With `halt` the portal stops at the first failing command (of each call of 50): the ones after
        it come back as NOT_RUN errors. Commands that fit one call may travel with other jobs' commands
        of the same kind (`SharedBatches`).
        """
        if self._shared is not None and len(commands) < BATCH_LIMIT:
            return await self._shared.batch(self, commands, write=write, halt=halt)
        return await self.send_batch(commands, write=write, halt=halt)

    async def send_batch(self, commands: Sequence[Command], *, write: bool = False,
                         halt: bool = False) -> list[CommandResult]:
        """`batch`, sent by this client now."""
        results: list[CommandResult] = []
        for start in range(0, len(commands), BATCH_LIMIT):
            chunk = commands[start:start + BATCH_LIMIT]
            cmd = {f"c{i}": f"{c.method}?{http_build_query(c.params)}" for i, c in enumerate(chunk)}
            answer = await self.call("batch", {"halt": int(halt), "cmd": cmd}, write=write,
                                     uses=[c.method for c in chunk])
            unpacked = _unpack_batch(chunk, answer.result)
            for result in unpacked:
                self.calls[(result.command.method, str(result.error.code) if result.error else "ok", "batch")] += 1
            await self._note_batch_times(chunk, answer.result)
            blocked = next((r.error for r in unpacked if isinstance(r.error, MethodBlocked)), None)
            if blocked is not None:
                if self._budget:
                    await self._budget.block(blocked.method)
                raise blocked
            results.extend(unpacked)
        return results

    async def _authorised(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self._oauth is None:
            return payload
        self._token = (await self._oauth.tokens()).access_token
        return {**payload, "auth": self._token}

    async def _note_batch_times(self, chunk: Sequence[Command], result: Any) -> None:
        """Each command inside a batch spends its own method's budget; its `result_time` says how much."""
        times = result.get("result_time") if isinstance(result, dict) else None
        if self._budget and isinstance(times, dict):
            for i, command in enumerate(chunk):
                await self._budget.note(command.method, times.get(f"c{i}"))

    async def list_all(self, method: str, filter: dict[str, Any] | None = None,
                       select: Sequence[str] = (), *, after_id: int = 0) -> list[dict[str, Any]]:
        """Every row of a list, in the fast form: ordered by ID, `>ID` paging, no count query."""
        rows: list[dict[str, Any]] = []
        while True:
            page = (await self.call(method, fast_page(filter, select, after_id))).result or []
            rows.extend(page)
            if len(page) < PAGE_SIZE:
                return rows
            after_id = int(page[-1]["ID"])

    async def _send(self, method: str, payload: dict[str, Any], moves: int = 0) -> Answer:
        await self._limiter.acquire(self.portal.name, self.portal.rate_limit.per_second,
                                    self.portal.rate_limit.burst, self._reserve)
        self.requests += 1
        try:
            async with self._session.post(self._base + method, data=_json(payload), headers=JSON_BODY,
                                          allow_redirects=False, timeout=self._timeout) as response:
                if response.status in (301, 302, 307, 308):
                    if moves >= MAX_MOVES:
                        raise ConfigError(method, "PORTAL_MOVED", "the portal keeps redirecting",
                                          hint="Check the portal's address and update rest_url.")
                    self._follow_move(method, response.headers.get("Location", ""))
                    return await self._send(method, payload, moves + 1)
                body = await response.read()
                try:
                    return _answer(method, response.status, body)
                except B24Error as exc:
                    self.calls[(method, str(exc.code) or "error", "request")] += 1
                    raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.calls[(method, "NETWORK_ERROR", "request")] += 1
            # str(exc) may hold the URL, and with it the webhook code: keep only the kind of failure.
            raise TransientError(method, "NETWORK_ERROR", type(exc).__name__,
                                 hint="The portal could not be reached; the job retries by itself.") from None

    def _follow_move(self, method: str, location: str) -> None:
        """The portal's address changed: re-send to the new host, never follow a POST blindly."""
        new = urlsplit(location)
        old = urlsplit(self._base)
        if new.scheme not in ("https", old.scheme) or not new.netloc or new.netloc == old.netloc:
            raise ConfigError(method, "PORTAL_MOVED", "the portal answered with an unusable redirect",
                              hint="Check the portal's address and update rest_url.")
        log.warning("portal %s moved to %s; update its rest_url", self.portal.name, new.netloc)
        self._base = urlunsplit((new.scheme, new.netloc, old.path, "", ""))


def fast_page(filter: dict[str, Any] | None, select: Sequence[str], after_id: int) -> dict[str, Any]:
    params: dict[str, Any] = {"order": {"ID": "ASC"}, "filter": {**(filter or {}), ">ID": after_id}, "start": -1}
    if select:
        params["select"] = list(select)
    return params


def _json(payload: dict[str, Any]) -> bytes:
    # orjson: the portal's answers are decoded with it too (a quarter of the stdlib's CPU a batch).
    return orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS)


def _answer(method: str, status: int, body: bytes) -> Answer:
    try:
        data = orjson.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        # A proxy or an overloaded portal answers with an HTML page.
        raise TransientError(method, "UNEXPECTED_ANSWER", f"HTTP {status} with a body that is not JSON",
                             status=status, hint="The portal or a proxy in front of it failed; retrying later.")
    if "error" in data:
        raise error_for(method, data["error"], data.get("error_description"), status)
    if status >= 400:
        raise error_for(method, "", f"HTTP {status}", status)
    return Answer(data.get("result"), _int_or_none(data.get("total")), _int_or_none(data.get("next")),
                  data.get("time") or {})


def _unpack_batch(chunk: Sequence[Command], result: Any) -> list[CommandResult]:
    # Empty sections arrive as [] rather than {}.
    def section(name: str) -> dict[str, Any]:
        value = (result or {}).get(name) if isinstance(result, dict) else None
        return value if isinstance(value, dict) else {}

    results, errors, totals = section("result"), section("result_error"), section("result_total")
    out = []
    for i, command in enumerate(chunk):
        key = f"c{i}"
        if key in errors:
            err = errors[key] if isinstance(errors[key], dict) else {}
            error = error_for(command.method, err.get("error"), err.get("error_description"))
            out.append(CommandResult(command, error=error))
        elif key in results:
            out.append(CommandResult(command, result=results[key], total=_int_or_none(totals.get(key))))
        else:
            out.append(CommandResult(command, error=TransientError(command.method, "NOT_RUN",
                                                                   "the batch did not run this command")))
    return out


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
