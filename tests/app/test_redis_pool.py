"""The quick checkout lends a clean connection without reading from it, and still mends a dirty one.

Against a real Redis: a connection the server closed, and one with a reply nobody read, must each be
replaced before the next command uses them, as redis-py's own (slower) check does.
"""
from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.connection import AbstractConnection

from app.queue import connect
from app.redis_pool import QuickCheckout


async def test_the_service_connects_with_the_quick_checkout(redis_url: str) -> None:
    redis = await connect(redis_url)
    try:
        assert isinstance(redis.connection_pool, QuickCheckout)
        assert await redis.ping()
    finally:
        await redis.aclose()


async def test_a_clean_connection_is_lent_without_reading_from_it(redis_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    zero_timeout_reads = 0
    original = AbstractConnection.can_read_destructive

    async def counted(self: AbstractConnection) -> bool:
        nonlocal zero_timeout_reads
        zero_timeout_reads += 1
        return await original(self)

    redis = await connect(redis_url)
    monkeypatch.setattr(AbstractConnection, "can_read_destructive", counted)
    try:
        await redis.set("b24test:quick", "1")
        assert [await redis.get("b24test:quick") for _ in range(20)] == [b"1"] * 20
        assert zero_timeout_reads == 0
    finally:
        await redis.delete("b24test:quick")
        await redis.aclose()


async def test_a_connection_the_server_closed_is_replaced_before_use(redis_url: str) -> None:
    redis, other = await connect(redis_url), await connect(redis_url)
    try:
        lent = await redis.client_id()  # the pool's only connection, now idle in the pool
        assert await other.client_kill_filter(_id=lent) == 1
        await asyncio.sleep(0.05)  # the loop receives the server's close
        assert await redis.ping()
        assert await redis.client_id() != lent
    finally:
        await redis.aclose()
        await other.aclose()


async def test_a_reply_nobody_read_does_not_answer_the_next_command(redis_url: str) -> None:
    redis = await connect(redis_url)
    try:
        await redis.set("b24test:answer", "the right one")
        pool = redis.connection_pool
        connection = await pool.get_connection()
        await connection.send_command("PING")  # a command cancelled before it read its reply
        await pool.release(connection)
        await asyncio.sleep(0.05)  # the reply arrives and waits, unread
        assert await redis.get("b24test:answer") == b"the right one"
    finally:
        await redis.delete("b24test:answer")
        await redis.aclose()
