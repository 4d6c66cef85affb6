"""The job API over real Redis, a real worker and the fake portal: lists, filters, paging, retries, stats."""
from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any
from unittest import mock
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from arq import Worker
from pydantic import SecretStr, ValidationError

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.settings import Settings
from app.store.jobs import JOB_KEY, JobQuery, JobRecord, JobState, JobStore, feed_channel
from app.web import api_auth, create_app
from tests.conftest import post_event

DAY = 86400


async def seed(redis: Any, states: list[str], *, portal: str = "acme", start: float | None = None,
               store: JobStore | None = None) -> list[JobRecord]:
    """Job records received one second apart, oldest first."""
    store = store or JobStore(redis, 14 * DAY)
    start = time.time() - len(states) if start is None else start
    records = []
    for i, state in enumerate(states):
        record = JobRecord(id=f"job{portal}{i:05d}", portal=portal, event="ONCRMACTIVITYADD", entity_id=100 + i,
                           received_at=start + i, rules=["converted-lead-history-follows-client"])
        await store.create(record)
        record.state = JobState(state)
        await store.save(record)
        records.append(record)
    return records


async def test_failed_jobs_are_listed_newest_first_with_what_to_do(client: Any, worker: Worker,
                                                                   portal: FakePortal) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    good = portal.add_activity([(LEAD, lead)])
    bad = portal.add_activity([(LEAD, lead)])
    _, ok = await post_event(client, "ONCRMACTIVITYADD", good)
    await worker.run_check()
    portal.fail_next(1, status=403, error="ACCESS_DENIED", description="Access denied!")
    _, refused = await post_event(client, "ONCRMACTIVITYADD", bad)
    await worker.run_check()

    everything = await (await client.get("/api/jobs")).json()
    failed = await (await client.get("/api/jobs?state=failed")).json()

    assert [job["id"] for job in everything["jobs"]] == [refused["job_id"], ok["job_id"]]
    assert [job["id"] for job in failed["jobs"]] == [refused["job_id"]]
    assert failed["jobs"][0]["error"]["code"] == "ACCESS_DENIED"
    assert "CRM rights" in failed["jobs"][0]["error"]["what_to_do"]
    assert failed["next_cursor"] is None


async def test_every_filter_narrows_the_list(client: Any, redis: Any) -> None:
    acme = await seed(redis, ["succeeded", "failed", "dead", "skipped"], start=time.time() - 100)
    other = await seed(redis, ["failed"], portal="other")

    async def ids(query: str) -> list[str]:
        response = await client.get(f"/api/jobs?{query}")
        assert response.status == 200, await response.text()
        return [job["id"] for job in (await response.json())["jobs"]]

    assert await ids("state=failed") == [other[0].id, acme[1].id]
    assert await ids("state=FAILED&portal=acme") == [acme[1].id]
    assert await ids("portal=other") == [other[0].id]
    assert await ids("rule=converted-lead-history-follows-client&state=dead") == [acme[2].id]
    assert await ids("event=oncrmactivityadd&entity=103") == [acme[3].id]
    assert await ids("rule=no-such-rule") == []
    assert await ids(f"since={acme[1].received_at}&until={acme[2].received_at}") == [acme[2].id, acme[1].id]
    iso = datetime.fromtimestamp(acme[3].received_at - 0.5, UTC).isoformat().replace("+00:00", "Z")
    assert await ids(f"since={iso}&portal=acme") == [acme[3].id]


async def test_cursor_paging_walks_every_job_once_even_with_equal_times(client: Any, redis: Any) -> None:
    store = JobStore(redis, 14 * DAY)
    made = await seed(redis, ["failed"] * 23, store=store)
    for record in made[5:12]:  # seven jobs received in the same instant
        record.received_at = made[5].received_at
        await store.save(record)

    seen, cursor = [], ""
    while True:
        page = await (await client.get(f"/api/jobs?state=failed&limit=5{cursor}")).json()
        seen += [job["id"] for job in page["jobs"]]
        if not page["next_cursor"]:
            break
        cursor = f"&cursor={page['next_cursor']}"

    assert sorted(seen) == sorted(r.id for r in made)
    assert len(seen) == len(set(seen)) == 23


