"""Fixtures for the fake portal's tests: a portal with no rate limit, a client session, and `call`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from app.fakeportal import FakePortal


@pytest.fixture
async def portal() -> AsyncIterator[FakePortal]:
    fake = FakePortal(per_second=None)
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def call(
    session: aiohttp.ClientSession, portal: FakePortal, method: str, params: dict[str, Any] | None = None
) -> tuple[int, Any]:
    async with session.post(portal.rest_url + method, json=params or {}) as response:
        return response.status, await response.json()
