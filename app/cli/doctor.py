"""`b24rebind doctor`: a read-only checklist of a portal's setup, each failure with what to do.

Run after filling in `.env` and the rules file. It only reads (`scope`, `method.get`,
`crm.settings.mode.get`, one `crm.activity.list`, and `event.offline.list` where offline events are
used), about ten requests, and exits 0 only when every check passes.
"""
from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from redis.asyncio import Redis

from app.bitrix.client import Answer, RestClient, RetryPolicy
from app.bitrix.connect import portal_client
from app.bitrix.errors import B24Error, ConfigError
from app.bitrix.oauth import TokenStore
from app.portal_config import PortalConfig
from app.cli.commands import pick_portal, redis_for
from app.live_rules import load_service_rules, variables
from app.intake.spool import QUARANTINE, spool_dir, spool_status
from app.rebind.crm_mode import read_mode, simple_mode_warning
from app.rules.loader import load_rules
from app.rules.model import SIMPLE_CRM, RuleSet
from app.settings import Settings

# The methods the service writes and reads bindings with (crm.activity.binding.*, crm.timeline.bindings.*).
BINDING_METHODS = ("crm.activity.binding.list", "crm.activity.binding.add", "crm.activity.binding.delete",
                   "crm.activity.binding.move", "crm.timeline.bindings.list", "crm.timeline.bindings.bind",
                   "crm.timeline.bindings.unbind")
# No lead has this id: a portal that honours filter[BINDINGS] answers an empty list.
PROBE_LEAD = 2_147_483_647
BUDGET_WARNING = 0.8  # share of a method's server-time budget (10 minutes) used that fails the check


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""
    fix: str = ""

    def lines(self) -> list[str]:
        mark = "✓" if self.ok else "✗"
        out = [f"  {mark} {self.name}" + (f": {self.detail}" if self.detail else "")]
        if not self.ok and self.fix:
            out.append(f"      what to do: {self.fix}")
        return out


