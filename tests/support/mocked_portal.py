"""A portal mocked with aioresponses, for the narrow tests of the transport and the client
(tests/app/bitrix/test_transport.py, test_client.py): a webhook URL, replies, and a limiter that records."""
from __future__ import annotations

import json
import types
from typing import Any

import aiohttp
from aioresponses import CallbackResult, aioresponses
from yarl import URL

from app.bitrix.transport import RetryPolicy

WEBHOOK_CODE = "s3cretc0de"
BASE = f"https://acme.bitrix24.com/rest/1/{WEBHOOK_CODE}/"
NEW_BASE = f"https://acme-new.bitrix24.com/rest/1/{WEBHOOK_CODE}/"
FAST = RetryPolicy(attempts=3, base=0.001, cap=0.002)
TIME = {"start": 1766047124.1, "finish": 1766047124.2, "duration": 0.1, "processing": 0.05,
        "date_start": "2025-12-18T10:38:44+03:00", "date_finish": "2025-12-18T10:38:44+03:00"}


class MockResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds responses without `stream_writer`, which aiohttp 3.14 requires."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", types.SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


class MockedPortal(aioresponses):
    def add(self, url: Any, method: str = "GET", *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.setdefault("response_class", MockResponse)
        super().add(url, method, *args, **kwargs)


def reply(payload: Any = None, status: int = 200, **kwargs: Any) -> CallbackResult:
    return CallbackResult(status=status, payload=payload, response_class=MockResponse, **kwargs)


class FakeLimiter:
    """Records what the client asks of the rate limiter; never waits."""

    def __init__(self) -> None:
        self.acquired: list[tuple[str, float, int]] = []
        self.slowed: list[tuple[str, int]] = []

    async def acquire(self, portal: str, per_second: float, burst: int, reserve: int = 0) -> None:
        self.acquired.append((portal, per_second, burst))

    async def try_take(self, portal: str, per_second: float, burst: int, reserve: int = 0) -> float:
        await self.acquire(portal, per_second, burst, reserve)
        return 0.0

    async def slow_down(self, portal: str, burst: int) -> None:
        self.slowed.append((portal, burst))


class StopAfter(FakeLimiter):
    """A limiter that ends the test after `n` requests instead of letting the client loop on."""

    class TooManyRequests(Exception):
        pass

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    async def acquire(self, portal: str, per_second: float, burst: int, reserve: int = 0) -> None:
        await super().acquire(portal, per_second, burst)
        if len(self.acquired) > self.n:
            raise self.TooManyRequests(f"{len(self.acquired)} requests")


def sent(mocked: aioresponses, url: str) -> list[Any]:
    """The JSON bodies POSTed to `url`, in order."""
    return [body_of(call.kwargs) for call in mocked.requests.get(("POST", URL(url)), [])]


def body_of(request: dict[str, Any]) -> Any:
    """A request's JSON body, sent as such."""
    assert request["headers"]["Content-Type"] == "application/json"
    return json.loads(request["data"])


def total_requests(mocked: aioresponses) -> int:
    return sum(len(calls) for calls in mocked.requests.values())


def error_body(code: Any, description: str) -> dict[str, Any]:
    return {"error": code, "error_description": description}
