"""The fake portal's activities and timeline comments: their bindings, kept in the portal's order, and
the owner the portal recalculates on every save (appendOwnerFromBindings), with its cap on how many
bindings a save keeps (DoSaveBindings)."""

from __future__ import annotations

from app.fakeportal.records import (
    CLIENT_TYPES,
    COMPLETABLE_TYPES,
    TYPE_NAMES,
    Binding,
    CrmRecords,
    now_iso,
    type_label,
)


def _owner_of(bindings: list[Binding]) -> Binding:
    """appendOwnerFromBindings: the last binding that is not a contact or company, else the first."""
    others = [b for b in bindings if b[0] not in CLIENT_TYPES]
    return others[-1] if others else bindings[0]



class CrmActivities(CrmRecords):
    """The records with their activities and comments, bound as the portal binds them."""

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

    def delete_activity(self, activity_id: int) -> None:
        """Delete an activity as a person does in the UI."""
        for binding in self._binding_order.pop(activity_id):
            self._bound[binding].discard(activity_id)
        del self.activities[activity_id], self.activity_bindings[activity_id]
        self.events.append(("ONCRMACTIVITYDELETE", activity_id))


    def check_invariants(self) -> list[str]:
        """The violations so far, and any activity now bound to a record that does not exist."""
        dangling = [f"activity {a} is bound to {type_label(t)} {i}, which does not exist"
                    for a, bindings in self._binding_order.items() for t, i in bindings
                    if not self.entity_exists(t, i)]
        return [*self.violations, *(d for d in dangling if d not in self.violations)]


    def _complete_open_activities(self, owner: Binding) -> None:
        """A lead reaching a final status completes its open activities of the kinds that can be completed
        (CCrmLead), a burst of ONCRMACTIVITYUPDATE. Which kinds exactly is not documented: the fake takes
        meetings, calls and to-dos, and leaves e-mails (completed when read) alone."""
        for activity_id in sorted(self._bound.get(owner, set())):
            activity = self.activities[activity_id]
            if activity["COMPLETED"] == "N" and activity["TYPE_ID"] in COMPLETABLE_TYPES:
                activity["COMPLETED"], activity["LAST_UPDATED"] = "Y", now_iso()
                self.events.append(("ONCRMACTIVITYUPDATE", activity_id))


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