@pytest.mark.parametrize("query, message", [
    ("state=lost", "state 'lost' is not a job state; use one of: queued, running"),
    ("entity=abc", "entity must be a whole number"),
    ("entity=0", "entity must be between 1"),
    ("limit=0", "limit must be between 1 and 500"),
    ("limit=10000", "limit must be between 1 and 500"),
    ("since=yesterday", "since must be a time: Unix seconds or ISO 8601"),
    ("since=200&until=100", "since is after until"),
    ("cursor=bm90LWEtY3Vyc29y", "cursor is not one this API gave out"),
    ("cursor=%%%", "cursor is not one this API gave out"),
    ("colour=red", "unknown parameter 'colour'; this call takes: state, portal"),
    ("state=failed&state=dead", "give state once"),
    ("portal=" + "x" * 300, "portal must be a name of up to 200"),
    ("rule=%3Cscript%3E", "rule must be a name"),
])
async def test_a_bad_filter_is_a_400_that_says_what_to_send(client: Any, query: str, message: str) -> None:
    response = await client.get(f"/api/jobs?{query}")

    assert response.status == 400
    assert message in (await response.json())["error"]


async def test_unknown_routes_and_methods_answer_json_not_html(admin: Any) -> None:
    client = admin  # retry and replay need the API token
    missing = await client.get("/api/nothing-here")
    wrong_method = await client.delete("/api/jobs")

    assert missing.status == 404 and "openapi.json" in (await missing.json())["error"]
    assert wrong_method.status == 405 and "error" in await wrong_method.json()


async def test_retrying_a_failed_job_runs_it_again_and_it_succeeds(admin: Any, make_worker: Any,
                                                                   portal: FakePortal) -> None:
    client = admin  # retry and replay need the API token
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    portal.fail_next(1, status=403, error="ACCESS_DENIED", description="Access denied!")
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await make_worker().run_check()

    retried = await client.post(f"/api/jobs/{answer['job_id']}/retry")
    assert retried.status == 200, await retried.text()
    assert (await retried.json())["state"] == "queued"
    await make_worker().run_check()

    job = await (await client.get(f"/api/jobs/{answer['job_id']}")).json()
    assert job["state"] == "succeeded"
    assert [a["outcome"] for a in job["attempts"]] == ["failed", "succeeded"]
    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]


async def test_retry_refuses_unknown_and_unfinished_jobs(admin: Any, redis: Any) -> None:
    client = admin  # retry and replay need the API token
    queued = await seed(redis, ["queued"])

    unknown = await client.post("/api/jobs/nosuchjob/retry")
    unfinished = await client.post(f"/api/jobs/{queued[0].id}/retry")
    odd = await client.post("/api/jobs/..%2F..%2Fetc/retry")

    assert unknown.status == 404 and "no job 'nosuchjob'" in (await unknown.json())["error"]
    assert unfinished.status == 400
    assert "is queued; only a finished job can be retried" in (await unfinished.json())["error"]
    assert odd.status == 404


async def test_replaying_dead_letters_queues_every_failed_job_once(admin: Any, make_worker: Any,
                                                                   portal: FakePortal, redis: Any) -> None:
    client = admin  # retry and replay need the API token
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(3)]
    for activity in activities:
        portal.fail_next(1, status=403, error="ACCESS_DENIED", description="Access denied!")
        await post_event(client, "ONCRMACTIVITYADD", activity)
        await make_worker().run_check()
    assert len((await (await client.get("/api/jobs?state=failed")).json())["jobs"]) == 3

    no_state = await client.post("/api/jobs/retry")
    replay = await client.post("/api/jobs/retry?state=failed")
    assert no_state.status == 400 and "state=failed" in (await no_state.json())["error"]
    assert (await replay.json())["retried"] == 3
    assert await redis.zcard("arq:queue") == 3
    await make_worker().run_check()

    assert (await (await client.get("/api/jobs?state=failed")).json())["jobs"] == []
    assert all(portal.bindings(a) == [(CONTACT, made["contact"]), (COMPANY, made["company"])] for a in activities)


