"""POST /bitrix/events: what a portal, an attacker and a broken proxy each get back."""
from __future__ import annotations

import json
from typing import Any

from app.store.jobs import JobStore
from tests.conftest import DOMAIN, TOKEN, event_form, post_event

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def queued(redis: Any) -> int:
    return int(await redis.zcard("arq:queue"))


async def test_a_form_encoded_event_is_queued_before_the_answer(client: Any, redis: Any) -> None:
    status, answer = await post_event(client, "ONCRMACTIVITYADD", 999)

    assert status == 200
    assert await queued(redis) == 1
    record = await JobStore(redis, 60).get(answer["job_id"])
    assert record is not None
    assert (record.state.value, record.portal, record.event, record.entity_id) == (
        "queued", "acme", "ONCRMACTIVITYADD", 999)


async def test_the_same_event_as_json_is_accepted_too(client: Any, redis: Any) -> None:
    body = {"event": "ONCRMACTIVITYADD", "data": {"FIELDS": {"ID": "7"}}, "ts": "1",
            "auth": {"domain": DOMAIN, "application_token": TOKEN, "member_id": "x"}}
    response = await client.post("/bitrix/events", json=body)

    assert response.status == 200
    assert "job_id" in await response.json()
    assert await queued(redis) == 1


async def test_event_names_are_compared_case_insensitively(client: Any, redis: Any) -> None:
    status, answer = await post_event(client, "onCrmActivityAdd", 5)

    assert status == 200 and "job_id" in answer


async def test_a_wrong_token_and_an_unknown_portal_get_the_same_401(client: Any, redis: Any) -> None:
    wrong_token = await post_event(client, "ONCRMACTIVITYADD", 5, token="nope")
    unknown = await post_event(client, "ONCRMACTIVITYADD", 5, domain="evil.bitrix24.com")

    assert wrong_token[0] == unknown[0] == 401
    assert wrong_token[1] == unknown[1]
    assert await queued(redis) == 0


async def test_a_flood_of_forged_events_is_one_log_line_every_few_seconds_with_a_count(
        client: Any, redis: Any, caplog: Any, monkeypatch: Any) -> None:
    import asyncio
    import logging

    from app.intake import webhook
    from app.logs import Throttled

    monkeypatch.setattr(webhook, "throttled", Throttled(webhook.log, every=0.3))
    caplog.set_level(logging.WARNING, logger="app.intake.webhook")

    for _ in range(5):
        assert (await post_event(client, "ONCRMACTIVITYADD", 5, token="guessed"))[0] == 401
    await post_event(client, "ONCRMACTIVITYADD", 5, domain="evil.bitrix24.com")  # another kind: its own line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "does not match" in lines[0] and "unknown portal" in lines[1]

    await asyncio.sleep(0.35)
    await post_event(client, "ONCRMACTIVITYADD", 5, token="guessed")
    last = caplog.records[-1].getMessage()
    assert len(caplog.records) == 3 and "does not match" in last and "(and 4 more like it in the last" in last
    assert await queued(redis) == 0


async def test_a_portal_pinned_by_member_id_refuses_another_member(aiohttp_client: Any, settings: Any,
                                                                   rules: Any, redis: Any) -> None:
    from app.web import create_app
    pinned = rules.portals["acme"].model_copy(update={"member_id": "the-real-member"})
    client = await aiohttp_client(create_app(settings, rules.model_copy(update={"portals": {"acme": pinned}})))

    status, _ = await post_event(client, "ONCRMACTIVITYADD", 5)

    assert status == 401
    assert await queued(redis) == 0


