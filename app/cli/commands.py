"""The rules tools of the `b24rebind` command: explain, test and backfill."""
from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from redis.asyncio import Redis

from app import service
from app.bitrix.connect import portal_client
from app.portal_config import PortalConfig
from app.cli.backfill import BackfillRun, progress_bar, queue_backfill, summarise
from app.cli.exits import Exit, Failure, NotFound
from app.live_rules import load_service_rules, variables
from app.rebind.reading import LEAD_LISTS, FactReader, Gone
from app.rules.engine import explain, plan
from app.rules.facts import Activity, Binding, Client, Facts, Lead, bindings_text
from app.rules.loader import RulesError, load_rules
from app.rules.model import KINDS, RuleSet
from app.settings import Settings
from app.store.bundled_redis import with_redis
from app.store.jobs import FINAL_STATES, JobStore
from app.store.queue import JobQueue, connect


class CommandError(Failure):
    """A tool cannot run as asked (a wrong argument); the message says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message, Exit.USAGE)


def pick_portal(rules: RuleSet, name: str | None) -> PortalConfig:
    if name:
        if name not in rules.portals:
            raise CommandError(f"no portal {name!r} in the rules file; it has: {', '.join(rules.portals) or 'none'}")
        return rules.portals[name]
    if len(rules.portals) != 1:
        raise CommandError("the rules file has " + (f"{len(rules.portals)} portals; choose one with --portal"
                                                    if rules.portals else "no portal; add one (see README)"))
    return next(iter(rules.portals.values()))


async def redis_for(portal: PortalConfig, settings: Settings, stack: AsyncExitStack) -> Redis | None:
    """The service's Redis for a tool reading an application's portal (its tokens are kept there); a
    webhook portal is read without one."""
    if portal.auth != "oauth":
        return None
    redis = await connect(with_redis(settings, stack))
    stack.push_async_callback(redis.aclose)
    return redis


async def explain_command(settings: Settings, activity: int | None, lead: int | None, portal_name: str | None,
                          event: str | None) -> int:
    """Read the portal (never write) and print which rules match, why others do not, and the plan."""
    rules = load_service_rules(settings)
    portal = pick_portal(rules, portal_name)
    async with AsyncExitStack() as stack:
        redis = await redis_for(portal, settings, stack)
        client = portal_client(await stack.enter_async_context(aiohttp.ClientSession()), portal, redis)
        reader = FactReader(client, rules, lead_lists=LEAD_LISTS)
        try:
            if activity is not None:
                facts = await reader.for_activity(event or "ONCRMACTIVITYADD", activity)
            else:
                facts = await reader.for_lead(event or "ONCRMLEADUPDATE", lead or 0)
        except Gone:
            what = f"activity {activity}" if activity is not None else f"lead {lead}"
            raise NotFound(f"portal {portal.name} ({portal.domain}) has no {what}, or the webhook's user cannot "
                           "see it: check the id (it is in the record's address in the portal)") from None
    print(render_explanation(rules, facts))
    print(f"\n({client.requests} read requests; nothing was written)")
    return 0


def render_explanation(rules: RuleSet, facts: Facts) -> str:
    lines = [f"Event {facts.event} on portal {facts.portal}"]
    for lead in facts.leads.values():
        made = ", ".join(f"{kind} {i}" for kind, ids in (("contact", lead.contact_ids), ("company", lead.company_ids),
                                                          ("deal", lead.deal_ids)) for i in ids) or "nothing"
        lines.append(f"Lead {lead.id}: status {lead.status_id or '?'}; conversion made {made}")
    if not facts.activities:
        lines.append(_why_no_activities(rules, facts))
    verdicts = explain(rules, facts)
    for activity in facts.activities:
        lines.append(f"\nActivity {activity.id} {activity.subject!r}, bound to "
                     f"{', '.join(str(b) for b in activity.bindings)}")
        for verdict in (v for v in verdicts if v.activity_id == activity.id):
            mark = "matches" if verdict.matched else "does not match:"
            lines.append(f"  rule {verdict.rule!r} {mark}{'' if verdict.matched else ' ' + verdict.reason}")
    result = plan(rules, facts)
    rows = [(str(p.activity_id), bindings_text(p.before), bindings_text(p.after), "; ".join(p.notes))
            for p in result.activities]
    lines += ["", "Plan (before -> after):", *_table(("activity", "before", "after", "notes"), rows)]
    return "\n".join(lines)


def _why_no_activities(rules: RuleSet, facts: Facts) -> str:
    """Say which of the reasons it is: a lead no rule applies to yet (its activities are not read), or none."""
    listening = [rule for rule in rules.rules if rule.enabled and facts.event in rule.on]
    if not listening:
        return f"No rule listens to {facts.event}, so nothing was read; try --event with one the rules name."
    for lead in facts.leads.values():
        wanted = {s for rule in listening for s in rule.when.lead_status or ()}
        if wanted and not any(lead.has_status(s) for s in wanted):
            state = "converted" if lead.converted else f"in progress (status {lead.status_id or 'unknown'})"
            return (f"Lead {lead.id} is {state}; the rules for {facts.event} apply to leads whose status is "
                    f"{', '.join(sorted(wanted))}, so its activities were not read. They will be once it is.")
        return f"Lead {lead.id} has no activities bound to it."
    return "No activities to look at."


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in (header, *rows)]


def test_command(path: Path, settings: Settings) -> int:
    """Run the rule test cases in a YAML file: facts in, expected bindings out."""
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CommandError(f"cannot read rule tests {path}: {exc}") from None
    if spec.get("rules"):  # named: that file and no other, or the cases would pass against the wrong rules
        rules_path = path.parent / str(spec["rules"])
        if not rules_path.is_file():
            raise NotFound(f"the rule tests {path} name the rules file {rules_path}, which does not exist: "
                           f"fix `rules:` in {path} (a path relative to it)")
        rules = load_rules(rules_path, variables(), stand_ins=True)
    else:
        rules_path, rules = settings.rules, load_service_rules(settings)
    failures = 0
    for number, case in enumerate(spec.get("cases") or [], start=1):
        name = case.get("name") or f"case {number}"
        try:
            got = _run_case(rules, case)
            expected = sorted(str(Binding.parse(str(b))) for b in case.get("expect", []))
        except (KeyError, ValueError, TypeError) as exc:
            print(f"ERROR {name}: {exc!r} in the case's facts ({path})")
            failures += 1
            continue
        if sorted(got) == expected:
            print(f"pass  {name}")
        else:
            failures += 1
            print(f"FAIL  {name}: expected {', '.join(expected) or 'no bindings'}; the rules give {', '.join(got)}")
    print(f"{len(spec.get('cases') or []) - failures} passed, {failures} failed ({rules_path})")
    return 1 if failures else 0


def _run_case(rules: RuleSet, case: dict[str, Any]) -> list[str]:
    spec = case["activity"]
    kind = KINDS.get(str(spec.get("kind", "email")), ("", None))
    activity = Activity(
        id=int(spec.get("id", 1)), bindings=tuple(Binding.parse(str(text)) for text in spec["bound_to"]),
        subject=str(spec.get("subject", "")), type_id=kind[0], provider_id=kind[1] or str(spec.get("provider", "")),
        direction={"incoming": "1", "outgoing": "2"}.get(str(spec.get("direction")), ""),
        responsible_id=int(spec.get("responsible", 0)), emails=tuple(spec.get("emails", ())))
    leads = {int(lead["id"]): Lead(id=int(lead["id"]), status_id=str(lead.get("status", "")),
                                   status_semantic="S" if lead.get("status") == "CONVERTED" else "",
                                   contact_ids=tuple(lead.get("contacts", ())),
                                   company_ids=tuple(lead.get("companies", ())), deal_ids=tuple(lead.get("deals", ())))
             for lead in case.get("leads", [])}
    clients = {key: {int(c["id"]): Client(id=int(c["id"]), contact_ids=tuple(c.get("contacts", ())),
                                          company_ids=tuple(c.get("companies", ())))
                     for c in case.get(key, [])} for key in ("contacts", "deals")}
    matched = case.get("matched")
    matches = {activity.id: Client(id=activity.id, contact_ids=tuple(matched.get("contacts", ())),
                                   company_ids=tuple(matched.get("companies", ())))} if matched else {}
    facts = Facts(portal=str(case.get("portal", next(iter(rules.portals), "main"))),
                  event=str(case.get("event", "ONCRMACTIVITYADD")).upper(), activities=(activity,), leads=leads,
                  contacts=clients["contacts"], deals=clients["deals"], matches=matches)
    (planned,) = plan(rules, facts).activities
    return sorted(str(b) for b in planned.after)


async def backfill_command(settings: Settings, since: str, only_rule: str | None, dry_run: bool,
                           portal_name: str | None, wait: bool = True) -> int:
    """Queue history on the low-priority queue, work it off here, and print a summary."""
    rules = load_service_rules(settings)
    portal = pick_portal(rules, portal_name)
    if only_rule and only_rule not in {rule.name for rule in rules.rules}:
        raise CommandError(f"no rule {only_rule!r}; the rules are: {', '.join(r.name for r in rules.rules)}")
    async with AsyncExitStack() as stack:
        settings = with_redis(settings, stack)
        redis = await connect(settings)
        stack.push_async_callback(redis.aclose)
        store = JobStore.from_settings(redis, settings)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        run = BackfillRun(portal.name, since, only_rule, dry_run)
        client = portal_client(http, portal, redis, low_priority=True)
        job_ids = await queue_backfill(run, client, JobQueue(redis, store), redis)
        print(f"backfill: {len(job_ids)} converted leads since {since} queued on the low-priority queue"
              + (" (dry run: nothing will be written)" if dry_run else ""), flush=True)
        if wait:
            await _work_off(settings, rules, redis, store, job_ids, portal.name)
        for line in (await summarise(store, job_ids)).lines():
            print(f"  {line}")
    return 0


async def _work_off(settings: Settings, rules: RuleSet, redis: Any, store: JobStore, job_ids: list[str],
                    portal: str) -> None:
    worker = service.backfill_worker(settings, rules, redis, portal)
    task = asyncio.create_task(worker.async_run())
    try:
        while not task.done():
            await _draw_progress(store, job_ids)
            await asyncio.wait([task], timeout=0.5)
        await _draw_progress(store, job_ids)  # the last job's end too: the bar stops at the real count
    finally:
        # On Ctrl-C as on success: the job in hand is recorded as interrupted (it runs again later), and
        # the worker's HTTP session and shared calls are closed, not left for the garbage collector.
        worker.allow_pick_jobs = False
        running = [task, *worker.tasks.values()]
        for each in running:
            each.cancel()  # a job cancelled puts itself back on the queue before its task ends
        await asyncio.gather(*running, return_exceptions=True)
        print(file=sys.stderr)
        if worker.on_shutdown:  # a burst worker does not run its shutdown itself (nor made anything to close)
            await worker.on_shutdown(worker.ctx)


async def _draw_progress(store: JobStore, job_ids: list[str]) -> None:
    states = [await store.get(job_id) for job_id in job_ids]
    done = sum(1 for r in states if r is not None and r.state in FINAL_STATES)
    print(f"\r{progress_bar(done, len(job_ids))}", end="", file=sys.stderr, flush=True)


__all__ = ["CommandError", "RulesError", "backfill_command", "explain_command", "test_command"]