async def test_stats_show_states_queue_throughput_and_portal_headroom(client: Any, worker: Worker,
                                                                      portal: FakePortal) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    await post_event(client, "ONCRMACTIVITYADD", activity)
    await worker.run_check()
    await post_event(client, "ONCRMACTIVITYADD", activity, ts=1766047999)  # waits in the queue

    stats = await (await client.get("/api/stats")).json()

    assert stats["jobs"]["succeeded"] == 1 and stats["jobs"]["queued"] == 1
    assert stats["queue"]["depth"] == 1 and 0 <= stats["queue"]["oldest_queued_seconds"] < 10
    assert stats["jobs_per_minute"] == 2 and len(stats["jobs_per_minute_history"]) == 30
    acme = stats["portals"]["acme"]
    assert acme["requests"] == portal.request_count and acme["errors"] == 0
    assert acme["burst"] == 1000 and 990 < acme["headroom"] <= 1000 and not acme["slowed_down"]
    assert acme["reachability"]["state"] == "reachable"
    assert stats["queue"]["ready"] == 1 and stats["queue"]["later"] == 0
    history = stats["history"]
    assert len(history["minute_starts"]) == len(history["jobs"]) == len(history["requests"]) == 60
    assert sum(history["jobs"]) == 1 and sum(history["requests"]) == portal.request_count
    assert stats["jobs_finished_last_minute"] == 1


async def test_stats_tell_an_unreachable_portal_from_one_that_refuses(
        aiohttp_client: Any, settings: Any, rules: Any, redis: Any, make_worker: Any, portal_config: Any) -> None:
    from app.web import create_app
    away = portal_config.model_copy(update={"rest_url": SecretStr("http://127.0.0.1:9/rest/1/code/")})
    gone = rules.model_copy(update={"portals": {"acme": away}})
    client = await aiohttp_client(create_app(settings, gone))
    await post_event(client, "ONCRMACTIVITYADD", 5)
    await make_worker(rules=gone).run_check()

    acme = (await (await client.get("/api/stats")).json())["portals"]["acme"]

    assert acme["reachability"]["state"] == "unreachable"
    assert acme["unreachable"] == acme["errors"] > 0 and acme["refused"] == 0


async def test_old_records_are_trimmed_with_their_index_entries(redis: Any) -> None:
    store = JobStore(redis, 14 * DAY)
    old = await seed(redis, ["failed", "succeeded"], start=time.time() - 20 * DAY, store=store)
    recent = await seed(redis, ["failed"], portal="other", store=store)

    assert await store.trim() == 2

    page = await store.list(JobQuery())
    assert [r.id for r in page.records] == [recent[0].id]
    assert not await redis.exists(*(JOB_KEY + r.id for r in old))
    assert await redis.zcard("b24:jobs:state:failed") == 1
    assert not await redis.exists("b24:jobs:portal:acme")
    assert b"b24:jobs:portal:acme" not in await redis.smembers("b24:jobs:indexes")


async def test_the_record_cap_bounds_memory_whatever_the_retention(redis: Any) -> None:
    store = JobStore(redis, 14 * DAY, max_records=10)
    made = await seed(redis, ["succeeded"] * 25, store=store)

    await store.trim()

    kept = await store.list(JobQuery(), limit=100)
    assert [r.id for r in kept.records] == [r.id for r in reversed(made[-10:])]
    assert await redis.zcard("b24:jobs:state:succeeded") == 10


