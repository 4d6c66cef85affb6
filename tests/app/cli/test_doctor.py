"""`b24rebind doctor` against the fake portal: all checks pass on a portal set up right, and each
failure mode shows its ✗ with what to do, and the exit code 1."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from app.bitrix.oauth import TokenStore
from app.portal_config import PortalConfig
from app.cli.doctor import doctor_command
from app.fakeportal import LEAD, FakePortal
from app.rules.model import RuleSet
from tests.conftest import DEFAULT_RULES, TOKEN, WEBHOOK_CODE, rules_with

NO_LEAD_RULES = """
rules:
  - name: contact-activities-show-on-the-company
    on: [ONCRMACTIVITYADD]
    when: {bound_to: contact}
    do: [{bind: [contact.company]}]
"""


@pytest.fixture
def right_config(portal: FakePortal) -> PortalConfig:
    """The portal as a user would describe it: the domain is the webhook's host."""
    return PortalConfig(name="acme", domain="127.0.0.1", rest_url=portal.rest_url, application_token=TOKEN)


def rules_for(config: PortalConfig, text: str | None = None) -> RuleSet:
    return rules_with(text or DEFAULT_RULES, config)


async def run(config: PortalConfig, rules: RuleSet, capsys: Any, **kwargs: Any) -> tuple[int, str]:
    code = await doctor_command(config, rules, **kwargs)
    return code, capsys.readouterr().out


async def test_a_portal_set_up_right_passes_every_check(portal: FakePortal, right_config: PortalConfig,
                                                        capsys: Any) -> None:
    portal.add_activity([(LEAD, portal.add_lead())])
    portal.reset_counters()
    code, out = await run(right_config, rules_for(right_config), capsys)
    assert code == 0, out
    assert "✗" not in out and out.count("✓") == 7
    assert all(method in {"scope", "method.get", "crm.settings.mode.get", "crm.activity.list"}
               for method, _ in portal.requests), "it only reads"
    assert "7 of 7 checks pass" in out


async def test_a_wrong_webhook_stops_at_the_first_check(portal: FakePortal, capsys: Any) -> None:
    url = portal.rest_url.replace(WEBHOOK_CODE, "wrongcode")
    config = PortalConfig(name="acme", domain="127.0.0.1", rest_url=url, application_token=TOKEN)
    code, out = await run(config, rules_for(config), capsys)
    assert code == 1
    assert "✗ the portal answers the webhook: NO_AUTH_FOUND" in out
    assert "what to do: The webhook URL is wrong" in out
    assert "wrongcode" not in out, "the webhook's secret never shows"


async def test_a_portal_that_does_not_answer(capsys: Any) -> None:
    config = PortalConfig(name="acme", domain="127.0.0.1", rest_url="http://127.0.0.1:9/rest/1/x/",
                          application_token=TOKEN)
    code, out = await run(config, rules_for(config), capsys)
    assert code == 1 and "✗ the portal answers the webhook" in out and "reachable" in out


@pytest.mark.parametrize("breakage, expected", [
    (lambda p: setattr(p, "scopes", ["user", "task"]), "✗ its scopes include crm: it has user, task"),
    (lambda p: p.set_access_denied({(LEAD, 1)}), None),  # a user without rights on a lead: still fine
    (lambda p: p.remove_method("crm.activity.binding.move"),
     "✗ the binding methods exist: missing or not allowed: crm.activity.binding.move"),
    (lambda p: setattr(p, "crm_mode", 2), "can never fire: converted-lead-history-follows-client"),
    (lambda p: setattr(p, "bindings_filter_ignored", True), "✗ crm.activity.list filters by BINDINGS"),
    (lambda p: p.set_operating_limit(10_000, cost_per_call=450), "✗ request budget left"),
])
async def test_each_failure_shows_what_to_do(portal: FakePortal, right_config: PortalConfig, capsys: Any,
                                             breakage: Any, expected: str) -> None:
    portal.add_activity([(LEAD, portal.add_lead())])
    breakage(portal)
    code, out = await run(right_config, rules_for(right_config), capsys)
    failures = [line for line in out.splitlines() if line.startswith("  ✗")]
    if expected is None:
        assert code == 0 and not failures, out
        return
    assert code == 1, out
    assert expected in out
    assert "what to do:" in out
    # Without the crm scope the binding methods are not available either: two ✗ for one cause.
    assert len(failures) == (2 if "scopes" in expected else 1), out


async def test_simple_crm_mode_passes_when_no_rule_needs_leads(portal: FakePortal, right_config: PortalConfig,
                                                               capsys: Any) -> None:
    portal.crm_mode = 2
    code, out = await run(right_config, rules_for(right_config, NO_LEAD_RULES), capsys)
    assert code == 0, out
    assert "✓ CRM mode: simple (no leads); no rule needs leads" in out


async def test_a_domain_other_than_the_webhooks_host(portal: FakePortal, portal_config: PortalConfig,
                                                     capsys: Any) -> None:
    code, out = await run(portal_config, rules_for(portal_config), capsys)
    assert code == 1
    assert "✗ the rules' domain is the webhook's host: the rules say acme.bitrix24.com, the webhook calls " \
           "127.0.0.1" in out
    assert "set domain: 127.0.0.1" in out


