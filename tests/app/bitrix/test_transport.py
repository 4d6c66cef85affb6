"""PortalTransport: one request to a mocked portal: answers, the error table, retries with redis-py's
backoff, secrets kept out of errors, portal moves. The batcher's tests are test_batcher.py's."""
from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from app.bitrix.commands import Answer, Meter
from app.bitrix.errors import ConfigError, PermanentError, RateLimited, TransientError
from app.bitrix.transport import PortalTransport, RetryPolicy
from app.portal_config import PortalConfig
from tests.support.mocked_portal import (
    BASE,
    FAST,
    NEW_BASE,
    TIME,
    WEBHOOK_CODE,
    FakeLimiter,
    MockedPortal,
    StopAfter,
    error_body,
    sent,
    total_requests,
)


class OneRequest:
    """A job's view of the transport: one method, one request (and its tries), counted on its meter."""

    def __init__(self, transport: PortalTransport) -> None:
        self.transport, self.meter = transport, Meter()

    @property
    def requests(self) -> int:
        return self.meter.requests

    async def call(self, method: str, params: dict[str, Any] | None = None, *, write: bool = False) -> Answer:
        return await self.transport.request(method, params or {}, write=write, meters=[self.meter])


@pytest.fixture
def client(session: aiohttp.ClientSession, config: PortalConfig, limiter: FakeLimiter) -> OneRequest:
    return OneRequest(PortalTransport(session, config, limiter, retry=FAST))


def test_the_backoff_between_tries_is_redis_pys_full_jitter_within_its_bounds() -> None:
    backoff = RetryPolicy(attempts=5, base=0.5, cap=8.0).backoff()
    for failures, bound in ((0, 0.5), (1, 1.0), (3, 4.0), (6, 8.0)):
        delays = [backoff.compute(failures) for _ in range(200)]
        assert all(0 <= d <= bound for d in delays) and max(delays) > bound / 4


async def test_success_returns_result_total_next_and_time(client: OneRequest, mocked: MockedPortal,
                                                          limiter: FakeLimiter) -> None:
    rows = [{"ID": "1"}, {"ID": "2"}]
    mocked.post(BASE + "crm.activity.list",
                payload={"result": rows, "total": "120", "next": 50, "time": TIME})

    answer = await client.call("crm.activity.list", {"filter": {"OWNER_ID": 5}})

    assert answer == Answer(rows, 120, 50, TIME)
    assert sent(mocked, BASE + "crm.activity.list") == [{"filter": {"OWNER_ID": 5}}]
    assert limiter.acquired == [("acme", 2.0, 50)]  # one slot per request, from the portal's own limit
    assert client.requests == 1


async def test_answer_without_total_or_next(client: OneRequest, mocked: MockedPortal) -> None:
    mocked.post(BASE + "crm.activity.binding.add", payload={"result": True, "time": TIME})

    answer = await client.call("crm.activity.binding.add", {"activityId": 1}, write=True)

    assert answer == Answer(True, None, None, TIME)


async def test_numeric_error_100_is_permanent_with_code_100(client: OneRequest, mocked: MockedPortal) -> None:
    mocked.post(BASE + "crm.activity.binding.add", status=400,
                payload=error_body(100, "Could not find value for parameter {activityId}"))

    with pytest.raises(PermanentError) as caught:
        await client.call("crm.activity.binding.add", {"entityTypeId": 3})

    assert caught.value.code == "100"
    assert caught.value.status == 400
    assert caught.value.method == "crm.activity.binding.add"
    assert total_requests(mocked) == 1  # a refusal is not retried, even for reads


async def test_empty_code_is_told_apart_by_its_description(client: OneRequest, mocked: MockedPortal) -> None:
    mocked.post(BASE + "crm.activity.binding.move", status=400,
                payload=error_body("", "Source and target entity types are not equal"))

    with pytest.raises(PermanentError) as caught:
        await client.call("crm.activity.binding.move", {"activityId": 1}, write=True)

    assert caught.value.code == "SOURCE_AND_TARGET_ENTITY_TYPES_ARE_NOT_EQUAL_ERROR"


async def test_lower_case_expired_token_is_a_config_error(client: OneRequest, mocked: MockedPortal) -> None:
    mocked.post(BASE + "crm.lead.get", status=401,
                payload=error_body("expired_token", "The access token provided has expired"))

    with pytest.raises(ConfigError) as caught:
        await client.call("crm.lead.get", {"id": 1})

    assert caught.value.code == "EXPIRED_TOKEN"
    assert total_requests(mocked) == 1


