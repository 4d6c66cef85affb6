"""``crm.lead/contact/company/deal.get/list/add/update`` and ``crm.duplicate.findbycomm`` as the fake
portal serves them (a missing record is an error with no code, as restservice.php answers)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from app.fakeportal.protocol import (
    BitrixError,
    Page,
    as_list,
    filter_of,
    known_filter,
    matches,
    narrowed,
    paged,
    param,
    positive_int,
    selected,
)
from app.fakeportal.records import COMPANY, CONTACT, LEAD, STATUS_SEMANTICS, TYPE_NAMES, now_iso
from app.fakeportal.state import CrmState

FINDBYCOMM_LIMIT = 20


def _comm_key(kind: str, value: str) -> str:
    """Duplicate search ignores case in e-mails and formatting in phone numbers."""
    return re.sub(r"\D", "", value) if kind == "PHONE" else value.strip().lower()


class EntityMethods(CrmState):
    """The four main CRM entities' methods, and the duplicate search over their e-mails and phones."""

    def _entity_id(self, type_id: int, params: Mapping[str, Any]) -> int:
        entity_id = positive_int(param(params, "id"))
        if entity_id is None:
            raise BitrixError(400, "", "ID is not defined or invalid.")
        if entity_id not in self.table(type_id):
            raise BitrixError(400, "", "Not found")  # no code: restservice.php
        if (type_id, entity_id) in self.unreadable:
            raise BitrixError(400, "", "Access denied.")
        return entity_id

    def _entity_get(self, type_id: int, params: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.table(type_id)[self._entity_id(type_id, params)])

    def _entity_list(self, type_id: int, params: Mapping[str, Any]) -> Page:
        filters = known_filter(filter_of(params), self.list_fields[TYPE_NAMES[type_id]])
        table = self.table(type_id)
        by_lead = self._by_lead.get(type_id)
        ids, leads = narrowed(filters, "ID"), narrowed(filters, "LEAD_ID")
        candidates: Iterable[int] = table
        if ids is not None:
            candidates = sorted(i for i in ids if i in table)
        elif leads is not None and by_lead is not None:
            candidates = sorted(set().union(*(by_lead.get(lead, ()) for lead in leads)))
        return selected(paged([dict(table[i]) for i in candidates
                                if matches(table[i], filters) and (type_id, i) not in self.unreadable], params),
                         params, multiple=("EMAIL", "PHONE"))

    def _entity_add(self, type_id: int, params: Mapping[str, Any]) -> int:
        fields = param(params, "fields")
        if not isinstance(fields, dict):
            raise BitrixError(400, "", "Parameter 'fields' must be array.")
        if type_id == LEAD:
            status = str(param(fields, "STATUS_ID") or "NEW")
            fields = {
                "STATUS_ID": status,
                "STATUS_SEMANTIC_ID": STATUS_SEMANTICS.get(status, "P"),
                "CONTACT_ID": None,
                "COMPANY_ID": None,
                **fields,
            }
        return self._insert(type_id, fields)

    def _entity_update(self, type_id: int, params: Mapping[str, Any]) -> bool:
        entity_id = self._entity_id(type_id, params)
        fields = param(params, "fields")
        if not isinstance(fields, dict):
            raise BitrixError(400, "", "Parameter 'fields' must be array.")
        if type_id == LEAD:
            self.update_lead(entity_id, **fields)
        else:
            row = self.table(type_id)[entity_id]
            old_lead_id = row.get("LEAD_ID")
            row.update(self._clean_fields(fields))
            row["DATE_MODIFY"] = now_iso()
            self._index_lead_id(type_id, entity_id, old_lead_id)
            self.events.append((f"ONCRM{TYPE_NAMES[type_id].upper()}UPDATE", entity_id))
        return True


    def _find_by_comm(self, params: Mapping[str, Any]) -> dict[str, list[int]] | list[Any]:
        kind = str(param(params, "type") or "").upper()
        if kind not in ("EMAIL", "PHONE"):
            raise BitrixError(400, "", "Communication type is not defined or invalid.")
        # The portal silently looks at the first 20 values only (crm restservice.php).
        wanted = {_comm_key(kind, str(v)) for v in as_list(param(params, "values"))[:FINDBYCOMM_LIMIT]}
        requested = str(param(params, "entity_type") or "").upper()
        found: dict[str, list[int]] = {}
        for type_id in (LEAD, CONTACT, COMPANY):
            name = TYPE_NAMES[type_id].upper()
            if requested and requested != name:
                continue
            ids = [
                entity_id
                for entity_id, row in sorted(self.table(type_id).items())
                if any(_comm_key(kind, f["VALUE"]) in wanted for f in row.get(kind) or [])
            ]
            if ids:
                found[name] = ids
        return found or []  # nothing found is an empty PHP array, i.e. []