async def test_an_application_not_installed(portal: FakePortal, capsys: Any, redis: Any) -> None:
    config = PortalConfig(name="acme", domain="127.0.0.1", auth="oauth", client_id="app.1", client_secret="s",
                          rest_url=portal.rest_url, offline_events=True)

    code, out = await run(config, rules_for(config), capsys, redis=redis)  # no ONAPPINSTALL's tokens in it
    assert code == 1
    assert "✗ the application is installed: no tokens from ONAPPINSTALL" in out
    assert "what to do: install (or reinstall) the application" in out
    assert "the other checks: not run" in out


async def test_an_installed_application_is_checked_with_its_own_tokens(portal: FakePortal, redis: Any,
                                                                      capsys: Any) -> None:
    config = PortalConfig(name="acme", domain="127.0.0.1", auth="oauth", client_id="app.client",
                          client_secret="app-secret", rest_url=f"{portal.base_url}/rest/",
                          oauth_url=f"{portal.base_url}/oauth/token/", offline_events=True)
    await TokenStore(redis).save("acme", TokenStore.from_install(portal.install_app()))

    code, out = await run(config, rules_for(config), capsys, redis=redis)
    assert code == 0, out
    assert "✓ offline events can be read: event.offline.list answered" in out

    portal.admin = False  # installed by a user who is no administrator: method.get still says available
    code, out = await run(config, rules_for(config), capsys, redis=redis)

    assert code == 1, out
    assert "✓ the application is installed" in out and "✓ the portal answers the app" in out
    assert "✗ offline events can be read: ACCESS_DENIED" in out
    assert "reinstall the application as an administrator" in out


async def test_offline_events_through_a_webhook_without_admin_rights(portal: FakePortal, right_config: PortalConfig,
                                                                     capsys: Any) -> None:
    # The rules file refuses offline_events for a webhook; a config made in code reaches the portal all the same.
    config = right_config.model_copy(update={"offline_events": True})
    portal.admin = False

    code, out = await run(config, rules_for(config), capsys)

    assert code == 1, out
    assert "✗ offline events can be read: WRONG_AUTH_TYPE" in out
    assert "never through a webhook" in out
    assert "✓ the binding methods exist" in out  # the webhook's CRM rights are all the service needs


async def test_the_command_line(portal: FakePortal, tmp_path: Any, monkeypatch: Any, capsys: Any) -> None:
    from app.cli.main import main
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(f"portals:\n  acme:\n    domain: 127.0.0.1\n    rest_url: {portal.rest_url}\n"
                          f"    application_token: {TOKEN}\n" + NO_LEAD_RULES)
    monkeypatch.setenv("B24_RULES", str(rules_file))
    monkeypatch.setenv("B24_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    # The fake portal is served by this test's event loop: run the command in a thread of its own.
    code = await asyncio.to_thread(main, ["doctor"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "b24rebind doctor: portal acme (127.0.0.1), reading only" in out


@pytest.mark.parametrize("mode, rules_text, code, words", [
    (1, DEFAULT_RULES, 0, "portal acme: classic CRM mode; the rules can fire there"),
    (2, NO_LEAD_RULES, 0, "portal acme: simple CRM mode; the rules can fire there"),
    (2, DEFAULT_RULES, 1, "portal acme is in simple CRM mode (no leads): these rules can never fire: "
                          "converted-lead-history-follows-client"),
])
async def test_rules_check_with_a_portal_asks_its_crm_mode(portal: FakePortal, tmp_path: Any, monkeypatch: Any,
                                                           capsys: Any, mode: int, rules_text: str, code: int,
                                                           words: str) -> None:
    from app.cli.main import main
    portal.crm_mode = mode
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(f"portals:\n  acme:\n    domain: 127.0.0.1\n    rest_url: {portal.rest_url}\n"
                          f"    application_token: {TOKEN}\n" + rules_text.replace("rules:\n", "rules:\n", 1))
    monkeypatch.chdir(tmp_path)
    assert await asyncio.to_thread(main, ["rules", "check", str(rules_file), "--portal", "acme"]) == code
    captured = capsys.readouterr()
    assert words in captured.out + captured.err


def test_the_spool_line_says_what_waits_and_what_is_quarantined(tmp_path: Path) -> None:
    from app.cli.doctor import spool_check

    assert spool_check(tmp_path / "none yet").ok  # no spool at all: nothing waits
    (tmp_path / "spool-00000000000000000001-1.jsonl").write_bytes(b"{}\n")
    waiting = spool_check(tmp_path)
    assert not waiting.ok and waiting.detail.startswith("1 segments wait to be queued, 0 lines quarantined")
    (tmp_path / "quarantine.jsonl").write_bytes(b'{"reason": "JSON: ..."}\n' * 2)
    quarantined = spool_check(tmp_path)
    assert not quarantined.ok and "2 lines quarantined" in quarantined.detail
    assert "quarantine.jsonl" in quarantined.fix
