"""The fake portal's rules over its records and activities: conversion copies bindings and keeps the
lead's, a lead closing completes its open calls and to-dos, deleting a record takes its bindings with it.

`CrmState` is the whole CRM without HTTP: the records (`app.fakeportal.records`), their activities and
comments (`app.fakeportal.activities`) and these rules. State is plain Python so tests can set it up and
inspect it directly (`add_lead`, `convert_lead`, ...). The REST methods over it are in
`app.fakeportal.methods`, the HTTP server in `app.fakeportal.server`.
"""

from __future__ import annotations

from typing import Any

from app.fakeportal.activities import CrmActivities
from app.fakeportal.protocol import norm
from app.fakeportal.records import COMPANY, CONTACT, DEAL, LEAD, STATUS_SEMANTICS, TYPE_NAMES, now_iso


class CrmState(CrmActivities):
    """The records of one portal and how the portal changes them, without HTTP."""

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
        created: dict[str, int | None] = {"contact": None, "company": None, "deal": None}
        if company and not repeat:
            created["company"] = self._insert(
                COMPANY, {"TITLE": lead.get("COMPANY_TITLE") or lead.get("TITLE"), "LEAD_ID": lead_id}
            )
        if contact and not repeat:
            created["contact"] = self._contact_from_lead(lead_id, created["company"])
        if deal or repeat:
            created["deal"] = self.add_deal(
                lead.get("TITLE") or "Deal", lead_id,
                created["contact"] or norm(lead.get("CONTACT_ID")) or None,
                created["company"] or norm(lead.get("COMPANY_ID")) or None,
            )
        self._close_converted_lead(lead_id, created, repeat)
        return created

    def _contact_from_lead(self, lead_id: int, company_id: int | None) -> int:
        """The contact a conversion makes: the lead's name, e-mails and phones, and the company made with it."""
        lead = self.leads[lead_id]
        return self._insert(CONTACT, {
            "NAME": lead.get("NAME") or lead.get("TITLE"),
            "LEAD_ID": lead_id,
            "EMAIL": [f["VALUE"] for f in lead.get("EMAIL") or []],
            "PHONE": [f["VALUE"] for f in lead.get("PHONE") or []],
            "COMPANY_ID": company_id,
        })

    def _close_converted_lead(self, lead_id: int, created: dict[str, int | None], repeat: bool) -> None:
        """The status is set (and open activities completed) before the activities are attached, so the
        lead stays their owner."""
        made = [(type_id, made_id) for type_id, name in ((COMPANY, "company"), (CONTACT, "contact"), (DEAL, "deal"))
                if (made_id := created[name])]
        fields: dict[str, Any] = {"STATUS_ID": "CONVERTED"}
        if not repeat:
            fields.update(CONTACT_ID=created["contact"], COMPANY_ID=created["company"])
        self.update_lead(lead_id, **fields)
        self._attach_all((LEAD, lead_id), made)

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

    def add_offline_event(self, event: str, entity_id: int) -> None:
        """Queue an offline event (the portal keeps the latest record per object, not every change)."""
        self.offline_events = [e for e in self.offline_events
                               if (e["EVENT_NAME"], e["EVENT_DATA"]["FIELDS"]["ID"]) != (event, str(entity_id))]
        message = self._new_id("offline")
        self.offline_events.append({"ID": str(message), "TIMESTAMP_X": now_iso(), "EVENT_NAME": event,
                                    "EVENT_DATA": {"FIELDS": {"ID": str(entity_id)}}, "EVENT_ADDITIONAL": False,
                                    "MESSAGE_ID": str(message), "PROCESS_ID": None})
