"""Reloading the rules: a good file replaces the rules in force, a broken one keeps them and says why."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from app.live_rules import LiveRules, load_service_rules
from app.web import create_app

GOOD = "rules:\n  - name: {name}\n    on: [ONCRMACTIVITYADD]\n    do: [{{bind: [lead.contact]}}]\n"


async def test_a_broken_reload_keeps_the_old_rules_and_readyz_says_why(aiohttp_client: Any, settings: Any,
                                                                       redis: Any) -> None:
    settings.rules.write_text(GOOD.format(name="first"))
    live = LiveRules(load_service_rules(settings), settings)
    client = await aiohttp_client(create_app(settings, live))

    settings.rules.write_text(GOOD.format(name="second").replace("bind:", "bnid:"))
    assert live.reload() is False
    ready = await (await client.get("/readyz")).json()

    assert [rule.name for rule in live.current.rules] == ["first"]
    assert "did you mean 'bind'" in ready["rules_error"]
    assert "previous rules stay in force" in ready["rules_error"]

    settings.rules.write_text(GOOD.format(name="second"))
    assert live.reload() is True
    assert [rule.name for rule in live.current.rules] == ["second"]
    assert "rules_error" not in await (await client.get("/readyz")).json()


async def test_the_watcher_notices_a_changed_file(settings: Any, tmp_path: Path) -> None:
    import asyncio
    import os
    settings.rules.write_text(GOOD.format(name="first"))
    live = LiveRules(load_service_rules(settings), settings)
    watcher = asyncio.create_task(live.watch(interval=0.01))
    settings.rules.write_text(GOOD.format(name="renamed"))
    os.utime(settings.rules, (1, 1))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if live.current.rules[0].name == "renamed":
            break
    watcher.cancel()

    assert live.current.rules[0].name == "renamed"


def test_empty_settings_copied_from_env_example_mean_unset(tmp_path: Path, monkeypatch: Any) -> None:
    from app.settings import Settings
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("REDIS_URL=\nB24_API_TOKEN=\n")

    settings = Settings()

    assert settings.redis_url is None
    assert settings.api_token is None, "an empty token would let anyone retry jobs"


def test_every_setting_is_documented_in_docs_and_in_env_example() -> None:
    from app.settings import Settings
    root = Path(__file__).resolve().parents[2]
    page = (root / "docs" / "settings.md").read_text()
    example = (root / ".env.example").read_text()
    names = [field.validation_alias.choices[0] for field in Settings.model_fields.values()]  # type: ignore[union-attr]

    assert [name for name in names if f"`{name}`" not in page] == []
    assert [name for name in names if f"\n{name}=" not in example] == []
