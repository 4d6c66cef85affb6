"""The built-in demo portal: a FakePortal wired in as portal `demo`, and a short scripted story."""
from __future__ import annotations

import asyncio
import secrets
import time
from contextlib import AsyncExitStack
from urllib.parse import urlencode

import aiohttp

from app.bitrix.portal import PortalConfig, RateLimit
from app.fakeportal.portal import FakePortal
from app.rules.model import RuleSet
from app.store.jobs import FINAL_STATES, JobRecord, JobStore

DEMO_DOMAIN = "demo.b24rebind.local"


async def start_portal(stack: AsyncExitStack) -> FakePortal:
    """The demo portal, listening until `stack` closes."""
    fake = FakePortal()
    await fake.start()
    stack.push_async_callback(fake.close)
    return fake


def announce(fake: FakePortal, base_url: str) -> None:
    print(f"\nNo portal is configured, so the built-in DEMO portal is running at {fake.base_url}\n"
          f"  dashboard:        {base_url}/\n"
          f"  events endpoint:  {base_url}/bitrix/events\n"
          f"  service status:   {base_url}/readyz\n"
          f"  job details:      {base_url}/api/jobs/<job_id>\n"
          "Try `b24rebind demo` for a conversion played out on it; to use a real portal, see README.md,\n"
          "'Connect your portal'.\n", flush=True)


def demo_portal_config(portal: FakePortal) -> PortalConfig:
    return PortalConfig(name="demo", domain=DEMO_DOMAIN, rest_url=portal.rest_url,
                        application_token=secrets.token_hex(16), rate_limit=RateLimit(per_second=2, burst=50))


def with_demo_portal(rules: RuleSet, config: PortalConfig) -> RuleSet:
    """Rules without portals get the demo portal; a file that names its own portals is left alone."""
    return rules if rules.portals else rules.model_copy(update={"portals": {"demo": config}})


def event_body(portal: PortalConfig, event: str, entity_id: int, ts: int) -> str:
    """An outbound-webhook event exactly as a portal posts it (form-encoded, PHP-style keys)."""
    return urlencode({
        "event": event, "event_handler_id": "1", "data[FIELDS][ID]": str(entity_id), "ts": str(ts),
        "auth[domain]": portal.domain, "auth[client_endpoint]": f"https://{portal.domain}/rest/",
        "auth[server_endpoint]": "https://oauth.bitrix.info/rest/", "auth[member_id]": "demo",
        "auth[application_token]": portal.application_token.get_secret_value(),
    })


async def play(fake: FakePortal, config: PortalConfig, events_url: str, store: JobStore) -> None:
    """Seed a lead with history, convert it, fire the portal's events and show the activities move."""
    lead = fake.add_lead(title="Anna Petrova, 20 chairs", email="anna@example.com")
    activities = [
        fake.add_activity([(1, lead)], subject="Re: price list", type_id=4, provider_id="CRM_EMAIL"),
        fake.add_activity([(1, lead)], subject="Call about delivery", type_id=2, provider_id="VOXIMPLANT_CALL"),
        fake.add_activity([(1, lead)], subject="Send the contract", type_id=6, provider_id="CRM_TODO"),
    ]
    made = fake.convert_lead(lead, contact=True, company=True)
    print(f"demo: lead {lead} converted into contact {made['contact']} and company {made['company']}; "
          f"its {len(activities)} activities are still bound to the lead")
    ts = int(time.time())
    async with aiohttp.ClientSession() as http:
        async with http.post(events_url, data=event_body(config, "ONCRMLEADUPDATE", lead, ts),
                             headers={"Content-Type": "application/x-www-form-urlencoded"}) as response:
            answer = await response.json()
    print(f"demo: the portal sent ONCRMLEADUPDATE; the service answered {answer}")
    record = await _wait(store, answer.get("job_id", ""))
    print(f"demo: job {record.id if record else '?'} is {record.state.value if record else 'missing'}: "
          f"{record.outcome if record else ''}")
    for activity in activities:
        print(f"demo:   activity {activity} now bound to {fake.bindings(activity)} (type id, entity id)")


async def _wait(store: JobStore, job_id: str, timeout: float = 30) -> JobRecord | None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        record = await store.get(job_id)
        if record and record.state in FINAL_STATES:
            return record
        await asyncio.sleep(0.2)
    return await store.get(job_id)
