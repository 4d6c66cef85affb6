"""The fake portal's CRM: records, activity bindings, timeline comments and the portal's own rules and
quirks (conversion copies bindings and keeps the lead's, the owner is recalculated on every save, a lead
closing completes its open calls and to-dos), with the synchronous helpers tests and the demo set it up with.

State is plain Python (dicts of string-valued fields, like Bitrix returns them) so tests can set it
up and inspect it directly (`add_lead`, `convert_lead`, ...). The REST methods over it are in
`app.fakeportal.methods`, the HTTP server in `app.fakeportal.server`.
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


def _owner_of(bindings: list[Binding]) -> Binding:
    """appendOwnerFromBindings: the last binding that is not a contact or company, else the first."""
    others = [b for b in bindings if b[0] not in CLIENT_TYPES]
    return others[-1] if others else bindings[0]


def type_label(entity_type_id: int) -> str:
    return TYPE_NAMES.get(entity_type_id, f"entity type {entity_type_id}")


class CrmState:
    """The records of one portal and how the portal changes them, without HTTP."""

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

    def delete_entity(self, entity_type_id: int, entity_id: int) -> None:
        """Delete a record as a person does in the UI: its bindings go with it, and an activity left with
        no binding is deleted too. Leads, deals and contacts that named it stop naming it."""
        if entity_type_id in TYPE_NAMES:
            del self.table(entity_type_id)[entity_id]
            for ids in self._by_lead.get(entity_type_id, {}).values():
                ids.discard(entity_id)
        else:
            del self.items[entity_type_id][entity_id]
        field = {CONTACT: "CONTACT_ID", COMPANY: "COMPANY_ID"}.get(entity_type_id)
        if field:
            for table in (self.leads, self.deals, self.contacts):
                for row in table.values():
                    if norm(row.get(field)) == entity_id:
                        row[field] = None
        gone = (entity_type_id, entity_id)
        for activity_id in sorted(self._bound.get(gone, set())):
            left = [b for b in self._binding_order[activity_id] if b != gone]
            if left:
                self._set_bindings(activity_id, left)
            else:
                self._bound[gone].discard(activity_id)
                del self.activities[activity_id], self.activity_bindings[activity_id]
                del self._binding_order[activity_id]
        name = TYPE_NAMES.get(entity_type_id)
        for comment_id, bindings in list(self.comment_binding_sets.items()):
            bindings.discard((name or "", entity_id))
            if not bindings:
                del self.comment_binding_sets[comment_id], self.comments[comment_id]
        self.events.append((f"ONCRM{(name or 'item').upper()}DELETE", entity_id))

    def delete_activity(self, activity_id: int) -> None:
        """Delete an activity as a person does in the UI."""
        for binding in self._binding_order.pop(activity_id):
            self._bound[binding].discard(activity_id)
        del self.activities[activity_id], self.activity_bindings[activity_id]
        self.events.append(("ONCRMACTIVITYDELETE", activity_id))

    def set_access_denied(self, records: Iterable[Binding]) -> None:
        """The webhook's user has no rights on these records (off by default): lists leave them out,
        crm.activity.binding.list hides bindings to them, reads answer "Access denied." and writes
        ACCESS_DENIED, as a portal does for a webhook made by a user without full CRM rights."""
        self.unreadable = set(records)

    def check_invariants(self) -> list[str]:
        """The violations so far, and any activity now bound to a record that does not exist."""
        dangling = [f"activity {a} is bound to {type_label(t)} {i}, which does not exist"
                    for a, bindings in self._binding_order.items() for t, i in bindings
                    if not self.entity_exists(t, i)]
        return [*self.violations, *(d for d in dangling if d not in self.violations)]

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

    def update_lead(self, lead_id: int, **fields: Any) -> None:
        """Change lead fields; STATUS_SEMANTIC_ID and DATE_MODIFY follow, as on the portal."""
        lead = self.leads[lead_id]
        was_final = lead.get("STATUS_SEMANTIC_ID") in ("S", "F")
        lead.update(self._clean_fields(fields))
        if "STATUS_ID" in {k.upper() for k in fields}:
            lead["STATUS_SEMANTIC_ID"] = STATUS_SEMANTICS.get(lead["STATUS_ID"], "P")
        lead["DATE_MODIFY"] = now_iso()
        self.events.append(("ONCRMLEADUPDATE", lead_id))
        if lead["STATUS_SEMANTIC_ID"] in ("S", "F") and not was_final:
            self._complete_open_activities((LEAD, lead_id))

    def _complete_open_activities(self, owner: Binding) -> None:
        """A lead reaching a final status completes its open activities of the kinds that can be completed
        (CCrmLead), a burst of ONCRMACTIVITYUPDATE. Which kinds exactly is not documented: the fake takes
        meetings, calls and to-dos, and leaves e-mails (completed when read) alone."""
        for activity_id in sorted(self._bound.get(owner, set())):
            activity = self.activities[activity_id]
            if activity["COMPLETED"] == "N" and activity["TYPE_ID"] in COMPLETABLE_TYPES:
                activity["COMPLETED"], activity["LAST_UPDATED"] = "Y", now_iso()
                self.events.append(("ONCRMACTIVITYUPDATE", activity_id))

    def convert_lead(
        self, lead_id: int, contact: bool = True, company: bool = True, deal: bool = False
    ) -> dict[str, int | None]:
        """Convert as the portal's UI and robots do (crm/lib/conversion/leadconverter.php).

        Company, contact and deal are made in that order with LEAD_ID set, then every activity and
        timeline comment of the lead gets a binding to *each* of them: a copy, the lead binding stays,
        and no ONCRMACTIVITYUPDATE fires for it. The lead is closed (ONCRMLEADUPDATE, its open calls and
        to-dos completed) before the attaching, which leaves the lead the owner (no recalculation).

        A repeat lead (one made with `contact_id`/`company_id` of a known client) makes only a deal,
        whatever is asked: the client exists already and gets nothing attached.
        """
        lead = self.leads[lead_id]
        repeat = lead.get("IS_RETURN_CUSTOMER") == "Y"
        emails = [f["VALUE"] for f in lead.get("EMAIL") or []]
        phones = [f["VALUE"] for f in lead.get("PHONE") or []]
        created: dict[str, int | None] = {"contact": None, "company": None, "deal": None}
        if company and not repeat:
            created["company"] = self._insert(
                COMPANY, {"TITLE": lead.get("COMPANY_TITLE") or lead.get("TITLE"), "LEAD_ID": lead_id}
            )
        if contact and not repeat:
            created["contact"] = self._insert(
                CONTACT,
                {
                    "NAME": lead.get("NAME") or lead.get("TITLE"),
                    "LEAD_ID": lead_id,
                    "EMAIL": emails,
                    "PHONE": phones,
                    "COMPANY_ID": created["company"],
                },
            )
        if deal or repeat:
            created["deal"] = self.add_deal(
                lead.get("TITLE") or "Deal", lead_id,
                created["contact"] or norm(lead.get("CONTACT_ID")) or None,
                created["company"] or norm(lead.get("COMPANY_ID")) or None,
            )
        made = [(type_id, made_id) for type_id, name in ((COMPANY, "company"), (CONTACT, "contact"), (DEAL, "deal"))
                if (made_id := created[name])]
        # The status is set (and open activities completed) before the activities are attached.
        fields: dict[str, Any] = {"STATUS_ID": "CONVERTED"}
        if not repeat:
            fields.update(CONTACT_ID=created["contact"], COMPANY_ID=created["company"])
        self.update_lead(lead_id, **fields)
        self._attach_all((LEAD, lead_id), made)
        return created

    def convert_lead_over_rest(self, lead_id: int) -> int:
        """A "conversion" by another integration: REST has no conversion method, so it adds a contact
        (LEAD_ID is read-only over REST and stays empty) and sets the lead's status and contact.
        Nothing is attached to the contact. Returns the contact's id."""
        lead = self.leads[lead_id]
        contact_id = self._insert(CONTACT, {
            "NAME": lead.get("NAME") or lead.get("TITLE"),
            "EMAIL": [f["VALUE"] for f in lead.get("EMAIL") or []],
            "PHONE": [f["VALUE"] for f in lead.get("PHONE") or []],
        })
        self.update_lead(lead_id, STATUS_ID="CONVERTED", CONTACT_ID=contact_id)
        return contact_id

    def _attach_all(self, source: Binding, targets: list[Binding]) -> None:
        """CCrmActivity::AttachBinding and TimelineBindingTable::attach: saved directly, no event."""
        if not targets:
            return
        for activity_id in sorted(self._bound.get(source, set())):
            order = self._binding_order[activity_id]
            self._set_bindings(activity_id, [*order, *(t for t in targets if t not in order)], owner=False)
        name = TYPE_NAMES[source[0]]
        for bindings in self.comment_binding_sets.values():
            if (name, source[1]) in bindings:
                bindings.update((TYPE_NAMES[t], i) for t, i in targets)

    def add_activity(
        self,
        bound_to: list[Binding],
        subject: str = "Activity",
        type_id: int = 4,
        provider_id: str = "CRM_EMAIL",
        direction: int = 1,
        responsible_id: int = 1,
        email: str | None = None,
    ) -> int:
        """Create an activity bound to these records, in this order (which decides its owner)."""
        if not bound_to:
            raise ValueError("an activity needs at least one binding")
        activity_id = self._new_id("activity")
        now = now_iso()
        self.activities[activity_id] = {
            "ID": str(activity_id),
            "SUBJECT": subject,
            "TYPE_ID": str(type_id),
            "PROVIDER_ID": provider_id,
            "DIRECTION": str(direction),
            "RESPONSIBLE_ID": str(responsible_id),
            "COMPLETED": "N",
            "CREATED": now,
            "LAST_UPDATED": now,
            "COMMUNICATIONS": [{"TYPE": "EMAIL", "VALUE": email}] if email else [],
        }
        self.activity_bindings[activity_id] = set()
        self._binding_order[activity_id] = []
        self.binding_history[activity_id] = []
        self._set_bindings(activity_id, list(dict.fromkeys((int(t), int(i)) for t, i in bound_to)))
        self.events.append(("ONCRMACTIVITYADD", activity_id))
        return activity_id

    def bindings(self, activity_id: int) -> list[Binding]:
        return sorted(self.activity_bindings[activity_id])

    def bind_by_hand(self, activity_id: int, binding: Binding) -> None:
        """Add a binding as a person does in the portal's UI (no REST call, no limit)."""
        self._set_bindings(activity_id, [*self._binding_order[activity_id], binding])

    def _set_bindings(self, activity_id: int, new: list[Binding], owner: bool = True) -> list[Binding]:
        """Save an activity's bindings (kept ones keep their place, new ones go last), keeping the
        history, and recalculate the owner as a save through update does on the portal (`owner=False`:
        AttachBinding, which does not). Past `max_bindings` only those with the highest owner id stay,
        without a word (DoSaveBindings): returns the ones dropped."""
        old = self._binding_order[activity_id]
        order = [b for b in old if b in new] + [b for b in dict.fromkeys(new) if b not in old]
        dropped: list[Binding] = []
        if self.max_bindings is not None and len(order) > self.max_bindings:
            kept = set(sorted(order, key=lambda b: b[1], reverse=True)[:self.max_bindings])
            dropped = [b for b in order if b not in kept]
            order = [b for b in order if b in kept]
        for binding in set(old) - set(order):
            self._bound[binding].discard(activity_id)
        for binding in order:
            self._bound.setdefault(binding, set()).add(activity_id)
        self._binding_order[activity_id] = order
        self.activity_bindings[activity_id] = set(order)
        self.binding_history[activity_id].append(tuple(sorted(order)))
        if owner or not self.activities[activity_id].get("OWNER_ID"):
            self._set_owner(activity_id, _owner_of(order))
        self.activities[activity_id]["LAST_UPDATED"] = now_iso()
        return dropped

    def _set_owner(self, activity_id: int, binding: Binding) -> None:
        activity = self.activities[activity_id]
        activity["OWNER_TYPE_ID"], activity["OWNER_ID"] = str(binding[0]), str(binding[1])

    def add_timeline_comment(self, entity_type_name: str, entity_id: int, text: str) -> int:
        comment_id = self._new_id("comment")
        self.comments[comment_id] = {
            "ID": str(comment_id),
            "CREATED": now_iso(),
            "ENTITY_ID": str(entity_id),
            "ENTITY_TYPE": entity_type_name,
            "AUTHOR_ID": str(self.user_id),
            "COMMENT": text,
        }
        self.comment_binding_sets[comment_id] = {(entity_type_name, int(entity_id))}
        return comment_id

    def comment_bindings(self, comment_id: int) -> list[tuple[str, int]]:
        return sorted(self.comment_binding_sets[comment_id])

    def add_offline_event(self, event: str, entity_id: int) -> None:
        """Queue an offline event (the portal keeps the latest record per object, not every change)."""
        self.offline_events = [e for e in self.offline_events
                               if (e["EVENT_NAME"], e["EVENT_DATA"]["FIELDS"]["ID"]) != (event, str(entity_id))]
        message = self._new_id("offline")
        self.offline_events.append({"ID": str(message), "TIMESTAMP_X": now_iso(), "EVENT_NAME": event,
                                    "EVENT_DATA": {"FIELDS": {"ID": str(entity_id)}}, "EVENT_ADDITIONAL": False,
                                    "MESSAGE_ID": str(message), "PROCESS_ID": None})
