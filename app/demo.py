"""The built-in demo: a FakePortal that behaves as a real Bitrix24 portal, wired in as portal `demo`,
and the real sequence played on it.

A conversion in the portal copies the lead's activities to the new company and contact and keeps the
lead binding; b24rebind then removes the lead binding, brings a late e-mail to the client, and gives a
repeat lead's history to the known client. `b24rebind demo --keep` leaves the demo portal running on a
fixed port with a fixed webhook, and `b24rebind demo convert` plays another conversion on it.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
from aiohttp import web
from pydantic import SecretStr

from app.portal_config import PortalConfig, RateLimit
from app.fakeportal import COMPANY, CONTACT, DEAL, LEAD, TYPE_NAMES, FakePortal
from app.rules.loader import parse_rules
from app.rules.model import RuleSet
from app.settings import Settings
from app.store.jobs import FINAL_STATES, JobRecord, JobStore

DEMO_DOMAIN = "demo.b24rebind.local"
# `demo --keep`: the demo portal's webhook, printed, so a person can call it too (on B24_DEMO_PORT).
DEMO_WEBHOOK_CODE = "demo0secret0code"
DEMO_APP_TOKEN = "demo-application-token"
CONVERT_PATH = "/demo/convert"
KINDS = [("Re: price list", 4, "CRM_EMAIL"), ("Call about delivery", 2, "VOXIMPLANT_CALL"),
         ("Send the contract", 6, "CRM_TODO")]
SHOWN = 5  # activities listed one by one; more are summed up
# Words in the order a CRM card shows its links.
ORDER = {LEAD: 0, DEAL: 1, CONTACT: 2, COMPANY: 3}


def demo_rules() -> RuleSet:
    """The demo always runs the built-in rules: a real rules file and its portals are left alone."""
    text = resources.files("app.rules").joinpath("default.yaml").read_text(encoding="utf-8")
    return parse_rules(text, "built-in default rules", {})


async def start_portal(stack: AsyncExitStack, port: int = 0, fake: FakePortal | None = None) -> FakePortal:
    """The demo portal, listening until `stack` closes."""
    fake = fake or FakePortal(webhook_code=DEMO_WEBHOOK_CODE)
    try:
        await fake.start(port=port)
    except OSError as exc:
        raise DemoError(f"the demo portal cannot listen on 127.0.0.1:{port}: {exc.strerror}. Is another "
                        "`b24rebind demo --keep` running? Stop it, or play on it with `b24rebind demo convert`.") \
            from None
    stack.push_async_callback(fake.close)
    return fake


class DemoError(Exception):
    """The demo cannot start or reach its portal; the message says what to do."""

    def __init__(self, message: str, portal_down: bool = False) -> None:
        super().__init__(message)
        self.portal_down = portal_down


def announce(fake: FakePortal, base_url: str, story: bool = False, keep: bool = False) -> None:
    lines = [f"\nThe built-in DEMO portal is running at {fake.base_url}" if story else
             f"\nNo portal is configured, so the built-in DEMO portal is running at {fake.base_url}",
             f"  dashboard:        {base_url}/", f"  events endpoint:  {base_url}/bitrix/events",
             f"  service status:   {base_url}/readyz", f"  job details:      {base_url}/api/jobs/<job_id>"]
    if keep:
        lines += [f"  demo webhook:     {fake.rest_url}  (fixed: B24_DEMO_PORT, code {DEMO_WEBHOOK_CODE})"]
    if not story:
        lines += ["Try `b24rebind demo` for a conversion played out on it; to use a real portal, see README.md,",
                  "'Connect your portal'."]
    print("\n".join(lines) + "\n", flush=True)


def demo_portal_config(portal: FakePortal) -> PortalConfig:
    return PortalConfig(name="demo", domain=DEMO_DOMAIN, rest_url=SecretStr(portal.rest_url),
                        application_token=SecretStr(DEMO_APP_TOKEN), rate_limit=RateLimit(per_second=2, burst=50))


def with_demo_portal(rules: RuleSet, config: PortalConfig) -> RuleSet:
    """Rules without portals get the demo portal; a file that names its own portals is left alone."""
    return rules if rules.portals else rules.model_copy(update={"portals": {"demo": config}})


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


async def play(stage: Stage) -> None:
    """The real sequence, scene by scene, each with what the portal did and what b24rebind added."""
    lead = await conversion(stage, activities=3, late=1)
    await repeat_lead(stage, lead)
    stage.say("\nWhat the portal did by itself: it copied the lead's activities to the company and contact it "
              "made,\nand left them bound to the lead. What b24rebind added: it removed the lead binding, "
              "brought the late\ne-mail to the client, and gave the repeat lead's history to the client the "
              "portal already knew.")
    stage.played.set()


async def conversion(stage: Stage, activities: int = 3, late: int = 0, name: str = "Anna Petrova") -> int:
    """A lead with history, converted in the portal (it copies), then the late e-mails."""
    fake = stage.fake
    lead = fake.add_lead(title=f"{name}, 20 chairs", name=name, email=f"{name.split()[0].lower()}@example.com")
    made_activities = {}
    for i in range(activities):
        subject, type_id, provider = KINDS[i % len(KINDS)]
        subject += f" #{i + 1}" if i >= len(KINDS) else ""
        made_activities[fake.add_activity([(LEAD, lead)], subject=subject, type_id=type_id,
                                          provider_id=provider)] = subject
    since = len(fake.events)
    made = fake.convert_lead(lead, contact=True, company=True)
    stage.say(f"\n1. Lead {lead} ({name}) is converted in the portal into contact {made['contact']} and company "
              f"{made['company']}.\n   The portal copies its {activities} activities there and keeps the lead "
              "binding:")
    stage.show(made_activities)
    records = await stage.send_events(since)
    stage.say(what_b24rebind_did(records, "removes the lead binding (the only writes it needs)"))
    stage.show(made_activities)
    if late:
        since = len(fake.events)
        late_ones = {fake.add_activity([(LEAD, lead)], subject=f"Re: delivery date #{i + 1}",
                                       email=f"{name.split()[0].lower()}@example.com"): f"late e-mail #{i + 1}"
                     for i in range(late)}
        stage.say(f"\n2. {late} e-mail{'s arrive' if late > 1 else ' arrives'} after the conversion, bound to the "
                  "converted lead only:")
        stage.show(late_ones)
        records = await stage.send_events(since)
        stage.say(what_b24rebind_did(records, "brings them to the client"))
        stage.show(late_ones)
    return lead


def what_b24rebind_did(records: list[JobRecord | None], does: str) -> str:
    """The story's line for what the jobs did; in a dry run (`mode: dry_run` in the playground's rules)
    they wrote nothing, and the bindings shown after it are the portal's own."""
    if any(record is not None and (record.dry_run or any(item.get("dry_run") for item in record.plan))
           for record in records):
        verb, rest = does.split(" ", 1)
        return f"   b24rebind would {verb[:-1]} {rest} (a dry run: nothing written; `b24rebind jobs show` says what):"
    return f"   b24rebind {does}:"


