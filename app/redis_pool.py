"""redis-py's connection pool with a cheaper check before each connection is lent out.

Before lending a pooled connection, redis-py 5 makes sure nothing is left unread on it (a reply a
cancelled command never read, or the server having closed it) by reading from the socket under a
zero timeout: the read starts, and the loop's next turn cancels it. That read can only find what the
loop has already received, and it costs about a third of a short command's CPU in a worker
(`python -m benchmarks.redis_pool`). Looking at what was received finds the same without it; only a
connection where something was found gets redis-py's own check, which reconnects it.
"""
from __future__ import annotations

from typing import Any

from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import SentinelConnectionPool


class QuickCheckout:
    """Mixed into a redis-py asyncio pool ahead of it."""

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        await connection.connect()
        if _has_something_unread(connection):
            await super().ensure_connection(connection)  # type: ignore[misc]


class QuickCheckoutPool(QuickCheckout, ConnectionPool):
    pass


class QuickCheckoutSentinelPool(QuickCheckout, SentinelConnectionPool):
    pass


async def with_quick_checkout(redis: Redis) -> None:
    """Give a client the same pool it has (same connection class and options), checking quickly."""
    built = redis.connection_pool
    if isinstance(built, QuickCheckout):
        return
    options: dict[str, Any] = dict(built.connection_kwargs)
    redis.connection_pool = QuickCheckoutPool(connection_class=built.connection_class,
                                              max_connections=built.max_connections, **options)
    await built.disconnect()


def _has_something_unread(connection: Any) -> bool:
    stream, parser = connection._reader, connection._parser
    if stream is None or stream.at_eof() or not connection._socket_is_empty():
        return True
    # Bytes of a reply already read off the socket wait in hiredis' reader; with another parser, ask redis-py.
    return not isinstance(parser, _AsyncHiredisParser) or bool(parser._reader.has_data())