class Doctor:
    """The checks, in the order a person fixes them; each reads the portal at most once or twice."""

    def __init__(self, portal: PortalConfig, rules: RuleSet, client: RestClient,
                 installed: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.portal, self.rules, self.client = portal, rules, client
        self._installed = installed
        self._times: list[dict[str, Any]] = []

    async def run(self) -> list[Check]:
        installed: list[Check] = []
        if self.portal.auth == "oauth":  # without the install's tokens nothing else can be asked
            installed = [await self._installed_check()]
            if not installed[0].ok:
                return installed + [Check("the other checks", False, "not run: the application must be installed")]
        answered, scopes = await self._answers()
        if not answered.ok:
            return [*installed, answered, Check("the other checks", False, "not run: the portal must answer first")]
        checks = [*installed, answered, self._crm_scope(scopes)]
        for name, check in (("the binding methods exist", self._methods), ("CRM mode", self._crm_mode),
                            ("crm.activity.list filters by BINDINGS", self._bindings_filter)):
            checks.append(await _guarded(name, check))
        checks.append(self._domain())
        if self.portal.offline_events:
            checks.append(await self._offline_events())
        checks.append(self._budget())
        return checks

    async def _call(self, method: str, params: dict[str, Any] | None = None) -> Answer:
        answer = await self.client.call(method, params or {})
        self._times.append({"method": method, **answer.time})
        return answer

    async def _answers(self) -> tuple[Check, list[str]]:
        name = "the portal answers the webhook" if self.portal.auth == "webhook" else "the portal answers the app"
        try:
            scopes = [str(s) for s in (await self._call("scope")).result or []]
        except ConfigError as exc:
            return Check(name, False, f"{exc.code}: {exc.description}", exc.hint or "check rest_url"), []
        except B24Error as exc:
            return Check(name, False, f"{exc.code or 'no answer'}: {exc.description}",
                         "check that the portal's address in rest_url is right and reachable from here"), []
        return Check(name, True, f"scopes {', '.join(scopes) or 'none'}"), scopes

    @staticmethod
    def _crm_scope(scopes: list[str]) -> Check:
        if "crm" in scopes:
            return Check("its scopes include crm", True)
        return Check("its scopes include crm", False, f"it has {', '.join(scopes) or 'none'}",
                     "edit the inbound webhook in the portal (Developer resources) and tick CRM (crm)")

    async def _methods(self) -> Check:
        missing = []
        for method in BINDING_METHODS:
            found = (await self._call("method.get", {"name": method})).result or {}
            if not (found.get("isExisting") and found.get("isAvailable")):
                missing.append(method)
        if not missing:
            return Check("the binding methods exist", True, f"{len(BINDING_METHODS)} of {len(BINDING_METHODS)}")
        return Check("the binding methods exist", False, f"missing or not allowed: {', '.join(missing)}",
                     "the portal is too old or the webhook lacks the crm scope; update the portal "
                     "(a box edition needs the crm module updated) and check the scope")

    async def _crm_mode(self) -> Check:
        mode = int((await self._call("crm.settings.mode.get")).result or 0)  # as read_mode, with its time
        if mode != SIMPLE_CRM:
            return Check("CRM mode", True, "classic (leads are kept until converted)")
        never = self.rules.lead_rules()
        if not never:
            return Check("CRM mode", True, "simple (no leads); no rule needs leads")
        names = "; ".join(f"{name} ({reason})" for name, reason in never.items())
        return Check("CRM mode", False, f"simple: the portal has no leads, so these rules can never fire: {names}",
                     "switch the portal to classic CRM (CRM settings > CRM mode), or rewrite these rules "
                     "for deals, contacts and companies")

    async def _bindings_filter(self) -> Check:
        name = "crm.activity.list filters by BINDINGS"
        try:
            answer = await self._call("crm.activity.list", {
                "filter": {"BINDINGS": [{"OWNER_TYPE_ID": 1, "OWNER_ID": PROBE_LEAD}]}, "select": ["ID"],
                "start": -1})
        except B24Error as exc:
            return Check(name, False, f"{exc.code}: {exc.description}", exc.hint)
        if answer.result:
            return Check(name, False, "the portal ignored the filter and listed other activities",
                         "update the portal: the service finds a lead's activities with this filter")
        return Check(name, True)

    def _domain(self) -> Check:
        if self.portal.rest_url is None:
            return Check("the rules' domain is the portal's", True, self.portal.domain)
        host = (urlsplit(self.portal.rest_url.get_secret_value()).hostname or "").lower()
        if host == self.portal.domain:
            return Check("the rules' domain is the webhook's host", True, host)
        if host in ("127.0.0.1", "::1", "localhost") and self.portal.domain.endswith(".local"):
            # The demo portal: on this machine, its events name a .local domain no real portal has.
            return Check("the rules' domain", True, f"{self.portal.domain} (the webhook is on this machine)")
        return Check("the rules' domain is the webhook's host", False,
                     f"the rules say {self.portal.domain}, the webhook calls {host}",
                     f"set domain: {host} in the rules file (events carry the portal's domain, and an event "
                     "from an unknown domain is refused), unless the portal really has two addresses")

    async def _installed_check(self) -> Check:
        tokens = await self._installed() if self._installed else None
        return Check("the application is installed", tokens is not None,
                     "tokens from ONAPPINSTALL are stored" if tokens else "no tokens from ONAPPINSTALL",
                     "install (or reinstall) the application on the portal while `b24rebind serve` is "
                     "running, so its ONAPPINSTALL reaches /bitrix/install")

    async def _offline_events(self) -> Check:
        """Call the read-only event.offline.list: `method.get` says every event.* method is available on
        every portal (the global scope), and only a call shows the refusal, for a webhook
        (WRONG_AUTH_TYPE) and for an application installed by a user who is no administrator
        (ACCESS_DENIED). Docs: api-reference/events/event-offline-list.md."""
        name = "offline events can be read"
        try:
            await self._call("event.offline.list", {"order": {"ID": "ASC"}})
        except B24Error as exc:
            fixes = {"WRONG_AUTH_TYPE": "offline events can be read only by an application (auth: oauth), never "
                                        "through a webhook: install the application, or set offline_events: false",
                     "ACCESS_DENIED": "the application's user is not a portal administrator: reinstall the "
                                      "application as an administrator, or set offline_events: false"}
            return Check(name, False, f"{exc.code or 'error'}: {exc.description}",
                         fixes.get(exc.code.upper(), exc.hint or "see docs/errors.md for this error"))
        return Check(name, True, "event.offline.list answered")

    def _budget(self) -> Check:
        """The `time` block of each answer says how much server time its method used in the window."""
        used = max((float(t.get("operating") or 0) for t in self._times), default=0.0)
        share = used / self.portal.operating_budget
        detail = f"{used:.0f} s of {self.portal.operating_budget:.0f} s server time used in 10 minutes " \
                 f"by the busiest method read here"
        return Check("request budget left", share < BUDGET_WARNING, detail,
                     "another integration spends the portal's server time; the service will wait for "
                     "it to reset. Find that integration, or lower its load")


async def _guarded(name: str, check: Callable[[], Awaitable[Check]]) -> Check:
    """A check whose read the portal refused fails with the portal's words, not a traceback."""
    try:
        return await check()
    except B24Error as exc:
        return Check(name, False, f"{exc.code or 'error'}: {exc.description}",
                     exc.hint or "see docs/errors.md for this error")


async def doctor(settings: Settings, portal_name: str | None) -> int:
    """The command: the rules file's portal (or --portal), and for an application its stored tokens."""
    rules = load_service_rules(settings)
    portal = pick_portal(rules, portal_name)
    async with AsyncExitStack() as stack:
        return await doctor_command(portal, rules, await redis_for(portal, settings, stack),
                                    local=[spool_check(spool_dir(settings))])


def spool_check(directory: Path) -> Check:
    """Events spooled on this machine's disk: waiting to be queued, or quarantined for a person."""
    status = spool_status(directory)
    if "error" in status:
        return Check("the spool", False, str(status["error"]), "give the service's user access to B24_DATA_DIR")
    waiting, quarantined = int(status["waiting_segments"]), int(status["quarantined"])
    detail = f"{waiting} segments wait to be queued, {quarantined} lines quarantined ({directory})"
    if quarantined:
        return Check("the spool", False, detail, f"read each line's reason in {directory / QUARANTINE}; post "
                     "again what should be a job, then move the file away")
    if waiting:
        return Check("the spool", False, detail, "the web process queues them once Redis answers; if they stay, "
                     "its log says why (Redis refusing writes, a segment it cannot read)")
    return Check("the spool", True, f"nothing waiting, nothing quarantined ({directory})")


async def check_crm_mode(path: Path | None, settings: Settings, portal_name: str) -> int:
    """`rules check --portal`: one read of the portal's CRM mode; rules about leads never fire without leads."""
    rules = load_rules(path, variables()) if path else load_service_rules(settings)
    portal = pick_portal(rules, portal_name)
    async with AsyncExitStack() as stack:
        redis = await redis_for(portal, settings, stack)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        client = portal_client(http, portal, redis, retry=RetryPolicy(attempts=2, base=0.5), timeout=20)
        mode = await read_mode(client)  # a refusal or no answer: the command's edge says what to do
    warning = simple_mode_warning(rules, portal_name, mode)
    if warning:
        print(f"b24rebind: {warning}", file=sys.stderr)
        return 1
    print(f"portal {portal_name}: {'simple' if mode == SIMPLE_CRM else 'classic'} CRM mode; the rules can fire there")
    return 0


async def doctor_command(portal: PortalConfig, rules: RuleSet, redis: Redis | None = None,
                         local: list[Check] | None = None) -> int:
    """Check the portal, reading only; an application's (its tokens are in `redis`) with its own tokens.
    `local`: checks of this machine made beforehand (the spool), printed after the portal's."""
    print(f"b24rebind doctor: portal {portal.name or portal.domain} ({portal.domain}), reading only")
    async with aiohttp.ClientSession() as http:
        installed = partial(TokenStore(redis).load, portal.name) if redis is not None else None
        client = portal_client(http, portal, redis, retry=RetryPolicy(attempts=2, base=0.5), timeout=20)
        checks = await Doctor(portal, rules, client, installed).run() + list(local or [])
    for check in checks:
        print("\n".join(check.lines()))
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks) - failed} of {len(checks)} checks pass" + ("" if not failed else "; fix the ✗ and run "
                                                                    "`b24rebind doctor` again"),
          file=sys.stdout)
    return 0 if not failed else 1
