"""RestClient: batches, pages and lists, against mocked and fake portals (one request's answers, errors,
retries and portal moves are test_transport.py's)."""
from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aioresponses import CallbackResult
from arq.connections import ArqRedis
from pydantic import SecretStr
from yarl import URL

from app.bitrix.client import Command, RestClient, fast_page
from app.bitrix.errors import (
    POLICIES,
    ConfigError,
    PermanentError,
    Policy,
    TransientError,
)
from app.portal_config import PortalConfig
from app.bitrix.query import http_build_query
from app.bitrix.ratelimit import RateLimiter
from app.fakeportal import COMPANY, CONTACT, DEAL, LEAD, FakePortal
from app.fakeportal import parse_php_query as fake_parse_php_query
from tests.support.mocked_portal import (
    BASE,
    FAST,
    TIME,
    FakeLimiter,
    MockedPortal,
    body_of,
    error_body,
    reply,
    sent,
    total_requests,
)


@pytest.fixture
def client(session: aiohttp.ClientSession, config: PortalConfig, limiter: FakeLimiter) -> RestClient:
    return RestClient(session, config, limiter, retry=FAST)  # type: ignore[arg-type]


# ---------------------------------------------------------------- batch


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
                                                                          mocked: MockedPortal) -> None:
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
                                                                       mocked: MockedPortal) -> None:
    mocked.post(BASE + "batch", callback=_answer_batch, repeat=True)

    assert await client.batch([]) == []
    assert total_requests(mocked) == 0
    await client.batch([Command("crm.lead.get", {"id": i}) for i in range(50)])
    assert total_requests(mocked) == 1


async def test_batch_commands_use_php_query_nesting(client: RestClient, mocked: MockedPortal) -> None:
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


async def test_write_batch_is_retried_after_rate_limit_but_not_after_500(client: RestClient, mocked: MockedPortal,
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


async def test_list_all_pages_by_id_until_a_short_page(client: RestClient, mocked: MockedPortal) -> None:
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


async def test_list_all_asks_once_more_after_a_full_last_page(client: RestClient, mocked: MockedPortal) -> None:
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
