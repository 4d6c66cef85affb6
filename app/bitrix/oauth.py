"""Application (OAuth) mode: tokens from ONAPPINSTALL, kept in Redis, refreshed one at a time.

An access token lives an hour and a refresh token 180 days. The portal's advice is to refresh when a
call answers `expired_token` rather than on a timer; a token known to be past its expiry is
refreshed before the call instead of spending a request to learn it. Every worker shares the tokens,
so only one refreshes (a Redis lock) while the others wait for its result.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import aiohttp
from pydantic import BaseModel
from redis.asyncio import Redis

from app.bitrix.errors import ConfigError, TransientError
from app.portal_config import PortalConfig
from app.store.namespace import prefixed

log = logging.getLogger(__name__)

REFRESH_LOCK_SECONDS = 30
EARLY = 60  # refresh a token that expires within this many seconds


class AppTokens(BaseModel):
    access_token: str
    refresh_token: str
    expires_at: float
    client_endpoint: str
    application_token: str = ""
    member_id: str = ""


class TokenStore:
    """One application's tokens per portal, in Redis."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def load(self, portal: str) -> AppTokens | None:
        raw = await self._redis.get(prefixed(f"b24:oauth:{portal}"))
        return AppTokens.model_validate_json(raw) if raw else None

    async def save(self, portal: str, tokens: AppTokens) -> None:
        await self._redis.set(prefixed(f"b24:oauth:{portal}"), tokens.model_dump_json())

    @staticmethod
    def from_install(auth: dict[str, Any]) -> AppTokens:
        """The tokens an ONAPPINSTALL event carries in its `auth` block."""
        return AppTokens(access_token=str(auth["access_token"]), refresh_token=str(auth["refresh_token"]),
                         expires_at=time.time() + float(auth.get("expires_in") or 3600),
                         client_endpoint=str(auth["client_endpoint"]),
                         application_token=str(auth.get("application_token", "")),
                         member_id=str(auth.get("member_id", "")))


class OAuthSession:
    """Gives RestClient a valid access token and the portal's REST address; refreshes when asked."""

    def __init__(self, http: aiohttp.ClientSession, redis: Redis, portal: PortalConfig) -> None:
        self._http = http
        self._redis = redis
        self._store = TokenStore(redis)
        self._portal = portal
        self.refreshes = 0

    async def tokens(self) -> AppTokens:
        tokens = await self._store.load(self._portal.name)
        if tokens is None:
            raise ConfigError("oauth", "NOT_INSTALLED", f"the application is not installed on {self._portal.domain}",
                              hint="Install the application on the portal; its ONAPPINSTALL event brings the tokens.")
        if tokens.expires_at - time.time() < EARLY:
            tokens = await self.refresh(tokens.access_token)
        return tokens

    async def refresh(self, stale_access_token: str) -> AppTokens:
        """Refresh once across all workers: whoever takes the lock refreshes, the others wait for it."""
        lock = prefixed(f"b24:oauth:{self._portal.name}:refreshing")
        token = secrets.token_hex(8)
        deadline = time.monotonic() + REFRESH_LOCK_SECONDS
        while time.monotonic() < deadline:
            current = await self._store.load(self._portal.name)
            if current is not None and current.access_token != stale_access_token:
                return current  # someone else refreshed already
            if await self._redis.set(lock, token, nx=True, ex=REFRESH_LOCK_SECONDS):
                try:
                    return await self._refresh_now(current)
                finally:
                    await self._redis.delete(lock)
            await asyncio.sleep(0.05)
        raise TransientError("oauth", "REFRESH_TIMEOUT", "another process did not finish refreshing the token")

    async def _refresh_now(self, current: AppTokens | None) -> AppTokens:
        if current is None:
            raise ConfigError("oauth", "NOT_INSTALLED", "no tokens to refresh", hint="Install the application again.")
        params = {"grant_type": "refresh_token", "client_id": self._portal.client_id or "",
                  "client_secret": self._portal.client_secret.get_secret_value() if self._portal.client_secret else "",
                  "refresh_token": current.refresh_token}
        try:
            async with self._http.get(self._portal.oauth_url, params=params,
                                      timeout=aiohttp.ClientTimeout(total=30)) as response:
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            raise TransientError("oauth", "REFRESH_FAILED", "the OAuth server could not be reached") from None
        if not isinstance(answer, dict) or "access_token" not in answer:
            code = str(answer.get("error", "")) if isinstance(answer, dict) else ""
            raise ConfigError("oauth", code or "REFRESH_REFUSED", "the OAuth server refused the refresh token",
                              hint="The refresh token is invalid or older than 180 days: reinstall the application.")
        self.refreshes += 1
        fresh = current.model_copy(update={
            "access_token": str(answer["access_token"]), "refresh_token": str(answer["refresh_token"]),
            "expires_at": time.time() + float(answer.get("expires_in") or 3600),
            "client_endpoint": str(answer.get("client_endpoint") or current.client_endpoint)})
        await self._store.save(self._portal.name, fresh)
        log.info("refreshed the access token of portal %s", self._portal.name)
        return fresh
