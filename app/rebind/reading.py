"""Reading what the rules need from the portal: an activity's bindings, a lead and what it became.

Only what the rules file can use is read (`RuleSet.needs`), and always through `batch`.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from app.bitrix.client import PAGE_SIZE, Command, CommandResult, RestClient
from app.bitrix.merge import unfiltered
from app.rules.facts import Activity, Binding, Client, Comment, Facts, Lead
from app.rules.model import EntityType, RuleSet

# Activities of a lead whose bindings are read to tell a portal's conversion from a bare one. One is
# enough: the portal's conversion binds every activity the lead had, so its oldest (listed first) is
# bound to the new records unless no conversion attached anything; a wrong guess costs requests, never
# correctness ('already bound' counts as done and is recorded as it was found).
BINDINGS_SAMPLE = 1
ACTIVITY_EVENTS = {"ONCRMACTIVITYADD", "ONCRMACTIVITYUPDATE"}
LEAD_EVENTS = {"ONCRMLEADADD", "ONCRMLEADUPDATE"}
# Conversion creates these from a lead: such an event re-runs that lead.
CHILD_GETTERS = {
    "ONCRMCONTACTADD": "crm.contact.get", "ONCRMCONTACTUPDATE": "crm.contact.get",
    "ONCRMCOMPANYADD": "crm.company.get", "ONCRMCOMPANYUPDATE": "crm.company.get",
    "ONCRMDEALADD": "crm.deal.get", "ONCRMDEALUPDATE": "crm.deal.get",
}
ACTIVITY_FIELDS = ("ID", "SUBJECT", "TYPE_ID", "PROVIDER_ID", "DIRECTION", "RESPONSIBLE_ID")
LEAD_FIELDS = ("ID", "STATUS_ID", "STATUS_SEMANTIC_ID", "CONTACT_ID", "COMPANY_ID", "DATE_MODIFY")  # what `_lead` reads
# What `_clients` reads of a contact or deal an activity is bound to.
CLIENT_FIELDS = {"contact": ("ID", "COMPANY_ID"), "deal": ("ID", "CONTACT_ID", "COMPANY_ID")}
# crm.duplicate.findbycomm silently looks at no more than this many values a call (crm restservice.php).
FINDBYCOMM_VALUES = 20
TYPE_NAMES: dict[EntityType | int, str] = {EntityType.LEAD: "lead", EntityType.DEAL: "deal", EntityType.CONTACT: "contact",
              EntityType.COMPANY: "company"}
# What a conversion makes from a lead, read by LEAD_ID (the lead's own fields name only one of each).
LEAD_LISTS = ("contact", "company", "deal")
TYPE_BY_NAME = {name: entity for entity, name in TYPE_NAMES.items()}  # timeline bindings name their type


class Gone(Exception):
    """The record the event is about no longer exists; there is nothing to do."""

    def __init__(self, message: str, what: str = "") -> None:
        super().__init__(message)
        self.what = what  # lead, activity, contact...


class Echo(Exception):
    """The activity is exactly as this service last left it: the event is the echo of our change."""


class FactReader:
    """Reads facts for one job through a RestClient, with as few requests as the API allows."""

    def __init__(self, client: RestClient, rules: RuleSet,
                 is_echo: Callable[[Activity], Awaitable[bool]] | None = None,
                 lead_lists: Sequence[str] | None = None,
                 being_written: Callable[[int], Awaitable[bool]] | None = None) -> None:
        self._client = client
        self._rules = rules
        self._needs = rules.needs()
        self._is_echo = is_echo
        self._being_written = being_written
        # What a lead became is read only where a rule binds or moves to it (`lead.contact`...);
        # `explain` asks for every list, to show it.
        self._made = tuple(lead_lists) if lead_lists is not None else made_from_lead(rules)

    async def lead_behind(self, event: str, entity_id: int) -> int | None:
        """The lead an event's work is about: the lead itself, or the lead a contact/company/deal came from."""
        if event in LEAD_EVENTS:
            return entity_id
        if event in CHILD_GETTERS:
            return await self._lead_of(CHILD_GETTERS[event], entity_id) or None
        return None

    async def for_event(self, event: str, entity_id: int, lead_id: int | None = None) -> Facts:
        if event in ACTIVITY_EVENTS:
            return await self.for_activity(event, entity_id)
        if event in LEAD_EVENTS or event in CHILD_GETTERS:
            lead_id = lead_id or await self.lead_behind(event, entity_id)
            return await self.for_lead(event, lead_id) if lead_id else self._facts(event)
        return self._facts(event)

    async def for_activity(self, event: str, activity_id: int) -> Facts:
        if event == "ONCRMACTIVITYUPDATE" and self._being_written and await self._being_written(activity_id):
            raise Echo("this service is writing the activity, or just did: the event echoes its writes (nothing read)")
        if not self._reads_activity_fields(event):  # the bindings say all the rules ask
            (binding_list,) = await self._client.batch([Command("crm.activity.binding.list",
                                                                {"activityId": activity_id})])
            _raise_gone(binding_list)
            return await self._around(event, _activity({"ID": activity_id}, binding_list.result))
        # crm.activity.get never returns COMMUNICATIONS: only a list that selects them does.
        binding_list, activity = await self._client.batch([
            Command("crm.activity.binding.list", {"activityId": activity_id}),
            Command("crm.activity.list", {"filter": {"ID": activity_id}, "select": list(self._activity_fields()),
                                          "start": -1}),
        ])
        _raise_gone(binding_list, activity)
        rows = _checked(activity, "ID", {activity_id})
        if not rows:  # deleted between the two reads, or hidden from the webhook's user
            raise Gone(f"activity {activity_id} no longer exists in the portal (or its user may not read it)",
                       "activity")
        return await self._around(event, _activity(rows[0], binding_list.result))

    def _reads_activity_fields(self, event: str) -> bool:
        """Whether a rule listening to the event looks at the activity itself (kind, direction, subject,
        responsible user, or its addresses for `matched`), not only at what it is bound to."""
        if "matched" in self._needs:
            return True
        return any(event in rule.on and _asks_fields(rule.when) for rule in self._rules.rules)

    async def _around(self, event: str, facts: Activity) -> Facts:
        """The facts around one activity: the leads it is bound to, what they became, and extras."""
        if event == "ONCRMACTIVITYUPDATE" and self._is_echo and await self._is_echo(facts):
            raise Echo("the activity is as this service left it: the event echoes our own change")
        lead_ids = facts.bound_to(EntityType.LEAD)
        commands = [c for lead_id in lead_ids for c in _lead_commands(lead_id, self._made)]
        extras = self._extra_commands([facts])
        results = await self._client.batch(commands + extras) if commands or extras else []
        n = 1 + len(self._made)
        leads = {lead.id: lead for lead in (_lead(results[i:i + n], self._made) for i in range(0, len(commands), n)
                                            if results[i].ok)}
        return self._facts(event, (facts,), leads, results[len(commands):], extras)

    async def for_lead(self, event: str, lead_id: int) -> Facts:
        # One batch reads the lead, what it became, and the first page of its activities with their
        # count; knowing the count, every other page goes at once (count-known paging).
        query = counted_page(_bound_to_lead(lead_id), self._activity_fields())
        results = await self._client.batch([*_lead_commands(lead_id, self._made), Command("crm.activity.list", query)])
        _raise_gone(results[0])
        lead = _lead(results[:-1], self._made)
        if not self._rules_may_apply(event, lead):
            return self._facts(event, leads={lead.id: lead})
        first = _checked(results[-1])
        if self._planned_from_the_lead_alone(event):
            # A sample of the bindings, read with the other pages, tells whether the portal attached
            # the activities to the new records itself (then reading them all saves the adds) or not
            # (then adding blind saves the reads: 'already bound' counts as done).
            sample = first[:BINDINGS_SAMPLE]
            rows, sampled = await asyncio.gather(self._all_pages("crm.activity.list", query, results[-1]),
                                                 self._client.batch(_binding_reads(sample)))
            if all(r.ok and _bound_to_lead_only(r.result, lead_id) for r in sampled):
                known = {int(row["ID"]): r.result for row, r in zip(sample, sampled)}
                lead_only = [{"entityTypeId": int(EntityType.LEAD), "entityId": lead_id}]
                activities = [_activity(row, known[int(row["ID"])]) if int(row["ID"]) in known
                              else _activity(row, lead_only).model_copy(update={"bindings_read": False})
                              for row in rows]
                return await self._with_extras(event, activities, lead)
            rest = rows[len(sample):]
            bindings = [*sampled, *await self._client.batch(_binding_reads(rest))]
        else:
            rows = await self._all_pages("crm.activity.list", query, results[-1])
            bindings = await self._client.batch(_binding_reads(rows))
        activities = [_activity(row, result.result) for row, result in zip(rows, bindings) if result.ok]
        return await self._with_extras(event, activities, lead)

    async def _with_extras(self, event: str, activities: list[Activity], lead: Lead) -> Facts:
        extras = self._extra_commands(activities)
        extra_results = await self._client.batch(extras) if extras else []
        comments = await self._comments(lead.id) if "comments" in self._needs else ()
        return self._facts(event, tuple(activities), {lead.id: lead}, extra_results, extras, comments)

    def _planned_from_the_lead_alone(self, event: str) -> bool:
        """Whether every rule listening to the event plans the same whatever else an activity listed
        under the lead is bound to: its conditions ask only about the lead, it binds only the lead's
        records (or fixed ones) and unbinds only the lead. Then the bindings need not be read."""
        for rule in self._rules.rules:
            if event not in rule.on or not rule.enabled:
                continue
            when = rule.when
            if when.bound_to not in (None, "lead") or when.any is not None or when.not_ is not None:
                return False
            if rule.moves() or any(t != EntityType.LEAD for t in rule.unbind_types()):
                return False
            if any(isinstance(t, str) and t.split(".")[0] != "lead" for t in rule.bind_targets()):
                return False
        return True

    async def _all_pages(self, method: str, query: dict[str, Any], first: CommandResult) -> list[dict[str, Any]]:
        """The rows of every page, given the first (read with its count): the others in one go."""
        rows = _checked(first)
        if first.next is None:
            return rows
        starts = range(first.next, max(first.total or 0, first.next + 1), PAGE_SIZE)
        pages = await self._client.batch([Command(method, {**query, "start": start}) for start in starts])
        seen = {row.get("ID") for row in rows}
        # Ordered by ID, a row added meanwhile comes last; one deleted shifts the later pages back by one,
        # so a row may come twice (kept once); the one it pushed onto an earlier page is left to the sweep.
        return rows + [row for page in pages for row in _checked(page) if row.get("ID") not in seen]

    def _activity_fields(self) -> tuple[str, ...]:
        return ACTIVITY_FIELDS + (("COMMUNICATIONS",) if "matched" in self._needs else ())

    def _extra_commands(self, activities: list[Activity]) -> list[Command]:
        """Reads for `contact.*`, `deal.*` and `matched.*` targets, only when the rules use them."""
        commands: list[Command] = []
        if "contact" in self._needs:
            ids = sorted({i for a in activities for i in a.bound_to(EntityType.CONTACT)})
            commands += [Command("crm.contact.get", {"id": i}, fields=CLIENT_FIELDS["contact"]) for i in ids]
        if "deal" in self._needs:
            ids = sorted({i for a in activities for i in a.bound_to(EntityType.DEAL)})
            commands += [Command("crm.deal.get", {"id": i}, fields=CLIENT_FIELDS["deal"]) for i in ids]
        if "matched" in self._needs:
            searches = {(kind, chunk, entity): None for activity in activities
                        for kind, chunk in _comm_chunks(activity) for entity in ("CONTACT", "COMPANY")}
            commands += [Command("crm.duplicate.findbycomm", {"type": kind, "values": list(chunk),
                                                              "entity_type": entity})
                         for kind, chunk, entity in searches]
        return commands

    async def _comments(self, lead_id: int) -> tuple[Comment, ...]:
        """Every comment on the lead's timeline, all pages. Paged by `start`: the method's filter on ID
        is not documented, so the fast `>ID` form is not used; the later pages go in one batch."""
        query = {"filter": {"ENTITY_ID": lead_id, "ENTITY_TYPE": "lead"}, "select": ["ID"], "order": {"ID": "ASC"}}
        answer = await self._client.call("crm.timeline.comment.list", query)
        rows = list(answer.result or [])
        if answer.next is not None:
            total = answer.total if answer.total is not None else 0
            starts = range(answer.next, max(total, answer.next + 1), PAGE_SIZE)
            pages = await self._client.batch([Command("crm.timeline.comment.list", {**query, "start": start})
                                              for start in starts])
            rows += [row for page in pages for row in _checked(page)]
        ids = list(dict.fromkeys(int(row["ID"]) for row in rows))
        results = await self._client.batch(
            [Command("crm.timeline.bindings.list", {"filter": {"OWNER_ID": i}}) for i in ids])
        return tuple(Comment(id=i, bindings=tuple(b for row in _checked(result) if (b := _comment_binding(row))))
                     for i, result in zip(ids, results))

    async def _lead_of(self, getter: str, entity_id: int) -> int:
        (result,) = await self._client.batch([Command(getter, {"id": entity_id}, fields=("ID", "LEAD_ID"))])
        _raise_gone(result)
        return _id(result.result.get("LEAD_ID"))

    def _rules_may_apply(self, event: str, lead: Lead) -> bool:
        """Skip reading a lead's activities when no rule for this event could match it (most lead edits)."""
        return any(event in rule.on and (rule.when.lead_status is None
                                         or any(lead.has_status(s) for s in rule.when.lead_status))
                   for rule in self._rules.rules)

    def _facts(self, event: str, activities: tuple[Activity, ...] = (), leads: dict[int, Lead] | None = None,
               extra_results: list[CommandResult] | None = None, extras: list[Command] | None = None,
               comments: tuple[Comment, ...] = ()) -> Facts:
        contacts, deals, matches = _clients(activities, extras or [], extra_results or [])
        return Facts(portal=self._client.portal.name, event=event, activities=activities, leads=leads or {},
                     contacts=contacts, deals=deals, matches=matches, comments=comments)


