"""Typing help for redis-py 5's asyncio client.

redis-py 5 types each command's result as `Awaitable[T] | T`, one annotation for its sync and async
clients; the asyncio client always returns the awaitable. `awaited` says so to the type checker
without a cast at every call. (redis-py 6 types its asyncio client properly; arq <0.29 keeps us on 5.)
"""
from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def awaited(reply: Awaitable[T] | T) -> T:
    return await reply if inspect.isawaitable(reply) else reply
