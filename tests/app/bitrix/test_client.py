"""RestClient: answers, errors, retries, portal moves and batches, against mocked and fake portals."""
from __future__ import annotations

import json
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses
from arq.connections import ArqRedis
from pydantic import SecretStr
from yarl import URL

from app.bitrix.client import Answer, Command, RestClient, RetryPolicy, fast_page, unpack_batch
from app.bitrix.errors import (
    POLICIES,
    ConfigError,
    PermanentError,
    Policy,
    RateLimited,
    TransientError,
    policy_for,
)
from app.portal_config import PortalConfig
from app.bitrix.query import http_build_query
from app.bitrix.ratelimit import RateLimiter
from app.fakeportal import COMPANY, CONTACT, DEAL, LEAD, FakePortal
from app.fakeportal import parse_php_query as fake_parse_php_query

WEBHOOK_CODE = "s3cretc0de"
BASE = f"https://acme.bitrix24.com/rest/1/{WEBHOOK_CODE}/"
NEW_BASE = f"https://acme-new.bitrix24.com/rest/1/{WEBHOOK_CODE}/"
FAST = RetryPolicy(attempts=3, base=0.001, cap=0.002)
TIME = {"start": 1766047124.1, "finish": 1766047124.2, "duration": 0.1, "processing": 0.05,
        "date_start": "2025-12-18T10:38:44+03:00", "date_finish": "2025-12-18T10:38:44+03:00"}


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds responses without `stream_writer`, which aiohttp 3.14 requires."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", types.SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


