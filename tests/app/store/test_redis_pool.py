"""The service's Redis pool: clean connections lent without a read, dirty ones mended, commands packed in C.

Against a real Redis: a connection the server closed, and one with a reply nobody read, must each be
replaced before the next command uses them, as redis-py's own (slower) check does; commands packed
by hiredis must be byte for byte what redis-py's own packer makes.
"""
from __future__ import annotations

import asyncio

import hiredis
import pytest
from redis.asyncio.connection import AbstractConnection, Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from app.store.bundled_redis import BundledRedis
from app.store.jobs import JobRecord, JobStore
from app.store.queue import connect
from app.store.redis_pool import LeanConnections, LeanPool


async def test_the_service_connects_through_the_lean_pool(redis_url: str) -> None:
    redis = await connect(redis_url)
    try:
        assert isinstance(redis.connection_pool, LeanConnections)
        assert await redis.ping()
    finally:
        await redis.aclose()


async def test_commands_are_packed_by_hiredis(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    packed: list[tuple[object, ...]] = []
    pack = hiredis.pack_command

    def counted(args: tuple[object, ...]) -> bytes:
        packed.append(args)
        return pack(args)

    monkeypatch.setattr(hiredis, "pack_command", counted)
    redis = await connect(redis_url)
    try:
        await redis.get("b24test:packed")
        assert packed[-1] == (b"GET", "b24test:packed")
    finally:
        await redis.aclose()


async def test_the_bundled_redis_is_reached_over_its_socket_through_the_lean_pool(
        private_redis: BundledRedis) -> None:
    redis = await connect(private_redis.url)
    try:
        assert issubclass(redis.connection_pool.connection_class, UnixDomainSocketConnection)
        await redis.set("b24test:socket", "ünïcode")
        assert (await redis.get("b24test:socket")).decode() == "ünïcode"
    finally:
        await redis.aclose()


@pytest.mark.parametrize("args", [
    ("GET", "b24test:key"),
    ("SET", "k", 1766000000.5, "EX", 300, "NX"),
    ("HINCRBYFLOAT", "b24:metrics", "rest_requests|portal=ünï", 1e-05),
    ("EVAL", "return 1", 2, "k1", b"k2\x00\xff", 10**20, -3, float("inf")),
    ("CLIENT KILL", "ID", 7),  # a two-word command name, split as redis-py splits it
])
def test_commands_are_packed_byte_for_byte_as_redis_py_packs_them(args: tuple[object, ...]) -> None:
    lean = LeanPool().connection_class()
    assert b"".join(lean.pack_command(*args)) == b"".join(Connection().pack_command(*args))


@pytest.mark.parametrize("bad", [True, None, [1]])
def test_a_value_redis_cannot_take_is_refused_as_redis_py_refuses_it(bad: object) -> None:
    with pytest.raises(DataError):
        LeanPool().connection_class().pack_command("SET", "k", bad)


async def test_a_job_record_saved_through_the_lean_pool_reads_back_the_same(redis_url: str) -> None:
    redis = await connect(redis_url)
    store = JobStore(redis, 600)
    record = JobRecord.for_event("acme", "ONCRMACTIVITYADD", 42, "1766000000")
    try:
        await store.save(record)
        assert await store.get(record.id) == record
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