def _clients(activities: tuple[Activity, ...], commands: list[Command],
             results: list[CommandResult]) -> tuple[dict[int, Client], dict[int, Client], dict[int, Client]]:
    contacts: dict[int, Client] = {}
    deals: dict[int, Client] = {}
    found: dict[tuple[str, tuple[str, ...]], dict[str, list[int]]] = {}
    for command, result in zip(commands, results):
        if not result.ok:
            continue
        if command.method in ("crm.contact.get", "crm.deal.get"):
            row = result.result or {}
            client = Client(id=_id(row.get("ID")), contact_ids=_ids(row.get("CONTACT_ID")),
                            company_ids=_ids(row.get("COMPANY_ID")))
            (contacts if command.method == "crm.contact.get" else deals)[client.id] = client
        else:
            key = (command.params["type"], tuple(command.params["values"]))
            found.setdefault(key, {}).update(result.result if isinstance(result.result, dict) else {})
    matches = {}
    for activity in activities:
        hits = [found.get(chunk, {}) for chunk in _comm_chunks(activity)]
        contact_ids = tuple(dict.fromkeys(int(i) for hit in hits for i in hit.get("CONTACT", [])))
        company_ids = tuple(dict.fromkeys(int(i) for hit in hits for i in hit.get("COMPANY", [])))
        if contact_ids or company_ids:
            matches[activity.id] = Client(id=activity.id, contact_ids=contact_ids, company_ids=company_ids)
    return contacts, deals, matches