async def test_malformed_bodies_get_400_saying_what_is_wrong(client: Any, redis: Any) -> None:
    cases = {
        "event=ONCRMACTIVITYADD&data[FIELDS][ID]=5": "auth",
        event_form("ONCRMACTIVITYADD", 5).replace("data%5BFIELDS%5D%5BID%5D=5", ""): "data[FIELDS][ID]",
        event_form("ONCRMACTIVITYADD", 5).replace("ID%5D=5", "ID%5D=abc"): "whole number",
        # "¹": a digit to str.isdigit(), not to int()
        event_form("ONCRMACTIVITYADD", 5).replace("ID%5D=5", "ID%5D=%C2%B9"): "whole number",
        event_form("ONCRM ACTIVITY<ADD>", 5): "event code",
        "a" + "[x]" * 1000 + "=1": "nested",
        "&".join(f"f{i}=1" for i in range(500)): "fields",
    }
    for body, expected in cases.items():
        response = await client.post("/bitrix/events", data=body, headers=FORM)
        answer = await response.json()
        assert response.status == 400, body[:60]
        assert expected in answer["error"], answer
    response = await client.post("/bitrix/events", data="{not json", headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert await queued(redis) == 0


async def test_other_content_types_get_415(client: Any) -> None:
    response = await client.post("/bitrix/events", data="<xml/>", headers={"Content-Type": "text/xml"})

    assert response.status == 415
    assert "x-www-form-urlencoded" in (await response.json())["error"]


async def test_a_body_over_64_kib_gets_413(client: Any, redis: Any) -> None:
    body = event_form("ONCRMACTIVITYADD", 5, padding="x" * 70_000)
    response = await client.post("/bitrix/events", data=body, headers=FORM)

    assert response.status == 413
    assert await queued(redis) == 0


async def test_an_event_no_rule_listens_to_is_answered_and_ignored(client: Any, redis: Any) -> None:
    status, answer = await post_event(client, "ONCRMDEALUPDATE", 5)

    assert status == 200
    assert answer == {"ignored": "no rule listens to ONCRMDEALUPDATE"}
    assert await queued(redis) == 0


async def test_while_redis_and_the_spool_are_unavailable_the_event_is_refused_with_503(
        aiohttp_client: Any, settings: Any, rules: Any, tmp_path: Any) -> None:
    import shutil

    from app.store.bundled_redis import BundledRedis
    from app.web import create_app
    own_redis = BundledRedis(tmp_path / "redis")
    client = await aiohttp_client(create_app(settings.model_copy(update={"redis_url": own_redis.start()}), rules))
    own_redis.stop()
    shutil.rmtree(tmp_path / "spool")
    (tmp_path / "spool").write_text("not a directory: the disk cannot take the event either")

    status, answer = await post_event(client, "ONCRMACTIVITYADD", 5)

    assert status == 503
    assert "Redis" in answer["error"]
    assert (await client.get("/readyz")).status == 503


async def test_an_unknown_job_id_gets_404_saying_how_long_jobs_are_kept(client: Any) -> None:
    response = await client.get("/api/jobs/doesnotexist")
    assert response.status == 404
    assert "in the last 14 days" in (await response.json())["error"]


async def test_the_api_token_is_required_when_set(aiohttp_client: Any, settings: Any, rules: Any,
                                                  redis: Any) -> None:
    from pydantic import SecretStr

    from app.web import create_app
    guarded = settings.model_copy(update={"api_token": SecretStr("sekret-api-token")})
    client = await aiohttp_client(create_app(guarded, rules))
    _, answer = await post_event(client, "ONCRMACTIVITYADD", 5)

    refused = await client.get(f"/api/jobs/{answer['job_id']}")
    allowed = await client.get(f"/api/jobs/{answer['job_id']}",
                               headers={"Authorization": "Bearer sekret-api-token"})

    assert refused.status == 401
    assert allowed.status == 200
    assert "sekret-api-token" not in json.dumps(await refused.json())


async def test_health_and_readiness(client: Any) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["redis"] == "ok"


async def test_a_nul_byte_in_a_form_key_or_value_is_a_400_that_says_so(client: Any, redis: Any) -> None:
    """A raw NUL once shifted the parsed fields (the form parser splits on it); %00 is no better."""
    good = event_form("ONCRMACTIVITYADD", 5)
    for body in (good.replace("ts=", "ts=1%00"), good.replace("ts=", "t%00s="), good.replace("ts=", "ts=1\0"),
                 good.replace("&ts=", "\0&ts="), good.replace("auth%5Bdomain%5D=", "auth%5Bdomain\0%5D=")):
        response = await client.post("/bitrix/events", data=body.encode(),
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert response.status == 400, body
        assert "NUL byte" in (await response.json())["error"]
    response = await client.post("/bitrix/events", data=b'{"event": "ONCRMACTIVITYADD\\u0000"}',
                                 headers={"Content-Type": "application/json"})
    assert response.status == 400 and "NUL byte" in (await response.json())["error"]
    assert not any((await JobStore(redis, 60).counts()).values())
def test_the_stored_payload_masks_every_token_and_secret_and_stays_small() -> None:
    from app.intake.events import masked_payload

    sent = {"event": "ONAPPINSTALL", "auth": {"domain": "acme.bitrix24.com", "application_token": "a",
                                              "access_token": "b", "refresh_token": "c", "client_secret": "d"},
            "data": {"FIELDS": {"ID": "1"}, "PASSWORD": "e"}, "items": [{"AuthToken": "f"}], "note": "x" * 10_000}

    masked = masked_payload(sent)

    assert masked["auth"] == {"domain": "acme.bitrix24.com", "application_token": "***", "access_token": "***",
                              "refresh_token": "***", "client_secret": "***"}
    assert masked["data"] == {"FIELDS": {"ID": "1"}, "PASSWORD": "***"} and masked["items"] == [{"AuthToken": "***"}]
    assert len(masked["note"]) == 500
    assert masked_payload({"auth": "t0ken"}) == {"auth": "***"}  # an auth that is a token, not a block
