"""No secret leaves the service: webhook codes and tokens are in no log, job record or API answer."""

from __future__ import annotations

import logging
from typing import Any

from arq.connections import ArqRedis

from app.fakeportal import LEAD, FakePortal
from app.logs import SecretMask
from app.rules.model import RuleSet
from tests.conftest import TOKEN, WEBHOOK_CODE, post_event

WRONG_CODE = "wr0ngwebhookc0de"
SECRETS = (WEBHOOK_CODE, TOKEN, WRONG_CODE)


async def everything_said(client: Any, redis: ArqRedis, job_ids: list[str]) -> str:
    """Every job record and index in Redis, and what the API answers about the jobs."""
    said = []
    async for key in redis.scan_iter("b24:*"):
        kind = (await redis.type(key)).decode()
        if kind == "string":
            said.append((await redis.get(key) or b"").decode(errors="replace"))
        elif kind == "zset":
            said += [m.decode() for m in await redis.zrange(key, 0, -1)]
        elif kind in ("set", "list"):
            said += [
                m.decode()
                for m in (await redis.smembers(key) if kind == "set" else await redis.lrange(key, 0, -1))
            ]
    async for key in redis.scan_iter("arq:*"):
        if (await redis.type(key)).decode() == "string":
            said.append((await redis.get(key) or b"").decode(errors="replace"))
    for path in [f"/api/jobs/{job_id}" for job_id in job_ids] + ["/api/jobs", "/api/stats", "/readyz", "/"]:
        response = await client.get(path)
        said.append(f"{path} {response.status} {await response.text()}")
    return "\n".join(said)


async def test_no_secret_in_logs_job_records_or_answers(
    client: Any, make_worker: Any, portal: FakePortal, rules: RuleSet, redis: ArqRedis, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    lead = portal.add_lead()
    portal.convert_lead(lead)
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(3)]
    job_ids = []
    answers = []

    # 1. An ordinary event, done.
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activities[0])
    answers.append(answer)
    job_ids.append(answer["job_id"])
    await make_worker().run_check()
    # 2. A portal failing with 500s and HTML pages until the job gives up.
    portal.fail_next(40, status=500, error="INTERNAL_SERVER_ERROR")
    portal.html_next(40, status=502)
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activities[1])
    job_ids.append(answer["job_id"])
    await make_worker().run_check()
    # 3. A wrong webhook code in the rules file.
    config = rules.portals["acme"]
    broken = config.model_copy(
        update={"rest_url": type(config.rest_url)(portal.rest_url.replace(WEBHOOK_CODE, WRONG_CODE))}
    )
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activities[2])
    job_ids.append(answer["job_id"])
    await make_worker(rules=rules.model_copy(update={"portals": {"acme": broken}})).run_check()
    # 4. Forged and malformed events.
    answers.append((await post_event(client, "ONCRMACTIVITYADD", 1, token=TOKEN + "x"))[1])
    response = await client.post(
        "/bitrix/events",
        data=f"auth[application_token]={TOKEN}&event=bad event",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    answers.append(await response.text())

    said = await everything_said(client, redis, job_ids) + "\n" + "\n".join(map(str, answers))
    logged = caplog.text + "\n".join(str(r.__dict__) for r in caplog.records)
    assert "NO_AUTH_FOUND" in said and "INTERNAL_SERVER_ERROR" in said  # the scenarios did happen
    for secret in SECRETS:
        assert secret not in said, f"{secret!r} in Redis or an API answer"
        assert secret not in logged, f"{secret!r} in the logs"


def test_the_log_filter_masks_secrets_in_arguments_too() -> None:
    url = f"https://p/rest/1/{WEBHOOK_CODE}/"
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "calling %s failed", (url,), None)
    SecretMask([WEBHOOK_CODE]).filter(record)
    assert WEBHOOK_CODE not in record.getMessage()