class _Mock(aioresponses):
    def add(self, url: Any, method: str = "GET", *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.setdefault("response_class", _Response)
        super().add(url, method, *args, **kwargs)


def reply(payload: Any = None, status: int = 200, **kwargs: Any) -> CallbackResult:
    return CallbackResult(status=status, payload=payload, response_class=_Response, **kwargs)


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


@pytest.fixture
def mocked() -> Iterator[_Mock]:
    with _Mock() as m:
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


@pytest.fixture
def client(session: aiohttp.ClientSession, config: PortalConfig, limiter: FakeLimiter) -> RestClient:
    return RestClient(session, config, limiter, retry=FAST)  # type: ignore[arg-type]


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


# ---------------------------------------------------------------- single calls


async def test_success_returns_result_total_next_and_time(client: RestClient, mocked: _Mock,
                                                          limiter: FakeLimiter) -> None:
    rows = [{"ID": "1"}, {"ID": "2"}]
    mocked.post(BASE + "crm.activity.list",
                payload={"result": rows, "total": "120", "next": 50, "time": TIME})

    answer = await client.call("crm.activity.list", {"filter": {"OWNER_ID": 5}})

    assert answer == Answer(rows, 120, 50, TIME)
    assert sent(mocked, BASE + "crm.activity.list") == [{"filter": {"OWNER_ID": 5}}]
    assert limiter.acquired == [("acme", 2.0, 50)]  # one slot per request, from the portal's own limit
    assert client.requests == 1


async def test_answer_without_total_or_next(client: RestClient, mocked: _Mock) -> None:
    mocked.post(BASE + "crm.activity.binding.add", payload={"result": True, "time": TIME})

    answer = await client.call("crm.activity.binding.add", {"activityId": 1}, write=True)

    assert answer == Answer(True, None, None, TIME)


async def test_numeric_error_100_is_permanent_with_code_100(client: RestClient, mocked: _Mock) -> None:
    mocked.post(BASE + "crm.activity.binding.add", status=400,
                payload=error_body(100, "Could not find value for parameter {activityId}"))

    with pytest.raises(PermanentError) as caught:
        await client.call("crm.activity.binding.add", {"entityTypeId": 3})

    assert caught.value.code == "100"
    assert caught.value.status == 400
    assert caught.value.method == "crm.activity.binding.add"
    assert total_requests(mocked) == 1  # a refusal is not retried, even for reads


async def test_empty_code_is_told_apart_by_its_description(client: RestClient, mocked: _Mock) -> None:
    mocked.post(BASE + "crm.activity.binding.move", status=400,
                payload=error_body("", "Source and target entity types are not equal"))

    with pytest.raises(PermanentError) as caught:
        await client.call("crm.activity.binding.move", {"activityId": 1}, write=True)

    assert caught.value.code == "SOURCE_AND_TARGET_ENTITY_TYPES_ARE_NOT_EQUAL_ERROR"


async def test_lower_case_expired_token_is_a_config_error(client: RestClient, mocked: _Mock) -> None:
    mocked.post(BASE + "crm.lead.get", status=401,
                payload=error_body("expired_token", "The access token provided has expired"))

    with pytest.raises(ConfigError) as caught:
        await client.call("crm.lead.get", {"id": 1})

    assert caught.value.code == "EXPIRED_TOKEN"
    assert total_requests(mocked) == 1


async def test_html_502_is_transient_and_a_read_is_retried(client: RestClient, mocked: _Mock) -> None:
    page = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    mocked.post(BASE + "crm.lead.get", status=502, body=page, content_type="text/html")
    mocked.post(BASE + "crm.lead.get", status=502, body=page, content_type="text/html")
    mocked.post(BASE + "crm.lead.get", payload={"result": {"ID": "7"}, "time": TIME})

    answer = await client.call("crm.lead.get", {"id": 7})

    assert answer.result == {"ID": "7"}
    assert sent(mocked, BASE + "crm.lead.get") == [{"id": 7}] * 3


async def test_html_502_gives_transient_error_when_retries_run_out(client: RestClient, mocked: _Mock) -> None:
    mocked.post(BASE + "crm.lead.get", status=502, body="<html>Bad Gateway</html>", content_type="text/html",
                repeat=True)

    with pytest.raises(TransientError) as caught:
        await client.call("crm.lead.get", {"id": 7})

    assert not isinstance(caught.value, RateLimited)
    assert caught.value.status == 502
    assert total_requests(mocked) == FAST.attempts


async def test_error_status_without_an_error_field_is_an_error(client: RestClient, mocked: _Mock) -> None:
    mocked.post(BASE + "crm.lead.get", status=404, payload={"result": None})

    with pytest.raises(PermanentError) as caught:
        await client.call("crm.lead.get", {"id": 7})

    assert caught.value.status == 404


async def test_a_read_is_retried_after_500(client: RestClient, mocked: _Mock) -> None:
    mocked.post(BASE + "crm.activity.binding.list", status=500,
                payload=error_body("INTERNAL_SERVER_ERROR", "Internal server error"))
    mocked.post(BASE + "crm.activity.binding.list", payload={"result": [], "time": TIME})

    answer = await client.call("crm.activity.binding.list", {"activityId": 1})

    assert answer.result == []
    assert total_requests(mocked) == 2


async def test_a_write_is_not_retried_after_500(client: RestClient, mocked: _Mock,
                                                limiter: FakeLimiter) -> None:
    mocked.post(BASE + "crm.activity.binding.add", status=500,
                payload=error_body("INTERNAL_SERVER_ERROR", "Internal server error"))
    mocked.post(BASE + "crm.activity.binding.add", payload={"result": True, "time": TIME})

    with pytest.raises(TransientError) as caught:
        await client.call("crm.activity.binding.add", {"activityId": 1}, write=True)

    assert caught.value.code == "INTERNAL_SERVER_ERROR"
    assert total_requests(mocked) == 1  # the add may have run: the caller re-reads instead
    assert limiter.slowed == []


async def test_a_write_is_not_retried_after_an_html_page(client: RestClient, mocked: _Mock) -> None:
    mocked.post(BASE + "batch", status=504, body="<html>Gateway Timeout</html>", content_type="text/html")
    mocked.post(BASE + "batch", payload={"result": {"result": {"c0": True}}, "time": TIME})

    with pytest.raises(TransientError):
        await client.call("batch", {"halt": 0, "cmd": {"c0": "crm.activity.binding.add?activityId=1"}},
                          write=True)

    assert total_requests(mocked) == 1


async def test_a_write_is_retried_after_query_limit_exceeded(client: RestClient, mocked: _Mock,
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


async def test_query_limit_exceeded_every_time_raises_rate_limited(client: RestClient, mocked: _Mock,
                                                                   limiter: FakeLimiter) -> None:
    mocked.post(BASE + "crm.lead.get", status=503,
                payload=error_body("QUERY_LIMIT_EXCEEDED", "Too many requests"), repeat=True)

    with pytest.raises(RateLimited) as caught:
        await client.call("crm.lead.get", {"id": 1})

    assert caught.value.status == 503
    assert total_requests(mocked) == FAST.attempts
    assert len(limiter.slowed) == FAST.attempts


async def test_network_error_is_transient_and_hides_the_webhook_code(client: RestClient, mocked: _Mock,
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


async def test_network_error_on_a_write_is_not_retried(client: RestClient, mocked: _Mock) -> None:
    mocked.post(BASE + "crm.activity.binding.delete", exception=aiohttp.ServerDisconnectedError(),
                repeat=True)

    with pytest.raises(TransientError):
        await client.call("crm.activity.binding.delete", {"activityId": 1}, write=True)

    assert total_requests(mocked) == 1


async def test_wrong_webhook_is_a_config_error_without_the_code(client: RestClient, mocked: _Mock) -> None:
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
async def test_a_moved_portal_gets_the_same_post_at_the_new_host(client: RestClient, mocked: _Mock,
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
async def test_an_unusable_redirect_is_a_config_error(client: RestClient, mocked: _Mock,
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
    client = RestClient(session, config, limiter, retry=FAST)  # type: ignore[arg-type]
    with _Mock() as mocked:
        mocked.post(BASE + "crm.lead.get", status=302, headers={"Location": "https://acme-new.bitrix24.com/"},
                    repeat=True)
        mocked.post(NEW_BASE + "crm.lead.get", status=302, headers={"Location": "https://acme.bitrix24.com/"},
                    repeat=True)

        with pytest.raises(ConfigError):
            await client.call("crm.lead.get", {"id": 1})


# ---------------------------------------------------------------- batch


def test_unpack_batch_maps_results_and_errors_by_key_in_order() -> None:
    commands = [Command("crm.activity.binding.add", {"activityId": i}) for i in range(5)]
    result = {
        # PHP may send the keys in any order; mapping is by key.
        "result": {"c4": True, "c2": True, "c0": [{"ID": "1"}]},
        "result_error": {"c3": {"error": 100, "error_description": "Could not find value"},
                         "c1": {"error": "ACTIVITY_IS_ALREADY_BOUND", "error_description": "bound"}},
        "result_total": {"c0": 1},
        "result_next": [],
        "result_time": [],
    }

    out = unpack_batch(commands, result)

    assert [r.command for r in out] == commands
    assert [r.ok for r in out] == [True, False, True, False, True]
    assert out[0].result == [{"ID": "1"}] and out[0].total == 1
    assert out[2].result is True and out[2].total is None
    assert type(out[1].error) is PermanentError and out[1].error.code == "ACTIVITY_IS_ALREADY_BOUND"
    assert policy_for(out[1].error.code).policy is Policy.DONE
    assert type(out[3].error) is PermanentError and out[3].error.code == "100"
    assert out[3].error.method == "crm.activity.binding.add"


def test_unpack_batch_copes_with_empty_sections_as_arrays() -> None:
    commands = [Command("crm.lead.get", {"id": 1}), Command("crm.lead.get", {"id": 2})]

    ok = unpack_batch(commands, {"result": {"c0": {"ID": "1"}, "c1": {"ID": "2"}}, "result_error": [],
                                  "result_total": [], "result_next": [], "result_time": []})
    assert [r.result for r in ok] == [{"ID": "1"}, {"ID": "2"}]
    assert all(r.ok for r in ok)

    failed = unpack_batch(commands, {"result": [], "result_error": {
        "c0": {"error": "NOT_FOUND", "error_description": "Not found"},
        "c1": {"error": "", "error_description": "Access denied."}}, "result_total": []})
    assert [r.error.code for r in failed if r.error] == ["NOT_FOUND", "ACCESS_DENIED"]


def test_unpack_batch_marks_commands_that_did_not_run() -> None:
    # With halt=1, or a cut-short answer, some keys are in no section at all.
    commands = [Command("crm.lead.get", {"id": i}) for i in range(3)]

    out = unpack_batch(commands, {"result": {"c0": {"ID": "0"}}, "result_error": {
        "c1": {"error": "INTERNAL_SERVER_ERROR", "error_description": "x"}}})

    assert out[0].ok
    assert type(out[1].error) is TransientError
    assert isinstance(out[2].error, TransientError) and out[2].error.code == "NOT_RUN"
    assert [r.command for r in unpack_batch(commands, [])] == commands
    assert all(isinstance(r.error, TransientError) for r in unpack_batch(commands, None))


def _answer_batch(url: URL, **kwargs: Any) -> CallbackResult:
    """A portal's batch: each `crm.lead.get?id=N` returns {"ID": "N"}; odd ids fail with NOT_FOUND."""
    cmd = body_of(kwargs)["cmd"]
    results: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    for key, command in cmd.items():
        method, _, query = command.partition("?")
        lead_id = int(dict(parse_qsl(query))["id"])
        if lead_id % 2:
            errors[key] = error_body("NOT_FOUND", "Not found")
        else:
            results[key] = {"ID": str(lead_id), "METHOD": method}
    return reply({"result": {"result": results or [], "result_error": errors or [], "result_total": [],
                             "result_next": [], "result_time": []}, "time": TIME})


async def test_batch_splits_120_commands_into_three_calls_and_keeps_order(client: RestClient,
                                                                          mocked: _Mock) -> None:
    mocked.post(BASE + "batch", callback=_answer_batch, repeat=True)
    commands = [Command("crm.lead.get", {"id": i}) for i in range(120)]

    results = await client.batch(commands)

    bodies = sent(mocked, BASE + "batch")
    assert [len(body["cmd"]) for body in bodies] == [50, 50, 20]
    assert all(body["halt"] == 0 for body in bodies)
    sent_commands = [c for body in bodies for c in body["cmd"].values()]
    assert sent_commands == [f"crm.lead.get?id={i}" for i in range(120)]
    assert [r.command for r in results] == commands
    for i, result in enumerate(results):
        if i % 2:
            assert result.error is not None and result.error.code == "NOT_FOUND", i
        else:
            assert result.result == {"ID": str(i), "METHOD": "crm.lead.get"}, i


async def test_batch_of_exactly_50_is_one_call_and_empty_batch_is_none(client: RestClient,
                                                                       mocked: _Mock) -> None:
    mocked.post(BASE + "batch", callback=_answer_batch, repeat=True)

    assert await client.batch([]) == []
    assert total_requests(mocked) == 0
    await client.batch([Command("crm.lead.get", {"id": i}) for i in range(50)])
    assert total_requests(mocked) == 1


async def test_batch_commands_use_php_query_nesting(client: RestClient, mocked: _Mock) -> None:
    mocked.post(BASE + "batch", callback=lambda url, **kw: reply(
        {"result": {"result": {"c0": []}, "result_error": []}, "time": TIME}))
    params = {"filter": {"BINDINGS": [{"OWNER_TYPE_ID": 1, "OWNER_ID": 123}], ">ID": 5}, "select": ["ID"]}

    await client.batch([Command("crm.activity.list", params)])

    (body,) = sent(mocked, BASE + "batch")
    method, _, query = body["cmd"]["c0"].partition("?")
    assert method == "crm.activity.list"
    assert parse_qsl(query) == [("filter[BINDINGS][0][OWNER_TYPE_ID]", "1"),
                                ("filter[BINDINGS][0][OWNER_ID]", "123"),
                                ("filter[>ID]", "5"), ("select[0]", "ID")]


async def test_write_batch_is_retried_after_rate_limit_but_not_after_500(client: RestClient, mocked: _Mock,
                                                                         limiter: FakeLimiter) -> None:
    mocked.post(BASE + "batch", status=503, payload=error_body("QUERY_LIMIT_EXCEEDED", "Too many requests"))
    mocked.post(BASE + "batch", callback=_answer_batch)
    mocked.post(BASE + "batch", status=500,
                payload=error_body("INTERNAL_SERVER_ERROR", "Internal server error"))

    results = await client.batch([Command("crm.lead.get", {"id": 2})], write=True)
    assert results[0].result == {"ID": "2", "METHOD": "crm.lead.get"}
    assert limiter.slowed == [("acme", 50)]

    with pytest.raises(TransientError):
        await client.batch([Command("crm.lead.get", {"id": 4})], write=True)
    assert total_requests(mocked) == 3


# ---------------------------------------------------------------- list_all


def test_fast_page_orders_by_id_and_skips_the_count() -> None:
    params = fast_page({"OWNER_TYPE_ID": 1}, ["ID", "SUBJECT"], 150)

    assert params == {"order": {"ID": "ASC"}, "filter": {"OWNER_TYPE_ID": 1, ">ID": 150}, "start": -1,
                      "select": ["ID", "SUBJECT"]}
    assert "select" not in fast_page(None, (), 0)
    assert fast_page(None, (), 0)["filter"] == {">ID": 0}


async def test_list_all_pages_by_id_until_a_short_page(client: RestClient, mocked: _Mock) -> None:
    ids = list(range(3, 3 + 2 * 127, 2))  # 127 rows with gaps between ids

    def page(url: URL, **kwargs: Any) -> CallbackResult:
        body = body_of(kwargs)
        after = body["filter"][">ID"]
        return reply({"result": [{"ID": str(i)} for i in ids if i > after][:50], "time": TIME})

    mocked.post(BASE + "crm.activity.list", callback=page, repeat=True)

    rows = await client.list_all("crm.activity.list", {"BINDINGS": [{"OWNER_TYPE_ID": 1, "OWNER_ID": 9}]},
                                 ["ID"])

    assert [int(r["ID"]) for r in rows] == ids
    bodies = sent(mocked, BASE + "crm.activity.list")
    assert [b["filter"][">ID"] for b in bodies] == [0, ids[49], ids[99]]
    for body in bodies:
        assert body["start"] == -1
        assert body["order"] == {"ID": "ASC"}
        assert body["select"] == ["ID"]
        assert body["filter"]["BINDINGS"] == [{"OWNER_TYPE_ID": 1, "OWNER_ID": 9}]


async def test_list_all_asks_once_more_after_a_full_last_page(client: RestClient, mocked: _Mock) -> None:
    mocked.post(BASE + "crm.activity.list", payload={"result": [{"ID": str(i)} for i in range(1, 51)]})
    mocked.post(BASE + "crm.activity.list", payload={"result": []})

    rows = await client.list_all("crm.activity.list", after_id=0)

    assert len(rows) == 50
    assert [b["filter"][">ID"] for b in sent(mocked, BASE + "crm.activity.list")] == [0, 50]


# ---------------------------------------------------------------- against the fake portal over HTTP


@pytest.fixture
async def fake_client(session: aiohttp.ClientSession, portal_config: PortalConfig,
                      redis: ArqRedis) -> RestClient:
    return RestClient(session, portal_config, RateLimiter(redis), retry=FAST)


async def test_batch_of_adds_with_already_bound_in_the_middle(fake_client: RestClient,
                                                              portal: FakePortal) -> None:
    lead = portal.add_lead()
    contact = portal.add_contact("Ann", lead_id=lead)
    company = portal.add_company("Acme")
    deal = portal.add_deal()
    activity = portal.add_activity([(LEAD, lead), (COMPANY, company)])
    targets = [(CONTACT, contact), (COMPANY, company), (DEAL, deal)]
    portal.reset_counters()

    results = await fake_client.batch([
        Command("crm.activity.binding.add", {"activityId": activity, "entityTypeId": t, "entityId": i})
        for t, i in targets], write=True)

    assert [r.ok for r in results] == [True, False, True]
    assert results[0].result is True and results[2].result is True
    error = results[1].error
    assert isinstance(error, PermanentError) and error.code == "ACTIVITY_IS_ALREADY_BOUND"
    assert POLICIES[error.code].policy is Policy.DONE
    assert portal.bindings(activity) == sorted([(LEAD, lead), (CONTACT, contact), (COMPANY, company),
                                                (DEAL, deal)])
    assert [(r.method, r.n_commands) for r in portal.requests] == [("batch", 3)]


async def test_nested_binding_filter_survives_the_query_string(fake_client: RestClient,
                                                               portal: FakePortal) -> None:
    lead, other = portal.add_lead(), portal.add_lead()
    contact = portal.add_contact("Ann")
    mine = [portal.add_activity([(LEAD, lead)]), portal.add_activity([(CONTACT, contact), (LEAD, lead)])]
    portal.add_activity([(LEAD, other)])
    params = {"filter": {"BINDINGS": [{"OWNER_TYPE_ID": LEAD, "OWNER_ID": lead}]}, "select": ["ID"]}

    # The fake parses the cmd string like PHP does: the nested filter comes back whole.
    parsed = fake_parse_php_query(parse_qsl(http_build_query(params)))
    assert parsed == {"filter": {"BINDINGS": {"0": {"OWNER_TYPE_ID": str(LEAD), "OWNER_ID": str(lead)}}},
                      "select": {"0": "ID"}}

    (listed,) = await fake_client.batch([Command("crm.activity.list", params)])
    assert listed.ok, listed.error
    assert sorted(int(row["ID"]) for row in listed.result) == sorted(mine)
    # The same filter sent as JSON gives the same rows.
    direct = await fake_client.call("crm.activity.list", params)
    assert sorted(int(row["ID"]) for row in direct.result) == sorted(mine)


async def test_list_all_against_the_fake_reads_every_page(fake_client: RestClient,
                                                          portal: FakePortal) -> None:
    lead, other = portal.add_lead(), portal.add_lead()
    mine = [portal.add_activity([(LEAD, lead)]) for _ in range(120)]
    portal.add_activity([(LEAD, other)])
    portal.reset_counters()

    bound_to_lead = {"BINDINGS": [{"OWNER_TYPE_ID": LEAD, "OWNER_ID": lead}]}
    rows = await fake_client.list_all("crm.activity.list", bound_to_lead, ["ID"])

    assert [int(r["ID"]) for r in rows] == mine
    assert portal.request_count == 3


async def test_fake_html_page_then_success_for_a_read(fake_client: RestClient, portal: FakePortal) -> None:
    lead = portal.add_lead()
    portal.html_next(1, status=502)

    answer = await fake_client.call("crm.lead.get", {"id": lead})

    assert int(answer.result["ID"]) == lead
    assert portal.request_count == 2


async def test_fake_lost_answer_on_a_write_batch_is_not_resent(fake_client: RestClient,
                                                               portal: FakePortal) -> None:
    """The portal did the add but answered 500: the client must not send it again."""
    lead = portal.add_lead()
    contact = portal.add_contact("Ann")
    activity = portal.add_activity([(LEAD, lead)])
    portal.lose_answers(1, "crm.activity.binding.add")
    portal.reset_counters()

    with pytest.raises(TransientError):
        await fake_client.batch([Command("crm.activity.binding.add", {
            "activityId": activity, "entityTypeId": CONTACT, "entityId": contact})], write=True)

    assert portal.request_count == 1
    assert (CONTACT, contact) in portal.bindings(activity)


async def test_fake_rate_limit_refusal_is_retried_and_slows_the_shared_bucket(
        fake_client: RestClient, portal: FakePortal, redis: ArqRedis) -> None:
    lead = portal.add_lead()
    portal.fail_next(1, status=503, error="QUERY_LIMIT_EXCEEDED")

    answer = await fake_client.call("crm.lead.get", {"id": lead})

    assert int(answer.result["ID"]) == lead
    assert portal.request_count == 2
    assert await redis.exists("b24:rate:acme:slow")


async def test_fake_wrong_webhook_code_is_a_config_error(session: aiohttp.ClientSession,
                                                         portal: FakePortal, portal_config: PortalConfig,
                                                         redis: ArqRedis) -> None:
    wrong_url = SecretStr(portal.rest_url.replace(portal.webhook_code, "not-the-code"))
    wrong = portal_config.model_copy(update={"rest_url": wrong_url})
    client = RestClient(session, wrong, RateLimiter(redis), retry=FAST)

    with pytest.raises(ConfigError) as caught:
        await client.call("crm.lead.get", {"id": 1})

    assert caught.value.code == "NO_AUTH_FOUND"
    assert "not-the-code" not in str(caught.value)
