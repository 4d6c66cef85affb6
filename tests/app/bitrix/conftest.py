"""Fixtures of the narrow transport and client tests: a mocked portal, an HTTP session, a portal's
settings and a recording limiter (helpers in tests/support/mocked_portal.py)."""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from app.portal_config import PortalConfig
from tests.support.mocked_portal import BASE, FakeLimiter, MockedPortal


@pytest.fixture
def mocked() -> Iterator[MockedPortal]:
    with MockedPortal() as m:
        yield m


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def config() -> PortalConfig:
    return PortalConfig(name="acme", domain="acme.bitrix24.com", rest_url=BASE, application_token="tok",
                        rate_limit={"per_second": 2.0, "burst": 50})


@pytest.fixture
def limiter() -> FakeLimiter:
    return FakeLimiter()
