"""``crm.activity.binding.*`` and ``crm.activity.*`` as the fake portal serves them, with the error codes
and quirks of the methods' pages in the official docs (a binding to a record that does not exist is saved
all the same; past the cap the save drops bindings without a word)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.fakeportal.methods.echoes import PortalEchoes
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
    required_int,
    selected,
)
from app.fakeportal.records import Binding, type_label


def _binding_pairs(value: Any) -> set[Binding]:
    """``[{"OWNER_TYPE_ID": 1, "OWNER_ID": 5}, ...]`` (JSON or PHP form) as a set of pairs."""
    pairs = set()
    for item in as_list(value):
        if isinstance(item, dict):
            type_id, entity_id = (
                positive_int(param(item, "OWNER_TYPE_ID")),
                positive_int(param(item, "OWNER_ID")),
            )
            if type_id is not None and entity_id is not None:
                pairs.add((type_id, entity_id))
    return pairs



class ActivityMethods(PortalEchoes):
    """crm.activity.binding.list/add/delete/move and crm.activity.get/list/add."""

    bindings_filter_ignored: bool  # an old portal: crm.activity.list ignores filter[BINDINGS]

    def _activity_of(self, params: Mapping[str, Any]) -> int:
        activity_id = required_int(params, "activityId")
        if activity_id not in self.activities:
            raise BitrixError(400, "NOT_FOUND", "Element not found")
        return activity_id

    def _may_change(self, *records: Binding) -> None:
        if any(record in self.unreadable for record in records):
            raise BitrixError(403, "ACCESS_DENIED", "Access denied")

    def _dangling(self, activity_id: int, target: Binding) -> None:
        """The controller never checks the target exists (Controller/Activity/Binding.php): the binding is
        saved all the same, and an activity bound to nothing real is what the service must never cause."""
        if not self.entity_exists(*target):
            self.violations.append(
                f"activity {activity_id} was bound to {type_label(target[0])} {target[1]}, which does not exist")

    def _binding_list(self, params: Mapping[str, Any]) -> list[dict[str, int]]:
        activity_id = self._activity_of(params)
        return [{"entityTypeId": t, "entityId": i} for t, i in self._binding_order[activity_id]
                if (t, i) not in self.unreadable]  # bindings the user cannot read are silently left out

    def _binding_add(self, params: Mapping[str, Any]) -> bool:
        names = ("activityId", "entityTypeId", "entityId")
        _, type_id, entity_id = (required_int(params, n) for n in names)  # all present, in order
        activity_id = self._activity_of(params)
        self._may_change((type_id, entity_id))
        current = self._binding_order[activity_id]
        if (type_id, entity_id) in current:
            raise BitrixError(
                400, "ACTIVITY_IS_ALREADY_BOUND", "The activity is already bound to this entity"
            )
        self._dangling(activity_id, (type_id, entity_id))
        # No check of the count: the save keeps the 100 with the highest owner id and answers true.
        self._dropped(activity_id, self._set_bindings(activity_id, [*current, (type_id, entity_id)]))
        self._echo(activity_id)
        return True

    def _dropped(self, activity_id: int, dropped: list[Binding]) -> None:
        """A binding the portal dropped past its cap because of a write of the service's: lost for good."""
        self.violations += [f"activity {activity_id} lost its binding to {type_label(t)} {i}: a REST write "
                            f"took it past {self.max_bindings} bindings" for t, i in dropped]

    def _binding_delete(self, params: Mapping[str, Any]) -> bool:
        names = ("activityId", "entityTypeId", "entityId")
        _, type_id, entity_id = (required_int(params, n) for n in names)  # all present, in order
        activity_id = self._activity_of(params)
        self._may_change((type_id, entity_id))
        current = self._binding_order[activity_id]
        if (type_id, entity_id) not in current:
            raise BitrixError(400, "BINDING_NOT_FOUND", "The activity is not bound to this entity")
        if len(current) == 1:
            raise BitrixError(400, "LAST_BINDING_CANNOT_BE_DELETED", "Cannot delete the only binding")
        self._set_bindings(activity_id, [b for b in current if b != (type_id, entity_id)])
        self._echo(activity_id)
        return True

    def _binding_move(self, params: Mapping[str, Any]) -> bool:
        names = ("activityId", "sourceEntityTypeId", "sourceEntityId", "targetEntityTypeId", "targetEntityId")
        _, source_type, source_id, target_type, target_id = (required_int(params, n) for n in names)
        # The portal checks the IDs before anything else, even before the activity, and raises this
        # and the type mismatch without an error code (moveAction).
        if source_id == target_id:
            raise BitrixError(400, "", "Source and target entity ID cannot be equal")
        if source_type != target_type:
            raise BitrixError(400, "", "Source and target entity types are not equal")
        activity_id = self._activity_of(params)
        self._may_change((source_type, source_id), (target_type, target_id))
        current = self._binding_order[activity_id]
        if (target_type, target_id) in current:  # checked before the source binding is looked for
            raise BitrixError(400, "ACTIVITY_IS_ALREADY_BOUND", "The activity is already bound to the target")
        if (source_type, source_id) not in current:
            raise BitrixError(400, "BINDING_NOT_FOUND", "The activity is not bound to the source entity")
        self._dangling(activity_id, (target_type, target_id))
        # The target is appended last (not put in the source's place); the owner is recalculated.
        self._set_bindings(activity_id, [*(b for b in current if b != (source_type, source_id)),
                                         (target_type, target_id)])
        self._echo(activity_id)
        return True

    # -------------------------------------------------------- crm.activity.*

    def _activity_get(self, params: Mapping[str, Any]) -> dict[str, Any]:
        activity_id = positive_int(param(params, "id"))
        if activity_id is None:
            raise BitrixError(400, "", "ID is not defined or invalid.")
        if activity_id not in self.activities:
            raise BitrixError(400, "", "Activity is not found")
        if not self._readable_activity(activity_id):
            raise BitrixError(400, "", "Access denied")
        # Communications load only when a list selects them (restservice.php innerGet).
        return {k: v for k, v in self.activities[activity_id].items() if k != "COMMUNICATIONS"}

    def _readable_activity(self, activity_id: int) -> bool:
        activity = self.activities[activity_id]
        return (int(activity["OWNER_TYPE_ID"]), int(activity["OWNER_ID"])) not in self.unreadable

    def _activity_list(self, params: Mapping[str, Any]) -> Page:
        filters = known_filter(filter_of(params), self.list_fields["activity"])
        wanted = _binding_pairs(filters.pop("BINDINGS", None))
        wanted = set() if self.bindings_filter_ignored else wanted
        ids = narrowed(filters, "ID")
        candidates = sorted(set().union(*(self._bound.get(b, ()) for b in wanted))) if wanted \
            else sorted(i for i in ids if i in self.activities) if ids is not None else self.activities
        rows = [dict(row) for row in map(self.activities.__getitem__, candidates)
                if matches(row, filters) and self._readable_activity(int(row["ID"]))]
        # COMMUNICATIONS is a multiple field: returned only when named, never for "*" or no select.
        return selected(paged(rows, params), params, multiple=("COMMUNICATIONS",))

    def _activity_add(self, params: Mapping[str, Any]) -> int:
        fields = param(params, "fields") or {}
        owner_type, owner_id = (
            positive_int(param(fields, "OWNER_TYPE_ID")),
            positive_int(param(fields, "OWNER_ID")),
        )
        if owner_type is None or owner_id is None or not self.entity_exists(owner_type, owner_id):
            raise BitrixError(400, "", "OWNER_ID is not defined or invalid.")
        owner = (owner_type, owner_id)
        extra = sorted(_binding_pairs(param(fields, "BINDINGS")) - {owner})
        comms = [c for c in as_list(param(fields, "COMMUNICATIONS")) if isinstance(c, dict)]
        email = next((c.get("VALUE") for c in comms if c.get("TYPE", "EMAIL") == "EMAIL"), None)
        activity_id = self.add_activity(
            [owner, *extra],
            subject=param(fields, "SUBJECT") or "Activity",
            type_id=int(param(fields, "TYPE_ID") or 4),
            provider_id=param(fields, "PROVIDER_ID") or "CRM_EMAIL",
            direction=int(param(fields, "DIRECTION") or 1),
            responsible_id=int(param(fields, "RESPONSIBLE_ID") or self.user_id),
            email=email,
        )
        return activity_id