async def test_the_record_cap_is_a_setting(redis: Any, settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("B24_MAX_JOB_RECORDS", "1000")
    store = JobStore.from_settings(redis, Settings(_env_file=None))
    await seed(redis, ["succeeded"] * 1003, store=store)

    assert await store.trim() == 3
    with pytest.raises(ValidationError, match="greater than or equal to 1000"):
        Settings(_env_file=None, max_job_records=10)


async def test_the_api_needs_the_token_when_one_is_set(aiohttp_client: Any, settings: Any, rules: Any,
                                                       redis: Any) -> None:
    guarded = settings.model_copy(update={"api_token": SecretStr("sekret-api-token")})
    client = await aiohttp_client(create_app(guarded, rules))
    bearer = {"Authorization": "Bearer sekret-api-token"}

    for method, path in [("GET", "/api/jobs"), ("POST", "/api/jobs/retry?state=failed"), ("GET", "/api/stats"),
                         ("POST", "/api/jobs/x/retry"), ("GET", "/api/audit?activity=1"), ("GET", "/metrics")]:
        refused = await client.request(method, path)
        wrong = await client.request(method, path, headers={"Authorization": "Bearer guess"})
        allowed = await client.request(method, path, headers=bearer)
        assert (refused.status, wrong.status) == (401, 401), path
        assert allowed.status in (200, 404), path
        assert "B24_API_TOKEN" in (await refused.json())["error"]


async def test_without_a_token_the_api_answers_only_on_loopback(settings: Any, rules: Any) -> None:
    app = create_app(settings, rules)
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: ("203.0.113.9", 4711) if name == "peername" \
        else default
    request = make_mocked_request("GET", "/api/jobs", app=app, transport=transport)

    async def handler(request: web.Request) -> web.Response:
        raise AssertionError("the handler must not run")

    response = await api_auth(request, handler)
    assert response.status == 403
    assert "loopback" in json.loads(response.body)["error"]


async def test_the_openapi_document_describes_exactly_the_routes(client: Any) -> None:
    document = await (await client.get("/api/openapi.json")).json()
    routes = set()
    for route in client.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or f"{info.get('prefix', '')}/{{filename}}"
        if route.method != "HEAD":
            routes.add((route.method.lower(), path))

    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert routes == documented
    assert document["openapi"].startswith("3.")
    for item in document["paths"].values():
        for operation in item.values():
            assert operation["summary"] and operation["responses"]


async def test_the_stream_delivers_a_jobs_transitions_in_order(client: Any, worker: Worker,
                                                               portal: FakePortal) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    stream = await client.get("/api/stream")
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    assert (await stream.content.readuntil(b"\n\n")) == b": connected\n\n"

    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await worker.run_check()

    states = []
    while not states or states[-1] not in ("succeeded", "failed"):
        block = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), timeout=5)
        if block.startswith(b"event: job\n"):
            job = json.loads(block.split(b"data: ", 1)[1])
            if job["id"] == answer["job_id"]:
                states.append(job["state"])
    stream.close()
    assert states == ["queued", "running", "succeeded"]


async def test_the_web_process_subscribes_to_the_feed_only_while_a_stream_is_open(client: Any,
                                                                                  redis: Any) -> None:
    async def subscribers() -> int:
        return dict(await redis.pubsub_numsub(feed_channel(redis)))[feed_channel(redis).encode()]

    assert await subscribers() == 0  # intake publishes every transition: nobody watching, nobody receives
    first, second = await client.get("/api/stream"), await client.get("/api/stream")
    await first.content.readuntil(b"\n\n")
    await second.content.readuntil(b"\n\n")
    assert await subscribers() == 1  # one subscription, however many streams

    first.close()
    second.close()
    for _ in range(50):
        if await subscribers() == 0:
            break
        await asyncio.sleep(0.05)
    assert await subscribers() == 0


async def test_without_a_token_writes_are_refused_and_proxied_reads_too(client: Any) -> None:
    retry = await client.post("/api/jobs/retry?state=failed")
    proxied = await client.get("/api/jobs", headers={"X-Forwarded-For": "203.0.113.9"})
    direct = await client.get("/api/jobs")

    assert retry.status == 403 and "B24_API_TOKEN" in (await retry.json())["error"]
    assert proxied.status == 403
    assert direct.status == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.nip.io", "localhost.evil.example"])