def _comm_chunks(activity: Activity) -> list[tuple[str, tuple[str, ...]]]:
    """The activity's e-mails and phones in searches of at most FINDBYCOMM_VALUES values."""
    return [(kind, values[i:i + FINDBYCOMM_VALUES])
            for kind, values in (("EMAIL", activity.emails), ("PHONE", activity.phones))
            for i in range(0, len(values), FINDBYCOMM_VALUES)]


def made_from_lead(rules: RuleSet) -> tuple[str, ...]:
    """The kinds of record a lead became (`contact`, `company`, `deal`) that a rule binds or moves to."""
    named = {t.split(".")[1] for rule in rules.rules for t in rule.targets()
             if isinstance(t, str) and t.startswith("lead.")}
    return tuple(kind for kind in LEAD_LISTS if kind in named)


def _lead_commands(lead_id: int, made: Sequence[str] = LEAD_LISTS) -> list[Command]:
    # Named fields and one-number filters: a batch reads many jobs' leads (and lists) as one list each.
    # LEAD_ID selected too: each row must show it is the lead's (a portal drops a filter it cannot read).
    by_lead = {"filter": {"LEAD_ID": lead_id}, "select": ["ID", "LEAD_ID"], "order": {"ID": "ASC"}}
    return [Command("crm.lead.get", {"id": lead_id}, fields=LEAD_FIELDS),
            *(Command(f"crm.{kind}.list", by_lead) for kind in made)]