async def repeat_lead(stage: Stage, first_lead: int) -> None:
    """A known client writes again: the portal makes a repeat lead, and its conversion makes only a deal."""
    fake = stage.fake
    first = fake.leads[first_lead]
    contact, company = int(first["CONTACT_ID"]), int(first["COMPANY_ID"])
    lead = fake.add_lead(title=f"{first.get('NAME') or 'Client'}: 10 more chairs", contact_id=contact,
                         company_id=company)
    activity = fake.add_activity([(LEAD, lead)], subject="New order")
    since = len(fake.events)
    made = fake.convert_lead(lead)
    stage.say(f"\n3. The same client writes again: repeat lead {lead}. Its conversion makes only deal {made['deal']},"
              f"\n   and the portal attaches the activity to the deal alone; contact {contact} and company "
              f"{company} get nothing:")
    stage.show({activity: "New order"})
    records = await stage.send_events(since)
    stage.say(what_b24rebind_did(records, "gives it to the client the portal already knew"))
    stage.show({activity: "New order"})


async def start_stage(stack: AsyncExitStack, port: int = 0) -> Stage:
    """The demo portal with its control route, ready for `play` once the service has started."""
    stage = Stage(fake=FakePortal(webhook_code=DEMO_WEBHOOK_CODE))
    stage.fake.extra_routes.append(("POST", CONVERT_PATH, convert_handler(stage)))
    await start_portal(stack, port, stage.fake)
    return stage


