"""The demo's stage and its output: what a scene needs (the portal, the service's events URL, its job
store), the events posted as a portal posts them, and activities' bindings in the words a CRM card uses."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp

from app.demo.portal import DEMO_APP_TOKEN, DEMO_DOMAIN, demo_portal_config
from app.fakeportal import COMPANY, CONTACT, DEAL, LEAD, TYPE_NAMES, FakePortal
from app.portal_config import PortalConfig
from app.store.jobs import FINAL_STATES, JobRecord, JobStore

SHOWN = 5  # activities listed one by one; more are summed up
# Words in the order a CRM card shows its links.
ORDER = {LEAD: 0, DEAL: 1, CONTACT: 2, COMPANY: 3}


def event_body(portal: PortalConfig, event: str, entity_id: int, ts: int) -> str:
    """An outbound-webhook event exactly as a portal posts it (form-encoded, PHP-style keys)."""
    token = portal.application_token.get_secret_value() if portal.application_token else ""
    return urlencode({
        "event": event, "event_handler_id": "1", "data[FIELDS][ID]": str(entity_id), "ts": str(ts),
        "auth[domain]": portal.domain, "auth[client_endpoint]": f"https://{portal.domain}/rest/",
        "auth[server_endpoint]": "https://oauth.bitrix.info/rest/", "auth[member_id]": "demo",
        "auth[application_token]": token,
    })


def in_words(fake: FakePortal, activity: int) -> str:
    """`lead 1, contact 1, company 1`: an activity's bindings as a CRM card lists its links."""
    bindings = sorted(fake.bindings(activity), key=lambda b: (ORDER.get(b[0], 9), b[1]))
    return ", ".join(f"{TYPE_NAMES.get(t, f'type {t}')} {i}" for t, i in bindings)


@dataclass
class Stage:
    """What a scene needs: the portal, the service's events URL and job store; filled in as they start."""

    fake: FakePortal
    events_url: str = ""
    store: JobStore | None = None
    lines: list[str] = field(default_factory=list)
    played: asyncio.Event = field(default_factory=asyncio.Event)  # the opening story is over: conversions may come
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)  # one `demo convert` at a time: their words apart

    @property
    def config(self) -> PortalConfig:
        return demo_portal_config(self.fake)

    def say(self, text: str) -> None:
        self.lines.append(text)
        print(text, flush=True)

    async def send_events(self, since: int) -> list[JobRecord | None]:
        """Post what the portal recorded since `since`, in its order, and wait for the jobs."""
        job_ids: list[str] = []
        sent: list[tuple[str, list[int]]] = []
        if not self.fake.subscribed:  # the portal echoes each binding write to the service (ONCRMACTIVITYUPDATE)
            self.fake.subscribe(self.events_url, DEMO_APP_TOKEN, DEMO_DOMAIN)
        echoes, ignored = len(self.fake.echoes), self.fake.echo_replies["ignored"]
        async with aiohttp.ClientSession() as http:
            for event, entity_id in self.fake.events[since:]:
                async with http.post(self.events_url, data=event_body(self.config, event, entity_id,
                                                                      int(time.time())),
                                     headers={"Content-Type": "application/x-www-form-urlencoded"}) as response:
                    answer = await response.json()
                if answer.get("job_id"):  # events no rule listens to are answered "ignored"
                    job_ids.append(str(answer["job_id"]))
                if sent and sent[-1][0] == event:
                    sent[-1][1].append(entity_id)
                else:
                    sent.append((event, [entity_id]))
        for event, ids in sent:
            what = f"{event} {ids[0]}" if len(ids) == 1 else f"{event} for {len(ids)} records"
            why = " (a closed lead's open calls and to-dos are completed; no rule listens to it)" \
                if event == "ONCRMACTIVITYUPDATE" else ""
            self.say(f"  the portal sent {what}{why}")
        records = [await self._wait(job_id) for job_id in job_ids]
        await self.fake.echoes_sent()
        if len(self.fake.echoes) > echoes:
            self.say(f"  the portal echoed b24rebind's {len(self.fake.echoes) - echoes} writes (ONCRMACTIVITYUPDATE); "
                     f"b24rebind ignored {self.fake.echo_replies['ignored'] - ignored} (echoes of its own writes; no rule "
                     "here listens to activity updates)")
        return records

    async def _wait(self, job_id: str, timeout: float = 60) -> JobRecord | None:
        assert self.store is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            record = await self.store.get(job_id)
            if record and record.state in FINAL_STATES:
                return record
            await asyncio.sleep(0.2)
        return await self.store.get(job_id)

    def show(self, activities: dict[int, str]) -> None:
        for activity, subject in list(activities.items())[:SHOWN]:
            self.say(f"    activity {activity} ({subject}): {in_words(self.fake, activity)}")
        rest = list(activities)[SHOWN:]
        if rest:
            alike = sum(in_words(self.fake, a) == in_words(self.fake, rest[0]) for a in rest)
            self.say(f"    ... and {len(rest)} more" + (", the same" if alike == len(rest) else ""))
