"""FactReader: what a job reads about a lead is the same whether its reads went alone or merged with
other jobs' into one list (app/bitrix/merge.py)."""
from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from app.bitrix.client import RestClient, RetryPolicy
from app.portal_config import PortalConfig
from app.bitrix.ratelimit import LocalRateLimiter
from app.bitrix.batcher import PortalBatcher
from app.fakeportal import LEAD, FakePortal
from app.rebind.reading import FactReader
from app.rules.model import RuleSet


async def test_a_leads_facts_are_the_same_read_alone_or_merged_with_other_jobs(
        portal: FakePortal, portal_config: PortalConfig, rules: RuleSet) -> None:
    leads = [portal.add_lead(email=f"client{n}@example.com") for n in range(6)]
    for lead in leads:
        portal.add_activity([(LEAD, lead)])
        portal.convert_lead_over_rest(lead)

    async with aiohttp.ClientSession() as http:
        alone = [await FactReader(RestClient(http, portal_config, LocalRateLimiter()), rules)
                 .for_lead("ONCRMLEADUPDATE", lead) for lead in leads]
        reads_alone = portal.method_calls["crm.lead.get"]
        session = PortalBatcher(http, portal_config, LocalRateLimiter(), retry=RetryPolicy(attempts=2, base=0.01))
        clients = [RestClient.joining(session) for _ in leads]
        together = await asyncio.gather(*(FactReader(client, rules).for_lead("ONCRMLEADUPDATE", lead)
                                          for client, lead in zip(clients, leads)))
        await session.close()

    assert reads_alone == len(leads)
    assert portal.method_calls["crm.lead.list"] == 1  # the six leads in one list
    facts: list[Any] = [(a.leads, a.activities) for a in alone]
    assert [(t.leads, t.activities) for t in together] == facts
    assert all(lead.modified and lead.contact_ids for f in alone for lead in f.leads.values())