def _asks_fields(when: Any) -> bool:
    if any(getattr(when, name) is not None for name in
           ("kind", "direction", "responsible", "subject_contains", "subject_matches")):
        return True
    return any(_asks_fields(w) for w in [*(when.any or []), *([when.not_] if when.not_ is not None else [])])


def _binding_reads(rows: list[dict[str, Any]]) -> list[Command]:
    return [Command("crm.activity.binding.list", {"activityId": int(row["ID"])}) for row in rows]


def _bound_to_lead_only(bindings: Any, lead_id: int) -> bool:
    return [(int(b["entityTypeId"]), int(b["entityId"])) for b in bindings or []] == [(int(EntityType.LEAD), lead_id)]


def counted_page(filter: dict[str, Any], select: Sequence[str]) -> dict[str, Any]:
    """A first page that tells the count (`start=0`), ordered by ID so the later pages follow it."""
    return {"order": {"ID": "ASC"}, "filter": filter, "select": list(select), "start": 0}


def _bound_to_lead(lead_id: int) -> dict[str, Any]:
    return {"BINDINGS": [{"OWNER_TYPE_ID": int(EntityType.LEAD), "OWNER_ID": lead_id}]}


def _lead(results: list[CommandResult], made: Sequence[str] = LEAD_LISTS) -> Lead:
    """The lead and what it became; a list not read (no rule names it) is left empty, or the lead's field."""
    fields = results[0].result
    lead_id = _id(fields.get("ID"))
    lists = {kind: tuple(_id(row.get("ID")) for row in _checked(r, "LEAD_ID", {lead_id}))
             for kind, r in zip(made, results[1:])}
    contacts, companies, deals = (lists.get(kind, ()) for kind in LEAD_LISTS)
    return Lead(id=lead_id, status_id=str(fields.get("STATUS_ID") or ""),
                status_semantic=str(fields.get("STATUS_SEMANTIC_ID") or ""),
                contact_ids=contacts or _ids(fields.get("CONTACT_ID")),
                company_ids=companies or _ids(fields.get("COMPANY_ID")), deal_ids=deals,
                modified=str(fields.get("DATE_MODIFY") or ""))


