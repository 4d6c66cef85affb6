"""Application (OAuth) mode: install, events checked against the installed token, one shared refresh."""
from __future__ import annotations

from typing import Any

import pytest

from app.bitrix.client import RetryPolicy
from app.portal_config import PortalConfig
from app.live_rules import LiveRules
from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.settings import Settings
from app.store.jobs import JobStore
from app.web import create_app
from tests.conftest import DEFAULT_RULES, DOMAIN, post_event, post_install, rules_with
from workers.context import WorkerContext
from workers.reconcile import sweep_all


@pytest.fixture
def app_rules(portal: FakePortal) -> Any:
    config = PortalConfig(name="acme", domain=DOMAIN, auth="oauth", rest_url=f"{portal.base_url}/rest/",
                          client_id="app.client", client_secret="app-secret",
                          oauth_url=f"{portal.base_url}/oauth/token/", rate_limit={"per_second": 1000, "burst": 1000})
    return rules_with(DEFAULT_RULES, config)


@pytest.fixture
async def app_client(aiohttp_client: Any, settings: Any, app_rules: Any, redis: Any) -> Any:
    return await aiohttp_client(create_app(settings, app_rules))


async def test_eight_jobs_that_meet_an_expired_token_refresh_it_once(app_client: Any, make_worker: Any,
                                                                     app_rules: Any, portal: FakePortal) -> None:
    auth = portal.install_app()
    assert (await post_install(app_client, auth)).status == 200
    cases = []
    for _ in range(8):
        lead = portal.add_lead()
        made = portal.convert_lead(lead)
        cases.append((portal.add_activity([(LEAD, lead)]), made))
    for activity, _ in cases:
        status, answer = await post_event(app_client, "ONCRMACTIVITYADD", activity, token=auth["application_token"])
        assert status == 200, answer
    portal.expire_access_tokens()

    await make_worker(rules=app_rules).run_check()

    assert portal.oauth_refreshes == 1
    for activity, made in cases:
        assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]


async def test_events_must_carry_the_installed_applications_token(app_client: Any, portal: FakePortal,
                                                                  redis: Any) -> None:
    status, _ = await post_event(app_client, "ONCRMACTIVITYADD", 1, token="anything")
    assert status == 401, "nothing installed yet: no token is right"

    auth = portal.install_app()
    await post_install(app_client, auth)

    assert (await post_event(app_client, "ONCRMACTIVITYADD", 1, token="forged"))[0] == 401
    assert (await post_event(app_client, "ONCRMACTIVITYADD", 1, token=auth["application_token"]))[0] == 200


async def test_a_second_install_with_another_token_and_installs_for_webhook_portals_are_refused(
        app_client: Any, client: Any, portal: FakePortal, caplog: Any) -> None:
    first = portal.install_app()
    assert (await post_install(app_client, first)).status == 200

    impostor = {**first, "application_token": "someone-elses"}
    assert (await post_install(app_client, impostor)).status == 401
    assert (await post_install(client, first)).status == 401, "the webhook-mode portal takes no install"
    for _ in range(20):  # anyone can post these: the log gets one line a kind every 10 s
        assert (await post_install(app_client, impostor)).status == 401
        assert (await post_install(client, first)).status == 401
    refusals = [r for r in caplog.records if "refused" in r.getMessage() and "ONAPPINSTALL" in r.getMessage()]
    assert len(refusals) == 2, [r.getMessage() for r in refusals]


async def test_missed_events_are_read_from_the_offline_queue_and_cleared_once_queued(
        app_client: Any, make_worker: Any, app_rules: Any, portal: FakePortal, redis: Any,
        settings: Settings) -> None:
    offline = app_rules.portals["acme"].model_copy(update={"offline_events": True})
    rules = app_rules.model_copy(update={"portals": {"acme": offline}})
    await post_install(app_client, portal.install_app())
    lead = portal.add_lead()
    activity = portal.add_activity([(LEAD, lead)])
    made = portal.convert_lead(lead)
    portal.add_offline_event("ONCRMLEADUPDATE", lead)  # the service was down when it happened
    portal.add_offline_event("ONCRMDEALUPDATE", 77)  # no rule listens to it
    portal.add_offline_event("ONCRMLEADUPDATE", "\u00b9")  # type: ignore[arg-type]  # "¹": isdigit() but no id

    worker = make_worker(rules=rules)
    context = WorkerContext.make(settings, LiveRules(rules), redis, retry_policy=RetryPolicy(attempts=2, base=0.01))
    try:
        (done,) = await sweep_all(context)
    finally:
        await context.close()
    await worker.run_check()

    assert len(done.queued) == 1
    assert portal.offline_events == [], "the batch was cleared after its jobs were queued"
    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    record = await JobStore(redis, 3600).get(done.queued[0])
    assert record is not None and record.trigger == "offline"


def test_offline_events_need_the_application_mode() -> None:
    with pytest.raises(ValueError, match="offline events need the application mode"):
        PortalConfig(name="x", domain=DOMAIN, rest_url="https://x.bitrix24.com/rest/1/c/", application_token="t",
                     offline_events=True)


async def test_while_redis_is_away_events_are_checked_against_the_token_last_read_and_spooled(
        aiohttp_client: Any, private_redis: Any, app_rules: Any, portal: FakePortal, tmp_path: Any) -> None:
    settings = Settings(_env_file=None, redis_url=private_redis.url, data_dir=tmp_path, rules=tmp_path / "r.yaml")
    client = await aiohttp_client(create_app(settings, app_rules))
    auth = portal.install_app()
    assert (await post_install(client, auth)).status == 200
    assert (await post_event(client, "ONCRMACTIVITYADD", 1, token=auth["application_token"]))[0] == 200  # read
    private_redis.stop()

    status, answer = await post_event(client, "ONCRMACTIVITYADD", 2, token=auth["application_token"])
    forged, _ = await post_event(client, "ONCRMACTIVITYADD", 3, token="someone-elses")

    assert status == 200 and answer["spooled"] is True, answer
    assert forged == 401
