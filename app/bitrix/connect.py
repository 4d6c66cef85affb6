"""The one way to build a portal's client, for jobs, undo, backfill, `rules explain` and `doctor` alike.

Built anywhere else, a client misses what the worker's has: an application (OAuth) portal's tokens,
which the portal wants on every call, and the request budget every process of an installation shares.
"""
from __future__ import annotations

import aiohttp
from redis.asyncio import Redis

from app.bitrix.budget import BudgetReads, MethodBudget
from app.bitrix.client import RestClient, RetryPolicy
from app.bitrix.oauth import OAuthSession
from app.bitrix.portal import PortalConfig
from app.bitrix.ratelimit import LocalRateLimiter, RateLimiter
from app.bitrix.sharing import SharedBatches


def portal_client(http: aiohttp.ClientSession, portal: PortalConfig, redis: Redis | None, *,
                  limiter: RateLimiter | None = None, retry: RetryPolicy = RetryPolicy(), timeout: float = 30.0,
                  low_priority: bool = False, budget_reads: BudgetReads | None = None,
                  shared: SharedBatches | None = None) -> RestClient:
    """A client for `portal`. With Redis: the installation's shared request budget (or `limiter`), the
    methods' time budgets, and for an application its tokens, refreshed once for every process. Without
    (a webhook portal, read by a tool that needs no Redis): a budget of this process's own."""
    if redis is None:
        if portal.auth == "oauth":
            raise ValueError(f"portal {portal.name} is an application, whose tokens are in Redis: pass Redis")
        # LocalRateLimiter stands in for RateLimiter (same acquire), for one process's reads
        return RestClient(http, portal, LocalRateLimiter(), retry=retry, timeout=timeout,  # type: ignore[arg-type]
                          low_priority=low_priority, shared=shared)
    return RestClient(http, portal, limiter or RateLimiter(redis), retry=retry, timeout=timeout,
                      low_priority=low_priority, shared=shared,
                      budget=MethodBudget(redis, portal.name, portal.operating_budget, budget_reads or BudgetReads()),
                      oauth=OAuthSession(http, redis, portal) if portal.auth == "oauth" else None)