def convert_handler(stage: Stage) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """`b24rebind demo convert` asks the kept demo for another conversion through this."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.query.get("code") != stage.fake.webhook_code:
            return web.json_response({"error": "wrong demo code"}, status=401)
        try:
            activities = max(0, min(int(request.query.get("activities", 3)), 500))
            late = max(0, min(int(request.query.get("late", 0)), 50))
        except ValueError:
            return web.json_response({"error": "--activities and --late take whole numbers"}, status=400)
        try:  # a conversion asked for while the opening story plays waits for its end
            await asyncio.wait_for(stage.played.wait(), timeout=120)
        except asyncio.TimeoutError:
            return web.json_response({"error": "the demo is still starting; try again in a moment"}, status=503)
        async with stage.turn:
            stage.lines = []
            lead = await conversion(stage, activities=activities, late=late, name=_next_name(stage.fake))
            if request.query.get("repeat") == "1":
                await repeat_lead(stage, lead)
            return web.json_response({"lines": stage.lines})

    return handle


def _next_name(fake: FakePortal) -> str:
    names = ["Boris Ivanov", "Clara Sidorova", "Dmitri Orlov", "Elena Smirnova", "Fyodor Kuznetsov"]
    return names[len(fake.leads) % len(names)]


async def convert_command(activities: int, late: int, repeat: bool, settings: Settings) -> int:
    """`b24rebind demo convert`: another conversion on the demo kept running by `demo --keep`."""
    port = settings.demo_port
    query: dict[str, Any] = {"code": DEMO_WEBHOOK_CODE, "activities": activities, "late": late,
                             "repeat": "1" if repeat else "0"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTING_GRACE
    waiting = False
    async with aiohttp.ClientSession() as http:
        while True:
            kept = find_playground(settings.data_dir)  # the demo's settings: its own data directory
            if kept is not None and kept.portal:
                port = urlsplit(kept.portal).port or port
            try:
                async with http.post(f"http://127.0.0.1:{port}{CONVERT_PATH}", params=query,
                                     timeout=aiohttp.ClientTimeout(total=300)) as response:
                    body = await response.json(content_type=None)
                break
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                # A demo just started (`demo --keep &`) is given time to come up; with none, say so soon.
                if kept is not None and not waiting:
                    waiting = True
                    deadline = max(deadline, loop.time() + KEPT_STARTING)
                    print(f"waiting for the demo (pid {kept.pid}) to start…", file=sys.stderr, flush=True)
                if loop.time() > deadline:
                    raise DemoError(f"no demo portal answers on 127.0.0.1:{port}: start one with `b24rebind demo "
                                    "--keep` in another terminal, then run this again", portal_down=True) from None
                await asyncio.sleep(0.3)
    if "error" in body:
        raise DemoError(f"the demo refused: {body['error']}")
    print("\n".join(body["lines"]))
    return 0


STARTING_GRACE = 5.0  # seconds a demo just started in the background may take to write its profile
KEPT_STARTING = 90.0  # seconds a kept demo that has written its profile may take to answer


# The playground: while `demo --keep` runs, every other command (jobs, stats, rules, backfill, undo,
# doctor, audit, watch) reaches it. The kept demo writes a profile in its data directory; a command run
# where no rules file exists finds the profile, says so in one line, and uses the demo's data and rules.
PROFILE = "playground.json"
PLAYGROUND_RULES = "rules.yaml"


@dataclass(frozen=True)
class Playground:
    """Where a running `demo --keep` keeps its things: what a command needs to reach it."""

    pid: int
    data_dir: str  # the demo's data directory (its bundled Redis, its rules file)
    key_prefix: str
    rules: str  # the demo's rules file: the built-in rules and the demo portal, reloaded when edited
    dashboard: str = ""  # the demo's web process, once it listens
    portal: str = ""  # the demo portal's address (its webhook's base URL)

    def write(self) -> None:
        path = Path(self.data_dir) / PROFILE
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps(asdict(self)), encoding="utf-8")
        staged.replace(path)  # a reader sees the old profile or the new, never half of one

    def settings_for(self, settings: Settings) -> Settings:
        return settings.model_copy(update={"data_dir": Path(self.data_dir), "key_prefix": self.key_prefix,
                                           "rules": Path(self.rules)})

    @property
    def notice(self) -> str:
        rules = Path(self.rules)
        if rules.is_relative_to(Path.cwd()):
            rules = rules.relative_to(Path.cwd())
        return f"using the demo kept running (pid {self.pid}): its jobs, portal 'demo' and rules {rules}"



def playground_dir(settings: Settings) -> Path:
    """Where the kept demo of an installation with these settings keeps its data."""
    return settings.data_dir / "demo"


def find_playground(demo_data_dir: Path) -> Playground | None:
    """The running kept demo of this data directory, or None (none was started, or it has stopped)."""
    try:
        found = Playground(**json.loads((demo_data_dir / PROFILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    return found if _alive(found.pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, though not ours to reach
        return True
    return True


def forget_playground(settings: Settings) -> None:
    """The kept demo is stopping: commands go back to the installation's own data."""
    profile = settings.data_dir / PROFILE
    try:
        if Playground(**json.loads(profile.read_text(encoding="utf-8"))).pid == os.getpid():
            profile.unlink()
    except (OSError, ValueError, TypeError):
        pass