async def test_html_502_is_transient_and_a_read_is_retried(client: OneRequest, mocked: MockedPortal) -> None:
    page = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    mocked.post(BASE + "crm.lead.get", status=502, body=page, content_type="text/html")
    mocked.post(BASE + "crm.lead.get", status=502, body=page, content_type="text/html")
    mocked.post(BASE + "crm.lead.get", payload={"result": {"ID": "7"}, "time": TIME})

    answer = await client.call("crm.lead.get", {"id": 7})

    assert answer.result == {"ID": "7"}
    assert sent(mocked, BASE + "crm.lead.get") == [{"id": 7}] * 3


async def test_html_502_gives_transient_error_when_retries_run_out(client: OneRequest, mocked: MockedPortal) -> None:
    mocked.post(BASE + "crm.lead.get", status=502, body="<html>Bad Gateway</html>", content_type="text/html",
                repeat=True)

    with pytest.raises(TransientError) as caught:
        await client.call("crm.lead.get", {"id": 7})

    assert not isinstance(caught.value, RateLimited)
    assert caught.value.status == 502
    assert total_requests(mocked) == FAST.attempts


async def test_error_status_without_an_error_field_is_an_error(client: OneRequest, mocked: MockedPortal) -> None:
    mocked.post(BASE + "crm.lead.get", status=404, payload={"result": None})

    with pytest.raises(PermanentError) as caught:
        await client.call("crm.lead.get", {"id": 7})

    assert caught.value.status == 404


async def test_a_read_is_retried_after_500(client: OneRequest, mocked: MockedPortal) -> None:
    mocked.post(BASE + "crm.activity.binding.list", status=500,
                payload=error_body("INTERNAL_SERVER_ERROR", "Internal server error"))
    mocked.post(BASE + "crm.activity.binding.list", payload={"result": [], "time": TIME})

    answer = await client.call("crm.activity.binding.list", {"activityId": 1})

    assert answer.result == []
    assert total_requests(mocked) == 2


async def test_a_write_is_not_retried_after_500(client: OneRequest, mocked: MockedPortal,
                                                limiter: FakeLimiter) -> None:
    mocked.post(BASE + "crm.activity.binding.add", status=500,
                payload=error_body("INTERNAL_SERVER_ERROR", "Internal server error"))
    mocked.post(BASE + "crm.activity.binding.add", payload={"result": True, "time": TIME})

    with pytest.raises(TransientError) as caught:
        await client.call("crm.activity.binding.add", {"activityId": 1}, write=True)

    assert caught.value.code == "INTERNAL_SERVER_ERROR"
    assert total_requests(mocked) == 1  # the add may have run: the caller re-reads instead
    assert limiter.slowed == []


async def test_a_write_is_not_retried_after_an_html_page(client: OneRequest, mocked: MockedPortal) -> None:
    mocked.post(BASE + "batch", status=504, body="<html>Gateway Timeout</html>", content_type="text/html")
    mocked.post(BASE + "batch", payload={"result": {"result": {"c0": True}}, "time": TIME})

    with pytest.raises(TransientError):
        await client.call("batch", {"halt": 0, "cmd": {"c0": "crm.activity.binding.add?activityId=1"}},
                          write=True)

    assert total_requests(mocked) == 1


async def test_a_write_is_retried_after_query_limit_exceeded(client: OneRequest, mocked: MockedPortal,
                                                             limiter: FakeLimiter) -> None:
    mocked.post(BASE + "crm.activity.binding.add", status=503,
                payload=error_body("QUERY_LIMIT_EXCEEDED", "Too many requests"))
    mocked.post(BASE + "crm.activity.binding.add", payload={"result": True, "time": TIME})

    answer = await client.call("crm.activity.binding.add",
                               {"activityId": 1, "entityTypeId": 3, "entityId": 9}, write=True)

    assert answer.result is True
    assert sent(mocked, BASE + "crm.activity.binding.add") == [
        {"activityId": 1, "entityTypeId": 3, "entityId": 9}] * 2
    assert limiter.slowed == [("acme", 50)]  # the shared bucket is told the portal refused us
    assert len(limiter.acquired) == 2


async def test_query_limit_exceeded_every_time_raises_rate_limited(client: OneRequest, mocked: MockedPortal,
                                                                   limiter: FakeLimiter) -> None:
    mocked.post(BASE + "crm.lead.get", status=503,
                payload=error_body("QUERY_LIMIT_EXCEEDED", "Too many requests"), repeat=True)

    with pytest.raises(RateLimited) as caught:
        await client.call("crm.lead.get", {"id": 1})

    assert caught.value.status == 503
    assert total_requests(mocked) == FAST.attempts
    assert len(limiter.slowed) == FAST.attempts


