"""``crm.timeline.comment.*`` and ``crm.timeline.bindings.*`` as the fake portal serves them: a bindings
write answers `false` without an error where CCrmTimelineBindingRestProxy does."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.fakeportal.protocol import BitrixError, Page, filter_of, matches, paged, param, positive_int
from app.fakeportal.records import TYPE_NAMES
from app.fakeportal.state import CrmState


class TimelineMethods(CrmState):
    """Timeline comments and the records each is bound to."""

    timeline_saves_fail: bool  # crm.timeline.bindings.bind/unbind: the save fails (answers false)

    def _comment_list(self, params: Mapping[str, Any]) -> Page:
        filters = {k.upper(): v for k, v in filter_of(params).items()}
        entity_id = positive_int(filters.pop("ENTITY_ID", None))
        entity_type = str(filters.pop("ENTITY_TYPE", "")).lower()
        if entity_id is None:
            raise BitrixError(400, "", "ENTITY_ID is not defined or invalid.")
        if entity_type not in TYPE_NAMES.values():
            raise BitrixError(400, "", "ENTITY_TYPE is not defined or invalid.")
        rows = []
        for comment_id, row in self.comments.items():
            # A comment shows in every timeline it is bound to, not only its original one.
            if (entity_type, entity_id) in self.comment_binding_sets[comment_id] and matches(row, filters):
                rows.append({**row, "ENTITY_TYPE": entity_type, "ENTITY_ID": str(entity_id)})
        return paged(rows, params)

    def _comment_add(self, params: Mapping[str, Any]) -> int:
        fields = param(params, "fields") or {}
        entity_type, entity_id = self._timeline_target(fields)
        return self.add_timeline_comment(entity_type, entity_id, str(param(fields, "COMMENT") or ""))

    def _timeline_target(self, fields: Mapping[str, Any], exists: bool = True) -> tuple[str, int]:
        entity_id = positive_int(param(fields, "ENTITY_ID"))
        if entity_id is None:
            raise BitrixError(400, "", "ENTITY_ID is not defined or invalid.")
        entity_type = str(param(fields, "ENTITY_TYPE") or "").lower()
        type_ids = {name: type_id for type_id, name in TYPE_NAMES.items()}
        if entity_type not in type_ids:
            raise BitrixError(400, "", "ENTITY_TYPE is not defined or invalid.")
        if exists and not self.entity_exists(type_ids[entity_type], entity_id):
            raise BitrixError(400, "", "ENTITY_ID is not defined or invalid.")
        return entity_type, entity_id

    def _timeline_owner(self, fields: Mapping[str, Any]) -> int:
        owner_id = positive_int(param(fields, "OWNER_ID"))
        if owner_id is None or owner_id not in self.comments:
            raise BitrixError(400, "", "OWNER_ID is not defined or invalid.")
        return owner_id

    def _timeline_bindings_list(self, params: Mapping[str, Any]) -> Page:
        owner_id = self._timeline_owner(filter_of(params))
        rows = [
            {"OWNER_ID": str(owner_id), "ENTITY_ID": str(entity_id), "ENTITY_TYPE": entity_type}
            for entity_type, entity_id in self.comment_bindings(owner_id)
        ]
        return paged(rows, {"order": {"ENTITY_ID": "ASC"}, "start": param(params, "start")})

    def _timeline_write(self, fields: Mapping[str, Any]) -> tuple[int, tuple[str, int]] | None:
        """The comment and target of a bindings write, or None where CCrmTimelineBindingRestProxy answers
        `false` without an error: the comment missing, no rights on the target, or the save failing.
        Neither the comment's nor the target's existence is checked with an error."""
        owner_id = positive_int(param(fields, "OWNER_ID"))
        target = self._timeline_target(fields, exists=False)
        type_id = next(t for t, name in TYPE_NAMES.items() if name == target[0])
        if owner_id is None or owner_id not in self.comments or (type_id, target[1]) in self.unreadable \
                or self.timeline_saves_fail:
            return None
        return owner_id, target

    def _timeline_bind(self, params: Mapping[str, Any]) -> bool:
        found = self._timeline_write(param(params, "fields") or {})
        if found is None:
            return False
        owner_id, target = found
        type_id = next(t for t, name in TYPE_NAMES.items() if name == target[0])
        if not self.entity_exists(type_id, target[1]):
            self.violations.append(f"comment {owner_id} was bound to {target[0]} {target[1]}, which does not exist")
        self.comment_binding_sets[owner_id].add(target)  # an upsert: binding twice answers true
        return True

    def _timeline_unbind(self, params: Mapping[str, Any]) -> bool:
        found = self._timeline_write(param(params, "fields") or {})
        if found is None:
            return False
        owner_id, target = found
        if target not in self.comment_binding_sets[owner_id]:
            raise BitrixError(400, "", "Not found.")
        self.comment_binding_sets[owner_id].discard(target)  # no last-binding guard
        return True