def _activity(fields: dict[str, Any], bindings: list[dict[str, Any]]) -> Activity:
    communications = fields.get("COMMUNICATIONS") or []
    return Activity(
        id=_id(fields.get("ID")), subject=str(fields.get("SUBJECT") or ""),
        type_id=str(fields.get("TYPE_ID") or ""), provider_id=str(fields.get("PROVIDER_ID") or ""),
        direction=str(fields.get("DIRECTION") or ""), responsible_id=_id(fields.get("RESPONSIBLE_ID")),
        emails=tuple(str(c["VALUE"]) for c in communications if c.get("TYPE") == "EMAIL" and c.get("VALUE")),
        phones=tuple(str(c["VALUE"]) for c in communications if c.get("TYPE") == "PHONE" and c.get("VALUE")),
        # Every binding, of any type: the ones the rules cannot name still count in the guards.
        bindings=tuple(Binding(entity_type=int(b["entityTypeId"]), entity_id=int(b["entityId"]))
                       for b in bindings or []))


def _comment_binding(row: dict[str, Any]) -> Binding | None:
    """Timeline bindings name their type in lowercase; types other than the four are left alone."""
    entity = TYPE_BY_NAME.get(str(row.get("ENTITY_TYPE")).lower())
    return Binding(entity_type=entity, entity_id=int(row["ENTITY_ID"])) if entity else None


def _checked(result: CommandResult, field: str = "", wanted: set[int] | None = None) -> list[dict[str, Any]]:
    """A list's rows; with `field`, each must be among the `wanted` numbers, or LIST_NOT_FILTERED is
    raised: the portal answered rows its filter excludes, and nothing is planned on them."""
    if result.error:
        raise result.error
    rows = list(result.result or [])
    if field and wanted is not None:
        error = unfiltered(result.command.method, rows, field, wanted)
        if error is not None:
            raise error
    return rows


def _raise_gone(*results: CommandResult) -> None:
    for result in results:
        if result.error and result.error.code == "NOT_FOUND":
            what = result.command.method.split(".")[1]
            number = result.command.params.get("id") or result.command.params.get("activityId")
            raise Gone(f"{what} {number} no longer exists in the portal", what)
        if result.error:
            raise result.error


def _id(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _ids(value: Any) -> tuple[int, ...]:
    return (_id(value),) if _id(value) else ()