async def test_without_a_token_a_read_for_another_host_name_is_refused(client: Any, host: str) -> None:
    """DNS rebinding: a page from evil.example whose name now resolves to 127.0.0.1 reads as that name."""
    for path in ("/api/jobs", "/metrics"):
        response = await client.get(path, headers={"Host": host})
        assert response.status == 403, path
    for host in ("localhost:8080", "127.0.0.1", "[::1]:8080", "b24.localhost"):
        assert (await client.get("/api/jobs", headers={"Host": host})).status == 200, host


@pytest.mark.parametrize("path", ["/dashboard/__init__.py", "/dashboard/__pycache__", "/dashboard/../web.py",
                                  "/dashboard/%2e%2e/web.py", "/dashboard/nothing.js"])
async def test_only_the_dashboards_assets_are_served(client: Any, path: str) -> None:
    assert (await client.get("/dashboard/app.js")).status == 200
    assert (await client.get(path)).status == 404


async def test_undo_restores_what_a_job_changed_once(admin: Any, make_worker: Any, portal: FakePortal) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    _, answer = await post_event(admin, "ONCRMACTIVITYADD", activity)
    await make_worker().run_check()

    undone = await admin.post(f"/api/jobs/{answer['job_id']}/undo")
    again = await admin.post(f"/api/jobs/{answer['job_id']}/undo")

    assert undone.status == 200, await undone.text()
    body = await undone.json()
    assert body["state"] == "undone" and "apply again on the next event" in body["outcome"]
    assert portal.bindings(activity) == [(LEAD, lead)]
    assert again.status == 409 and "undone already" in (await again.json())["error"]
    job = await (await admin.get(f"/api/jobs/{answer['job_id']}")).json()
    assert job["state"] == "undone" and job["outcome"].startswith("undone: 1 item restored")
    listed = await (await admin.get("/api/jobs?state=undone")).json()
    assert [j["id"] for j in listed["jobs"]] == [answer["job_id"]]
    unknown = await admin.post("/api/jobs/nosuchjob/undo")
    assert unknown.status == 404 and "no job 'nosuchjob'" in (await unknown.json())["error"]


async def test_jobs_about_a_lead_include_those_that_moved_its_activities(client: Any, worker: Worker,
                                                                        portal: FakePortal) -> None:
    lead = [portal.add_lead() for _ in range(5)][-1]  # an id no activity has
    portal.convert_lead(lead)
    _, moved = await post_event(client, "ONCRMACTIVITYADD", portal.add_activity([(LEAD, lead)]))
    _, own = await post_event(client, "ONCRMLEADUPDATE", lead)
    await post_event(client, "ONCRMACTIVITYADD", portal.add_activity([(LEAD, portal.add_lead())]))
    await worker.run_check()

    listed = await (await client.get(f"/api/jobs?lead={lead}")).json()

    assert {job["id"] for job in listed["jobs"]} == {moved["job_id"], own["job_id"]}


@pytest.mark.parametrize("job_id", ["\u00b9", "abc\n", "\u0663", "a" * 65])
async def test_every_job_route_checks_a_job_id_the_same_way(admin: Any, job_id: str) -> None:
    """"¹" and "٣" are alphanumeric to Python, and a regex's `$` lets a newline through: none is a job id."""
    client, quoted = admin, quote(job_id, safe="")
    shown = await client.get(f"/api/jobs/{quoted}")
    retried = await client.post(f"/api/jobs/{quoted}/retry")
    undone = await client.post(f"/api/jobs/{quoted}/undo")
    audit = await client.get(f"/api/audit?job={quote(job_id.strip(), safe='')}")  # query values are stripped

    assert (shown.status, retried.status, undone.status) == (404, 404, 400)
    assert audit.status == (200 if job_id == "abc\n" else 400)
    assert "no job" in (await shown.json())["error"] and "no job" in (await retried.json())["error"]


