"""A portal in simple CRM mode has no leads (crm.settings.mode.get = 2): rules about leads never fire.

A worker learns it when a lead an event named cannot be read (in simple mode a new lead becomes a deal
at once), and notes it in Redis; /readyz and the job's outcome then say so instead of leaving people to
wait for work that cannot come. `b24rebind doctor` and `rules check --portal` ask the portal directly.
"""
from __future__ import annotations

from typing import Any

from app.bitrix.client import RestClient
from app.rules.model import SIMPLE_CRM, RuleSet
from app.store.namespace import prefixed

MODE_KEY = "b24:crm_mode:"  # + portal name -> "1" classic, "2" simple
MODE_TTL = 86400  # a portal's mode is changed by hand, rarely: re-learnt within a day


async def read_mode(client: RestClient) -> int:
    return int((await client.call("crm.settings.mode.get")).result or 0)


async def note_mode(redis: Any, portal: str, mode: int) -> None:
    await redis.set(prefixed(MODE_KEY + portal), str(mode), ex=MODE_TTL)


async def noted_modes(redis: Any, portals: list[str]) -> dict[str, int]:
    if not portals:
        return {}
    values = await redis.mget([prefixed(MODE_KEY + name) for name in portals])
    return {name: int(value) for name, value in zip(portals, values) if value}


def simple_mode_warning(rules: RuleSet, portal: str, mode: int) -> str | None:
    """What to tell people about a portal in this mode, or None when nothing is wrong."""
    never = rules.lead_rules()
    if mode != SIMPLE_CRM or not never:
        return None
    return (f"portal {portal} is in simple CRM mode (no leads): these rules can never fire: "
            f"{', '.join(never)}; switch it to classic CRM or rewrite them for deals, contacts and companies")
