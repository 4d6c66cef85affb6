"""Reading what the rules need from the portal: an activity's bindings, a lead and what it became."""
from __future__ import annotations

from typing import Any

from app.bitrix.client import PAGE_SIZE, Command, CommandResult, RestClient, fast_page
from app.bitrix.errors import B24Error
from app.rules.facts import Activity, Binding, Facts, Lead
from app.rules.model import EntityType, RuleSet

ACTIVITY_EVENTS = {"ONCRMACTIVITYADD", "ONCRMACTIVITYUPDATE"}
LEAD_EVENTS = {"ONCRMLEADADD", "ONCRMLEADUPDATE"}
# Conversion creates these from a lead: such an event re-runs that lead.
CHILD_GETTERS = {
    "ONCRMCONTACTADD": "crm.contact.get", "ONCRMCONTACTUPDATE": "crm.contact.get",
    "ONCRMCOMPANYADD": "crm.company.get", "ONCRMCOMPANYUPDATE": "crm.company.get",
    "ONCRMDEALADD": "crm.deal.get", "ONCRMDEALUPDATE": "crm.deal.get",
}
ACTIVITY_FIELDS = ("ID", "SUBJECT")


class Gone(Exception):
    """The record the event is about no longer exists; there is nothing to do."""


class FactReader:
    """Reads facts for one job through a RestClient, with as few requests as the API allows."""

    def __init__(self, client: RestClient, rules: RuleSet) -> None:
        self._client = client
        self._rules = rules

    async def for_event(self, event: str, entity_id: int) -> Facts:
        if event in ACTIVITY_EVENTS:
            return await self._activity(event, entity_id)
        if event in LEAD_EVENTS:
            return await self._lead(event, entity_id)
        if event in CHILD_GETTERS:
            lead_id = await self._lead_of(CHILD_GETTERS[event], entity_id)
            return await self._lead(event, lead_id) if lead_id else self._facts(event)
        return self._facts(event)

    async def _activity(self, event: str, activity_id: int) -> Facts:
        binding_list, activity = await self._client.batch([
            Command("crm.activity.binding.list", {"activityId": activity_id}),
            Command("crm.activity.get", {"id": activity_id}),
        ])
        _raise_gone(binding_list, activity)
        facts = _activity(activity.result, binding_list.result)
        lead_ids = facts.bound_to(EntityType.LEAD)
        leads = await self._leads(lead_ids) if lead_ids else {}
        return self._facts(event, (facts,), leads)

    async def _lead(self, event: str, lead_id: int) -> Facts:
        # One batch reads the lead, what it became, and the first page of its activities.
        lead_commands = _lead_commands(lead_id)
        first_page = Command("crm.activity.list", fast_page(_bound_to_lead(lead_id), ACTIVITY_FIELDS, 0))
        results = await self._client.batch([*lead_commands, first_page])
        _raise_gone(results[0])
        lead = _lead(results[:4])
        if not self._rules_may_apply(event, lead):
            return self._facts(event, leads={lead.id: lead})
        rows = _checked(results[4])
        if len(rows) == PAGE_SIZE:
            rows += await self._client.list_all("crm.activity.list", _bound_to_lead(lead_id), ACTIVITY_FIELDS,
                                                after_id=int(rows[-1]["ID"]))
        activities = await self._bindings_of(rows)
        return self._facts(event, tuple(activities), {lead.id: lead})

    async def _lead_of(self, getter: str, entity_id: int) -> int:
        (result,) = await self._client.batch([Command(getter, {"id": entity_id})])
        _raise_gone(result)
        return _id(result.result.get("LEAD_ID"))

    async def _leads(self, lead_ids: list[int]) -> dict[int, Lead]:
        commands = [c for lead_id in lead_ids for c in _lead_commands(lead_id)]
        results = await self._client.batch(commands)
        leads = {}
        for i in range(0, len(results), 4):
            if results[i].ok:  # a deleted lead simply contributes nothing
                lead = _lead(results[i:i + 4])
                leads[lead.id] = lead
        return leads

    async def _bindings_of(self, rows: list[dict[str, Any]]) -> list[Activity]:
        commands = [Command("crm.activity.binding.list", {"activityId": int(row["ID"])}) for row in rows]
        results = await self._client.batch(commands)
        return [_activity(row, result.result) for row, result in zip(rows, results) if result.ok]

    def _rules_may_apply(self, event: str, lead: Lead) -> bool:
        """Skip reading a lead's activities when no rule for this event could match it (most lead edits)."""
        for rule in self._rules.rules:
            status = rule.when.lead_status
            if event in rule.on and (status is None or (lead.converted if status.lower() == "converted"
                                                         else lead.status_id == status)):
                return True
        return False

    def _facts(self, event: str, activities: tuple[Activity, ...] = (), leads: dict[int, Lead] | None = None) -> Facts:
        return Facts(portal=self._client.portal.name, event=event, activities=activities, leads=leads or {})


def _lead_commands(lead_id: int) -> list[Command]:
    by_lead = {"filter": {"LEAD_ID": lead_id}, "select": ["ID"], "order": {"ID": "ASC"}}
    return [Command("crm.lead.get", {"id": lead_id}), Command("crm.contact.list", by_lead),
            Command("crm.company.list", by_lead), Command("crm.deal.list", by_lead)]


def _bound_to_lead(lead_id: int) -> dict[str, Any]:
    return {"BINDINGS": [{"OWNER_TYPE_ID": int(EntityType.LEAD), "OWNER_ID": lead_id}]}


def _lead(results: list[CommandResult]) -> Lead:
    fields = results[0].result
    contacts, companies, deals = (tuple(_id(row.get("ID")) for row in _checked(r)) for r in results[1:4])
    return Lead(id=_id(fields.get("ID")), status_id=str(fields.get("STATUS_ID") or ""),
                status_semantic=str(fields.get("STATUS_SEMANTIC_ID") or ""),
                contact_ids=contacts or _ids(fields.get("CONTACT_ID")),
                company_ids=companies or _ids(fields.get("COMPANY_ID")), deal_ids=deals)


def _activity(fields: dict[str, Any], bindings: list[dict[str, Any]]) -> Activity:
    return Activity(id=_id(fields.get("ID")), subject=str(fields.get("SUBJECT") or ""),
                    bindings=tuple(Binding(entity_type=EntityType(int(b["entityTypeId"])), entity_id=int(b["entityId"]))
                                   for b in bindings or [] if int(b["entityTypeId"]) in EntityType._value2member_map_))


def _checked(result: CommandResult) -> list[dict[str, Any]]:
    if result.error:
        raise result.error
    return list(result.result or [])


def _raise_gone(*results: CommandResult) -> None:
    for result in results:
        if result.error and result.error.code in ("NOT_FOUND",):
            raise Gone(f"{result.command.method.split('.')[1]} {result.command.params.get('id') or ''}"
                       f"{result.command.params.get('activityId') or ''} no longer exists in the portal")
        if result.error:
            raise result.error


def _id(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _ids(value: Any) -> tuple[int, ...]:
    return (_id(value),) if _id(value) else ()


__all__ = ["FactReader", "Gone", "B24Error"]