async def test_a_jobs_bindings_have_the_documented_shape(client: Any, worker: Worker, portal: FakePortal) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    _, answer = await post_event(client, "ONCRMACTIVITYADD", portal.add_activity([(LEAD, lead)]))
    await worker.run_check()

    schemas = (await (await client.get("/api/openapi.json")).json())["components"]["schemas"]
    job = await (await client.get(f"/api/jobs/{answer['job_id']}")).json()

    bindings = [b for item in job["plan"] + job["changes"] for key in ("before", "after") for b in item[key]]
    assert bindings and all(set(b) == set(schemas["Binding"]["required"]) for b in bindings)
    assert all(isinstance(b["entity_type"], int) and isinstance(b["entity_id"], int) for b in bindings)
    assert set(job["changes"][0]) <= set(schemas["ItemBindings"]["properties"])


async def _raw_status(client: Any, request: bytes) -> int:
    """Send a request as bytes (no client adds a Host header for us) and read the answer's status."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", client.server.port), 5)
    try:
        writer.write(request)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
    return int(status_line.split()[1])


async def test_without_a_token_the_host_header_decides_not_the_request_line(client: Any) -> None:
    """`GET http://localhost/...` with `Host: evil.com`: a rebinding page's browser reads as evil.com."""
    absolute = b"GET http://localhost/api/jobs HTTP/1.1\r\nHost: evil.com\r\nConnection: close\r\n\r\n"
    honest = b"GET http://localhost/api/jobs HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    no_host = b"GET /api/jobs HTTP/1.0\r\nConnection: close\r\n\r\n"
    two_hosts = b"GET /api/jobs HTTP/1.1\r\nHost: localhost\r\nHost: evil.com\r\nConnection: close\r\n\r\n"

    assert await _raw_status(client, absolute) == 403
    assert await _raw_status(client, no_host) == 403
    assert await _raw_status(client, two_hosts) in (400, 403)
    assert await _raw_status(client, honest) == 200


async def test_the_token_counts_only_as_a_bearer_token(aiohttp_client: Any, settings: Any, rules: Any,
                                                        redis: Any) -> None:
    guarded = settings.model_copy(update={"api_token": SecretStr("sekret-api-token")})
    client = await aiohttp_client(create_app(guarded, rules))

    for header in ("sekret-api-token", "Basic sekret-api-token", "Token sekret-api-token", "Bearersekret-api-token",
                   "Bearer", "Bearer sekret-api-token x"):
        response = await client.get("/api/jobs", headers={"Authorization": header})
        assert response.status == 401, header
        assert "Authorization: Bearer" in (await response.json())["error"]
    assert (await client.get("/api/jobs?token=sekret-api-token")).status == 401
    for header in ("Bearer sekret-api-token", "bearer sekret-api-token", "Bearer  sekret-api-token "):
        assert (await client.get("/api/jobs", headers={"Authorization": header})).status == 200, header
async def test_a_job_shows_the_event_the_portal_sent_with_its_secrets_masked(client: Any) -> None:
    from tests.conftest import TOKEN

    _, answer = await post_event(client, "ONCRMACTIVITYADD", 77, **{"auth[access_token]": "acc3ss-s3cret"})

    job = await (await client.get(f"/api/jobs/{answer['job_id']}")).json()
    payload = job["payload"]
    assert payload["event"] == "ONCRMACTIVITYADD" and payload["data"] == {"FIELDS": {"ID": "77"}}
    assert payload["auth"]["domain"] == "acme.bitrix24.com"
    assert payload["auth"]["application_token"] == "***" and payload["auth"]["access_token"] == "***"
    text = await (await client.get(f"/api/jobs/{answer['job_id']}")).text()
    assert TOKEN not in text and "acc3ss-s3cret" not in text


async def test_stats_link_a_demo_portals_records_to_its_own_pages_and_a_real_ones_to_the_portal(
        client: Any, portal: FakePortal) -> None:
    from app.api.stats import record_pages
    from app.portal_config import PortalConfig

    stats = await (await client.get("/api/stats")).json()
    assert stats["portals"]["acme"]["pages"] == portal.base_url  # on loopback: the fake serves /crm/...
    real = PortalConfig(domain="acme.bitrix24.com", rest_url="https://acme.bitrix24.com/rest/1/c0de/",
                        application_token="t")
    assert record_pages(real) == "https://acme.bitrix24.com"
