"""The fake portal's CRM records: leads, contacts, companies, deals and other items, the constants that
name them, and the synchronous helpers tests and the demo make records with (`add_lead`, `add_contact`, ...).

State is plain Python (dicts of string-valued fields, like Bitrix returns them) so tests can set it up and
inspect it directly. Activities and comments are in `app.fakeportal.activities`, the portal's rules over
both (conversion, a lead closing, deleting) in `app.fakeportal.state`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from app.fakeportal.protocol import as_list, norm

LEAD, DEAL, CONTACT, COMPANY = 1, 2, 3, 4
QUOTE, SMART_INVOICE = 7, 31  # other types an activity may be bound to; smart processes are 128+ and 1030+
TYPE_NAMES = {LEAD: "lead", DEAL: "deal", CONTACT: "contact", COMPANY: "company"}
CLIENT_TYPES = (CONTACT, COMPANY)  # never the owner while another binding exists (appendOwnerFromBindings)
COMPLETABLE_TYPES = ("1", "2", "6")  # meeting, call, task/to-do: completed when their lead closes

Binding = tuple[int, int]  # (entityTypeId, entityId)

STATUS_SEMANTICS = {"CONVERTED": "S", "JUNK": "F"}  # any other lead status is "in progress" (P)
# Since crm 25.1150.0 saving an activity's bindings keeps this many, those with the highest owner id,
# and answers true: the rest go without a word (crm_activity.php, DoSaveBindings, option
# max_bindings_count). Before that version there was no cap at all (CrmState.max_bindings = None).
MAX_BINDINGS = 100

# The fields each entity's list filters on: a filter key naming any other field is dropped silently and
# the list comes back unfiltered by it (crm restservice.php, internalizeFilterFields).
LIST_FIELDS: dict[str, frozenset[str]] = {
    "lead": frozenset({"ID", "TITLE", "NAME", "LAST_NAME", "STATUS_ID", "STATUS_SEMANTIC_ID", "CONTACT_ID",
                       "COMPANY_ID", "COMPANY_TITLE", "IS_RETURN_CUSTOMER", "EMAIL", "PHONE", "DATE_CREATE",
                       "DATE_MODIFY", "ASSIGNED_BY_ID", "SOURCE_ID", "OPPORTUNITY"}),
    "contact": frozenset({"ID", "NAME", "LAST_NAME", "LEAD_ID", "COMPANY_ID", "EMAIL", "PHONE", "DATE_CREATE",
                          "DATE_MODIFY", "ASSIGNED_BY_ID"}),
    "company": frozenset({"ID", "TITLE", "LEAD_ID", "EMAIL", "PHONE", "DATE_CREATE", "DATE_MODIFY",
                          "ASSIGNED_BY_ID"}),
    "deal": frozenset({"ID", "TITLE", "STAGE_ID", "LEAD_ID", "CONTACT_ID", "COMPANY_ID", "DATE_CREATE",
                       "DATE_MODIFY", "ASSIGNED_BY_ID", "OPPORTUNITY"}),
    "activity": frozenset({"ID", "OWNER_TYPE_ID", "OWNER_ID", "TYPE_ID", "PROVIDER_ID", "SUBJECT", "COMPLETED",
                           "DIRECTION", "RESPONSIBLE_ID", "CREATED", "LAST_UPDATED", "BINDINGS"}),
}


def _stringify(value: Any) -> Any:
    """Field values as Bitrix returns them: numbers as strings, booleans as Y/N."""
    if isinstance(value, bool):
        return "Y" if value else "N"
    if isinstance(value, (int, float)):
        return str(value)
    return value


def _multifield(kind: str, value: Any) -> list[dict[str, str]]:
    """EMAIL/PHONE as a Bitrix multi-field: ``[{"VALUE": ..., "VALUE_TYPE": "WORK", ...}]``."""
    out = []
    for item in as_list(value):
        text = item.get("VALUE") if isinstance(item, dict) else item
        if text:
            out.append({"TYPE_ID": kind, "VALUE": str(text), "VALUE_TYPE": "WORK"})
    return out


def now_iso() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")



def type_label(entity_type_id: int) -> str:
    return TYPE_NAMES.get(entity_type_id, f"entity type {entity_type_id}")

class CrmRecords:
    """The records of one portal, without HTTP: what every other part of the fake reads and changes."""

    def __init__(self, user_id: int = 1) -> None:
        self.user_id = user_id
        self.leads: dict[int, dict[str, Any]] = {}
        self.deals: dict[int, dict[str, Any]] = {}
        self.contacts: dict[int, dict[str, Any]] = {}
        self.companies: dict[int, dict[str, Any]] = {}
        self.activities: dict[int, dict[str, Any]] = {}
        self.activity_bindings: dict[int, set[Binding]] = {}
        self._binding_order: dict[int, list[Binding]] = {}  # the portal's bindings table keeps insertion order
        self.items: dict[int, dict[int, dict[str, Any]]] = {}  # quotes, smart invoices, smart-process items
        # What the portal would send to outbound webhooks, in order: (event, id).
        self.events: list[tuple[str, int]] = []
        # Broken invariants a real portal would let through silently (a binding to a record that does
        # not exist): the service must never cause one, and the test fixtures assert this stays empty.
        self.violations: list[str] = []
        # Off by default: records the webhook's user may not read or change (set_access_denied).
        self.unreadable: set[Binding] = set()
        self.binding_history: dict[int, list[tuple[Binding, ...]]] = {}
        self.comments: dict[int, dict[str, Any]] = {}
        self.comment_binding_sets: dict[int, set[tuple[str, int]]] = {}
        self._next_ids: dict[str, int] = {}
        # Indexes, so that the lists the service filters on cost what they cost a real portal's
        # database, not a scan of every row (benchmarks run thousands of leads).
        self._by_lead: dict[int, dict[int, set[int]]] = {CONTACT: {}, COMPANY: {}, DEAL: {}}
        self._bound: dict[Binding, set[int]] = {}
        self.offline_events: list[dict[str, Any]] = []
        self.max_bindings: int | None = MAX_BINDINGS  # None: a portal older than crm 25.1150.0, no cap
        # The fields each list filters on (a test removes one to play a portal version that lacks it).
        self.list_fields: dict[str, set[str]] = {name: set(fields) for name, fields in LIST_FIELDS.items()}

    def _new_id(self, kind: str) -> int:
        self._next_ids[kind] = self._next_ids.get(kind, 0) + 1
        return self._next_ids[kind]

    def table(self, entity_type_id: int) -> dict[int, dict[str, Any]]:
        tables = {LEAD: self.leads, DEAL: self.deals, CONTACT: self.contacts, COMPANY: self.companies}
        if entity_type_id not in tables:
            raise KeyError(f"unsupported entity type {entity_type_id}")
        return tables[entity_type_id]

    def entity_exists(self, entity_type_id: int, entity_id: int) -> bool:
        if entity_type_id in TYPE_NAMES:
            return entity_id in self.table(entity_type_id)
        return entity_id in self.items.get(entity_type_id, {})

    def _insert(self, entity_type_id: int, fields: Mapping[str, Any]) -> int:
        new_id = self._new_id(TYPE_NAMES[entity_type_id])
        now = now_iso()
        row: dict[str, Any] = {"ID": str(new_id), "DATE_CREATE": now, "DATE_MODIFY": now}
        row.update(self._clean_fields(fields))
        row["ID"] = str(new_id)
        self.table(entity_type_id)[new_id] = row
        self._index_lead_id(entity_type_id, new_id, None)
        self.events.append((f"ONCRM{TYPE_NAMES[entity_type_id].upper()}ADD", new_id))
        return new_id

    def add_item(self, entity_type_id: int, title: str = "Item") -> int:
        """A record of another type an activity can be bound to: a quote (7), a smart invoice (31), a
        smart-process item (128+, 1030+). Only its existence matters to the service."""
        if entity_type_id in TYPE_NAMES:
            raise ValueError("use add_lead/add_contact/add_company/add_deal for the four main types")
        new_id = self._new_id(f"item{entity_type_id}")
        self.items.setdefault(entity_type_id, {})[new_id] = {"id": new_id, "title": title}
        return new_id


    def set_access_denied(self, records: Iterable[Binding]) -> None:
        """The webhook's user has no rights on these records (off by default): lists leave them out,
        crm.activity.binding.list hides bindings to them, reads answer "Access denied." and writes
        ACCESS_DENIED, as a portal does for a webhook made by a user without full CRM rights."""
        self.unreadable = set(records)


    def _index_lead_id(self, entity_type_id: int, entity_id: int, old_lead_id: Any) -> None:
        index = self._by_lead.get(entity_type_id)
        if index is None:
            return
        index.get(norm(old_lead_id), set()).discard(entity_id)
        lead_id = norm(self.table(entity_type_id)[entity_id].get("LEAD_ID"))
        if lead_id is not None:
            index.setdefault(lead_id, set()).add(entity_id)

    @staticmethod
    def _clean_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in fields.items():
            key = key.upper()
            out[key] = _multifield(key, value) if key in ("EMAIL", "PHONE") else _stringify(value)
        return out

    def add_lead(
        self,
        title: str = "Lead",
        status: str = "NEW",
        name: str | None = None,
        email: str | None = None,
        phone: str | None = None,
        contact_id: int | None = None,
        company_id: int | None = None,
    ) -> int:
        """A lead; `contact_id`/`company_id` make it a repeat lead of a known client, as the portal
        makes one when a known client writes in (IS_RETURN_CUSTOMER)."""
        return self._insert(
            LEAD,
            {
                "TITLE": title,
                "NAME": name,
                "STATUS_ID": status,
                "STATUS_SEMANTIC_ID": STATUS_SEMANTICS.get(status, "P"),
                "CONTACT_ID": contact_id,
                "COMPANY_ID": company_id,
                "IS_RETURN_CUSTOMER": "Y" if contact_id or company_id else "N",
                "EMAIL": email,
                "PHONE": phone,
            },
        )

    def add_contact(
        self,
        name: str = "Contact",
        lead_id: int | None = None,
        email: str | None = None,
        phone: str | None = None,
        company_id: int | None = None,
    ) -> int:
        return self._insert(
            CONTACT,
            {"NAME": name, "LEAD_ID": lead_id, "EMAIL": email, "PHONE": phone, "COMPANY_ID": company_id},
        )

    def add_company(
        self,
        title: str = "Company",
        lead_id: int | None = None,
        email: str | None = None,
        phone: str | None = None,
    ) -> int:
        return self._insert(COMPANY, {"TITLE": title, "LEAD_ID": lead_id, "EMAIL": email, "PHONE": phone})

    def add_deal(
        self,
        title: str = "Deal",
        lead_id: int | None = None,
        contact_id: int | None = None,
        company_id: int | None = None,
    ) -> int:
        return self._insert(
            DEAL,
            {
                "TITLE": title,
                "STAGE_ID": "NEW",
                "LEAD_ID": lead_id,
                "CONTACT_ID": contact_id,
                "COMPANY_ID": company_id,
            },
        )

