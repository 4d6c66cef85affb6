"""Undo, backfill and `rules explain` on an application (OAuth) portal: the tools reach the portal as the
worker does, with the installed application's tokens (refreshed once when they expire)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from app.cli.commands import backfill_command, explain_command
from app.live_rules import load_service_rules
from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.settings import Settings
from app.store.namespace import prefixed
from app.web import create_app
from tests.conftest import API_TOKEN, DEFAULT_RULES, DOMAIN, post_event, post_install


@pytest.fixture
def app_settings(settings: Settings, portal: FakePortal) -> Settings:
    """A rules file whose one portal is an application: no webhook, every call with an OAuth token."""
    portal_entry = {"domain": DOMAIN, "auth": "oauth", "rest_url": f"{portal.base_url}/rest/",
                    "client_id": "app.client", "client_secret": "app-secret",
                    "oauth_url": f"{portal.base_url}/oauth/token/", "rate_limit": {"per_second": 1000, "burst": 1000}}
    text = yaml.safe_dump({"portals": {"acme": portal_entry}}) + DEFAULT_RULES  # (YAML 1.1 reads `on:` as true)
    Path(settings.rules).write_text(text, encoding="utf-8")
    return settings


@pytest.fixture
async def service(aiohttp_client: Any, app_settings: Settings, portal: FakePortal, redis: Any) -> Any:
    """The web app, with the application installed in the portal (the tokens it sent kept in Redis)."""
    guarded = app_settings.model_copy(update={"api_token": SecretStr(API_TOKEN)})
    client = await aiohttp_client(create_app(guarded, load_service_rules(app_settings)),
                                  headers={"Authorization": f"Bearer {API_TOKEN}"})
    client.auth = portal.install_app()
    assert (await post_install(client, client.auth)).status == 200
    return client


async def test_explain_reads_an_application_portal(service: Any, app_settings: Settings, portal: FakePortal,
                                                    capsys: Any) -> None:
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    portal.expire_access_tokens()

    assert await explain_command(app_settings, activity, None, "acme", None) == 0

    out = capsys.readouterr().out
    assert "rule 'converted-lead-history-follows-client' matches" in out
    assert f"contact {made['contact']}, company {made['company']}" in out
    assert portal.oauth_refreshes == 1


async def test_undo_restores_bindings_on_an_application_portal(service: Any, app_settings: Settings,
                                                               portal: FakePortal, make_worker: Any) -> None:
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    _, answer = await post_event(service, "ONCRMACTIVITYADD", activity, token=service.auth["application_token"])
    await make_worker(rules=load_service_rules(app_settings)).run_check()
    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    portal.expire_access_tokens()

    undone = await service.post(f"/api/jobs/{answer['job_id']}/undo")

    assert undone.status == 200, await undone.text()
    assert (await undone.json())["state"] == "undone"
    assert portal.bindings(activity) == [(LEAD, lead)]  # made after the conversion: bound to the lead alone


async def test_backfill_rebinds_history_on_an_application_portal(service: Any, app_settings: Settings,
                                                                 portal: FakePortal, capsys: Any) -> None:
    history = []
    for _ in range(3):
        lead = portal.add_lead()
        activity = portal.add_activity([(LEAD, lead)])
        history.append((activity, portal.convert_lead(lead)))
    portal.expire_access_tokens()

    assert await backfill_command(app_settings, "2000-01-01", None, False, "acme") == 0

    assert "3 converted leads since 2000-01-01 queued" in capsys.readouterr().out
    for activity, made in history:
        assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]


async def test_undo_on_an_application_no_longer_installed_says_so(service: Any, app_settings: Settings,
                                                                  portal: FakePortal, make_worker: Any,
                                                                  redis: Any) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    _, answer = await post_event(service, "ONCRMACTIVITYADD", activity, token=service.auth["application_token"])
    await make_worker(rules=load_service_rules(app_settings)).run_check()
    await redis.delete(prefixed("b24:oauth:acme"))  # the tokens are gone (uninstalled)

    undone = await service.post(f"/api/jobs/{answer['job_id']}/undo")

    assert undone.status == 502
    assert "NOT_INSTALLED" in (error := (await undone.json())["error"]) and "Install the application" in error
