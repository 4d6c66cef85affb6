"""PortalTransport: one request to one portal, start to finish.

It takes the request's turn in the portal's rate limiter (shared in Redis by every process), builds the
URL (an application's own address, never one named in an event), adds the OAuth token, posts the JSON,
follows a portal that moved (once), decodes the answer with orjson and sorts a failure through the
error table (`app/bitrix/errors.py`). A failure the table calls transient is tried again with redis-py's
full-jitter backoff (`redis.backoff.FullJitterBackoff`): a read after any of them, a write only after
the portal refused it for its rate limit (then nothing ran). Packing commands into `batch` calls is
the batcher's (`app/bitrix/batcher.py`).
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
from redis.backoff import FullJitterBackoff

from app.bitrix.budget import MethodBudget
from app.bitrix.commands import Answer, Meter
from app.bitrix.errors import B24Error, ConfigError, MethodBlocked, RateLimited, TokenExpired, TransientError, error_for
from app.bitrix.oauth import OAuthSession
from app.portal_config import PortalConfig

log = logging.getLogger(__name__)

MAX_MOVES = 2  # a portal that moved redirects once; more is a loop
JSON_BODY = {"Content-Type": "application/json"}
REQUEST_TIMEOUT = 60.0  # the portal lets a request run up to 60 s (docs: limits.md); giving up sooner abandons work it still does


@dataclass(frozen=True)
class RetryPolicy:
    """How often a request is tried, and the bounds of redis-py's full-jitter backoff between tries."""

    attempts: int = 5
    base: float = 0.5
    cap: float = 8.0

    def backoff(self) -> FullJitterBackoff:
        return FullJitterBackoff(cap=self.cap, base=self.base)


class Limiter(Protocol):
    async def acquire(self, portal: str, per_second: float, burst: int, reserve: int = 0) -> None: ...
    async def try_take(self, portal: str, per_second: float, burst: int, reserve: int = 0) -> float: ...
    async def slow_down(self, portal: str, burst: int) -> None: ...


class PortalTransport:
    """Sends one portal's requests, one at a time each (see the module's docstring)."""

    def __init__(self, http: aiohttp.ClientSession, portal: PortalConfig, limiter: Limiter, *,
                 retry: RetryPolicy = RetryPolicy(), timeout: float = REQUEST_TIMEOUT,
                 budget: MethodBudget | None = None, oauth: OAuthSession | None = None) -> None:
        self._http = http
        self.portal = portal
        self.limiter = limiter
        self._retry = retry
        self._backoff = retry.backoff()
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # An application calls the portal's own address, never an endpoint named in an event's payload.
        self._base = portal.rest_url.get_secret_value() if portal.rest_url else f"https://{portal.domain}/rest/"
        self._oauth = oauth
        self._token = ""
        self.budget = budget
        self.requests = 0
        self.calls: Counter[tuple[str, str, str]] = Counter()  # request outcomes, for metrics (`take_calls`)

    def take_calls(self) -> Counter[tuple[str, str, str]]:
        """Request outcomes since the last take: each request counted once, whichever jobs it carried."""
        calls, self.calls = self.calls, Counter()
        return calls

    async def request(self, method: str, payload: dict[str, Any], *, write: bool, meters: Sequence[Meter],
                      acquired: bool = False, reserve: int = 0) -> Answer:
        """One request, tried again as its kind allows (see the module's docstring). `acquired`: the
        caller already took the first try's turn in the rate limiter."""
        refreshed = False
        for attempt in range(self._retry.attempts):
            try:
                if not acquired:
                    await self.limiter.acquire(self.portal.name, self.portal.rate_limit.per_second,
                                               self.portal.rate_limit.burst, reserve)
                acquired = False
                return await self._answered(method, payload, meters)
            except MethodBlocked as blocked:
                raise await self._blocked(blocked) from None
            except TokenExpired:
                if self._oauth is None or refreshed:
                    raise
                await self._oauth.refresh(self._token)  # the token the portal refused
                refreshed = True
                continue
            except RateLimited:
                await self.limiter.slow_down(self.portal.name, self.portal.rate_limit.burst)
                if attempt + 1 == self._retry.attempts:
                    raise
            except TransientError:
                if write or attempt + 1 == self._retry.attempts:
                    raise
            await asyncio.sleep(self._backoff.compute(attempt))
        raise AssertionError("unreachable")

    async def _answered(self, method: str, payload: dict[str, Any], meters: Sequence[Meter]) -> Answer:
        answer = await self._send(method, await self._authorised(payload), meters)
        self.calls[(method, "ok", "request")] += 1
        if self.budget and method != "batch":
            await self.budget.note(method, answer.time)
        return answer

    async def _blocked(self, blocked: MethodBlocked) -> MethodBlocked:
        """A 429 on `batch` itself (portals that charge a batch's time to `batch`) blocks every call until
        the reset, as for any other method: the jobs are deferred, not failed."""
        until = await self.budget.block(blocked.method, blocked.retry_at) if self.budget else None
        return MethodBlocked(blocked.method, blocked.code, blocked.description, retry_at=until, status=blocked.status)

    async def _authorised(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self._oauth is None:
            return payload
        self._token = (await self._oauth.tokens()).access_token
        return {**payload, "auth": self._token}

    async def _send(self, method: str, payload: dict[str, Any], meters: Sequence[Meter], moves: int = 0) -> Answer:
        self.requests += 1
        for meter in meters:
            meter.requests += 1
        try:
            async with self._http.post(self._base + method, data=_json(payload), headers=JSON_BODY,
                                       allow_redirects=False, timeout=self._timeout) as response:
                if response.status in (301, 302, 307, 308):
                    if moves >= MAX_MOVES:
                        raise ConfigError(method, "PORTAL_MOVED", "the portal keeps redirecting",
                                          hint="Check the portal's address and update rest_url.")
                    self._follow_move(method, response.headers.get("Location", ""))
                    return await self._send(method, payload, meters, moves + 1)
                body = await response.read()
                try:
                    return answer_of(method, response.status, body)
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


def _json(payload: dict[str, Any]) -> bytes:
    # orjson: the portal's answers are decoded with it too (a quarter of the stdlib's CPU a batch).
    return orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS)


def answer_of(method: str, status: int, body: bytes) -> Answer:
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
    return Answer(data.get("result"), int_or_none(data.get("total")), int_or_none(data.get("next")),
                  data.get("time") or {})


def int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
