"""redis-py's asyncio connection pool, with two costs of each command taken out.

A worker sends a few hundred commands a second, most of them short; two things redis-py's asyncio
client does for every one of them cost more than the command itself (`python -m benchmarks.redis_pool`):

- **The check before a pooled connection is lent.** redis-py 5 makes sure nothing is left unread on it
  (a reply a cancelled command never read, or the server having closed it) by reading from the
  socket under a zero timeout: the read starts, and the loop's next turn cancels it. That read only
  finds what the loop has already received; looking at what was received finds the same without
  it. Only a connection where something was found gets redis-py's own check, which reconnects it.
- **Packing a command.** The asyncio client packs in Python, joining the buffer again for every
  argument: ~45 µs for the job record's save (28 arguments). redis-py's sync client packs with
  hiredis' C packer (`HiredisRespSerializer`), byte for byte the same; here the asyncio one does too.
"""
from __future__ import annotations

import functools
from typing import Any

from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

_PACKER = HiredisRespSerializer()


class LeanConnections:
    """Mixed into a redis-py asyncio pool ahead of it."""

    connection_class: type[AbstractConnection]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection_class = _packing_in_c(self.connection_class)

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        await connection.connect()
        if _has_something_unread(connection):
            await super().ensure_connection(connection)  # type: ignore[misc]


class LeanPool(LeanConnections, ConnectionPool):
    pass


class LeanSentinelPool(LeanConnections, SentinelConnectionPool):
    pass


class _PackingInC:
    def pack_command(self, *args: Any) -> list[bytes]:
        return _PACKER.pack(*args)


@functools.cache
def _packing_in_c(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """The pool's own connection class (plain, TLS, unix socket, sentinel-managed), packing in C."""
    if issubclass(connection_class, _PackingInC) or not HIREDIS_AVAILABLE:  # without hiredis: as redis-py packs
        return connection_class
    return type(connection_class.__name__, (_PackingInC, connection_class), {})


def _has_something_unread(connection: Any) -> bool:
    stream, parser = connection._reader, connection._parser
    if stream is None or stream.at_eof() or not connection._socket_is_empty():
        return True
    # Bytes of a reply already read off the socket wait in hiredis' reader; with another parser, ask redis-py.
    return not isinstance(parser, _AsyncHiredisParser) or bool(parser._reader.has_data())
