"""Typed keys for what the web application holds."""
from __future__ import annotations

from aiohttp import web
from arq.connections import ArqRedis

from app.live_rules import LiveRules
from app.settings import Settings
from app.store.jobs import JobStore
from app.store.outage import RedisOutage
from app.store.queue import JobQueue

settings_key = web.AppKey("settings", Settings)
rules_key = web.AppKey("rules", LiveRules)
redis_key = web.AppKey("redis", ArqRedis)
queue_key = web.AppKey("queue", JobQueue)
store_key = web.AppKey("store", JobStore)
outage_key = web.AppKey("redis_outage", RedisOutage)  # the web process's view of Redis