def playground_rules(settings: Settings, portal: PortalConfig) -> Path:
    """The kept demo's rules file: the built-in rules with the demo portal, for a person to edit and try."""
    path = (settings.data_dir / PLAYGROUND_RULES).resolve()
    text = resources.files("app.rules").joinpath("default.yaml").read_text(encoding="utf-8")
    token = portal.application_token.get_secret_value() if portal.application_token else ""
    rest_url = portal.rest_url.get_secret_value() if portal.rest_url else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# The demo playground's rules (`b24rebind demo --keep` wrote them, and writes them again when it\n"
                    "# starts): the built-in rules and the demo portal. Edit them while the demo runs: it reloads\n"
                    "# them, and `b24rebind rules check|explain|test`, `backfill` and `undo` read them.\n"
                    f"portals:\n  demo:\n    domain: {portal.domain}\n    rest_url: {rest_url}\n"
                    f"    application_token: {token}\n    rate_limit: {{per_second: 2, burst: 50}}\n"
                    + text.split("\n", 1)[1], encoding="utf-8")
    return path


def keep_playground(stack: AsyncExitStack, settings: Settings) -> None:
    """Write the kept demo's profile as it starts, so other commands find it (and `demo convert` waits for
    it), and remove it when the demo stops; `playground_ready` adds the dashboard's address."""
    running = find_playground(settings.data_dir)
    if running is not None and running.pid != os.getpid():
        raise DemoError(f"a demo is kept running already (pid {running.pid}): play on it with `b24rebind demo "
                        "convert`, or stop it with `b24rebind demo stop`")
    rules = (settings.data_dir / PLAYGROUND_RULES).resolve()
    Playground(pid=os.getpid(), data_dir=str(settings.data_dir.resolve()), key_prefix=settings.key_prefix,
               rules=str(rules), portal=f"http://127.0.0.1:{settings.demo_port}/rest/1/{DEMO_WEBHOOK_CODE}/").write()
    stack.callback(forget_playground, settings)


def playground_ready(settings: Settings, dashboard: str) -> None:
    kept = find_playground(settings.data_dir)
    if kept is not None and kept.pid == os.getpid():
        replace(kept, dashboard=dashboard).write()


def stop_command(settings: Settings) -> int:
    """`b24rebind demo stop`: ask the kept demo to stop (SIGTERM), and wait until it has."""
    found = find_playground(settings.data_dir)  # the demo's settings: its own data directory
    if found is None:
        print("no demo is kept running here (nothing to stop)")
        return 0
    os.kill(found.pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    # The demo removes its profile last thing as it stops (its parent may not have reaped it yet).
    while find_playground(settings.data_dir) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    if find_playground(settings.data_dir) is not None:
        raise DemoError(f"the demo (pid {found.pid}) did not stop within 60 s; stop it with `kill {found.pid}`")
    print(f"the demo (pid {found.pid}) has stopped")
    return 0