async def test_network_error_is_transient_and_hides_the_webhook_code(client: OneRequest, mocked: MockedPortal,
                                                                     config: PortalConfig) -> None:
    failure = aiohttp.ClientConnectionError(f"Cannot connect to host {BASE}crm.lead.get")
    mocked.post(BASE + "crm.lead.get", exception=failure, repeat=True)

    with pytest.raises(TransientError) as caught:
        await client.call("crm.lead.get", {"id": 1})

    exc = caught.value
    assert exc.code == "NETWORK_ERROR"
    assert total_requests(mocked) == FAST.attempts  # reads are retried
    shown = [str(exc), repr(exc), json.dumps(exc.as_record())]
    for secret in config.secrets():
        for text in shown:
            assert secret not in text
    assert WEBHOOK_CODE not in " ".join(shown)
    assert exc.__cause__ is None and exc.__suppress_context__


async def test_network_error_on_a_write_is_not_retried(client: OneRequest, mocked: MockedPortal) -> None:
    mocked.post(BASE + "crm.activity.binding.delete", exception=aiohttp.ServerDisconnectedError(),
                repeat=True)

    with pytest.raises(TransientError):
        await client.call("crm.activity.binding.delete", {"activityId": 1}, write=True)

    assert total_requests(mocked) == 1


async def test_wrong_webhook_is_a_config_error_without_the_code(client: OneRequest, mocked: MockedPortal) -> None:
    mocked.post(BASE + "crm.lead.get", status=401,
                payload=error_body("NO_AUTH_FOUND", "Wrong authorization data"))

    with pytest.raises(ConfigError) as caught:
        await client.call("crm.lead.get", {"id": 1})

    assert WEBHOOK_CODE not in str(caught.value)
    assert total_requests(mocked) == 1


# ---------------------------------------------------------------- portal moves (302)


@pytest.mark.parametrize("location", [
    NEW_BASE + "crm.activity.binding.add",
    "https://acme-new.bitrix24.com/",
    "https://acme-new.bitrix24.com/some/other/path?x=1",
])
async def test_a_moved_portal_gets_the_same_post_at_the_new_host(client: OneRequest, mocked: MockedPortal,
                                                                 location: str) -> None:
    body = {"activityId": 1, "entityTypeId": 3, "entityId": 9}
    mocked.post(BASE + "crm.activity.binding.add", status=302, headers={"Location": location})
    mocked.post(NEW_BASE + "crm.activity.binding.add", payload={"result": True, "time": TIME})
    mocked.post(NEW_BASE + "crm.lead.get", payload={"result": {"ID": "1"}, "time": TIME})

    answer = await client.call("crm.activity.binding.add", body, write=True)
    assert answer.result is True
    # Same method, same path with the webhook, same JSON body: a POST, not a GET from a blind follow.
    assert sent(mocked, NEW_BASE + "crm.activity.binding.add") == [body]

    await client.call("crm.lead.get", {"id": 1})
    assert sent(mocked, NEW_BASE + "crm.lead.get") == [{"id": 1}]
    assert sent(mocked, BASE + "crm.lead.get") == []  # later calls go straight to the new host
    assert client.requests == 3


@pytest.mark.parametrize("location", [
    "http://acme-new.bitrix24.com/",  # a downgrade would send the webhook code in clear text
    "ftp://acme-new.bitrix24.com/",
    "javascript:alert(1)",
    "/rest/1/other/",  # no host
    "",  # no Location at all
    BASE + "crm.lead.get",  # the same host again
])
async def test_an_unusable_redirect_is_a_config_error(client: OneRequest, mocked: MockedPortal,
                                                      location: str) -> None:
    headers = {"Location": location} if location else {}
    mocked.post(BASE + "crm.lead.get", status=301, headers=headers)

    with pytest.raises(ConfigError) as caught:
        await client.call("crm.lead.get", {"id": 1})

    assert caught.value.code == "PORTAL_MOVED"
    assert WEBHOOK_CODE not in str(caught.value)
    assert total_requests(mocked) == 1  # nothing was sent anywhere else


async def test_a_redirect_loop_ends_in_a_config_error(session: aiohttp.ClientSession,
                                                      config: PortalConfig) -> None:
    limiter = StopAfter(10)
    client = OneRequest(PortalTransport(session, config, limiter, retry=FAST))
    with MockedPortal() as mocked:
        mocked.post(BASE + "crm.lead.get", status=302, headers={"Location": "https://acme-new.bitrix24.com/"},
                    repeat=True)
        mocked.post(NEW_BASE + "crm.lead.get", status=302, headers={"Location": "https://acme.bitrix24.com/"},
                    repeat=True)

        with pytest.raises(ConfigError):
            await client.call("crm.lead.get", {"id": 1})

