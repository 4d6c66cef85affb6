"""The REST methods the fake portal serves, over its CRM state: ``crm.activity.binding.*``,
``crm.activity.*``, ``crm.lead/contact/company/deal.*``, ``crm.timeline.*``, ``event.offline.*``,
``crm.duplicate.findbycomm`` and the methods `doctor` asks (``scope``, ``method.get``,
``crm.settings.mode.get``), with the error codes and quirks of the methods' pages in the official docs
(GitHub ``bitrix24/b24restdocs``, ``api-reference/crm/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any
from urllib.parse import urlencode

import aiohttp

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
    truthy,
)
from app.fakeportal.state import (
    COMPANY,
    CONTACT,
    LEAD,
    STATUS_SEMANTICS,
    TYPE_NAMES,
    Binding,
    CrmState,
    now_iso,
    type_label,
)

FINDBYCOMM_LIMIT = 20
# The global scope: methods every portal says are available (method.get), whatever the webhook's scopes.
GLOBAL_METHODS = ("event.", "scope", "method.")


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


def _comm_key(kind: str, value: str) -> str:
    """Duplicate search ignores case in e-mails and formatting in phone numbers."""
    return re.sub(r"\D", "", value) if kind == "PHONE" else value.strip().lower()


class RestMethods(CrmState):
    """The CRM state with the portal's REST methods, looked up by name in `_methods`."""

    def __init__(self, user_id: int = 1) -> None:
        CrmState.__init__(self, user_id)
        self.scopes = ["crm", "user_brief"]  # the webhook's scopes, as `scope` answers
        self.crm_mode = 1  # crm.settings.mode.get: 1 classic, 2 simple (no leads)
        self.bindings_filter_ignored = False  # an old portal: crm.activity.list ignores filter[BINDINGS]
        self.admin = True  # whether the webhook's (or application's) user is a portal administrator
        self.auth_type = "webhook"  # how the request being served authenticated: webhook | oauth
        self.timeline_saves_fail = False  # crm.timeline.bindings.bind/unbind: the save fails (answers false)
        self._methods: dict[str, Callable[[Mapping[str, Any]], Any]] = self._method_table()
        # The echo of the service's own writes: every crm.activity.binding.add/delete/move goes through
        # CCrmActivity::Update, which fires ONCRMACTIVITYUPDATE. Kept apart from `events` (what people
        # and the portal's own robots do), and posted to the handler `subscribe` names, after the request.
        self.echoes: list[tuple[str, int]] = []
        self.echo_delay = 0.05  # the portal's event queue sends a moment after the request
        self.echoes_posted = 0
        self.echo_replies: Counter[str] = Counter()  # how the handler answered: ignored | queued | refused
        self._handler: tuple[str, dict[str, str]] | None = None
        self._outbox: list[tuple[str, int]] = []
        self._sender: asyncio.Task[None] | None = None

    # -------------------------------------------------------- method table

    def _method_table(self) -> dict[str, Callable[[Mapping[str, Any]], Any]]:
        # A portal's own list; a test removes methods to play an older portal.
        methods: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            "crm.activity.binding.list": self._binding_list,
            "crm.activity.binding.add": self._binding_add,
            "crm.activity.binding.delete": self._binding_delete,
            "crm.activity.binding.move": self._binding_move,
            "crm.activity.get": self._activity_get,
            "crm.activity.list": self._activity_list,
            "crm.activity.add": self._activity_add,
            "crm.timeline.comment.list": self._comment_list,
            "crm.timeline.comment.add": self._comment_add,
            "crm.timeline.bindings.list": self._timeline_bindings_list,
            "crm.timeline.bindings.bind": self._timeline_bind,
            "crm.timeline.bindings.unbind": self._timeline_unbind,
            "crm.duplicate.findbycomm": self._find_by_comm,
            "event.offline.get": self._offline_get,
            "event.offline.clear": self._offline_clear,
            "event.offline.list": self._offline_list,
            "scope": lambda p: list(self.scopes),
            "method.get": self._method_get,
            "crm.settings.mode.get": lambda p: self.crm_mode,
        }
        for type_id, name in TYPE_NAMES.items():
            methods[f"crm.{name}.get"] = partial(self._entity_get, type_id)
            methods[f"crm.{name}.list"] = partial(self._entity_list, type_id)
            methods[f"crm.{name}.add"] = partial(self._entity_add, type_id)
            methods[f"crm.{name}.update"] = partial(self._entity_update, type_id)
        return methods

    def _method_get(self, params: Mapping[str, Any]) -> dict[str, bool]:
        name = str(param(params, "name") or "").lower()
        if not name:
            raise BitrixError(400, "ERROR_ARGUMENT", "Method name is required")
        exists = name in self._methods
        # event.* are global-scope methods: available on every portal; only a call shows a refusal.
        available = name.startswith(GLOBAL_METHODS) or name.split(".")[0] in self.scopes
        return {"isExisting": exists, "isAvailable": exists and available}

    def remove_method(self, name: str) -> None:
        """Play a portal that does not know a method (an older version, or another edition)."""
        self._methods.pop(name.lower(), None)

    # -------------------------------------------------------- events the portal sends (echoes)

    def subscribe(self, handler_url: str, application_token: str, domain: str) -> None:
        """Bind ONCRMACTIVITYUPDATE to the installation's handler (event.bind): echoes are posted there."""
        self._handler = (handler_url, {"auth[domain]": domain, "auth[application_token]": application_token,
                                       "auth[member_id]": "fake-member",
                                       "auth[client_endpoint]": f"https://{domain}/rest/"})

    @property
    def subscribed(self) -> bool:
        return self._handler is not None

    def _echo(self, activity_id: int) -> None:
        self.echoes.append(("ONCRMACTIVITYUPDATE", activity_id))
        if self._handler is None:
            return
        self._outbox.append(("ONCRMACTIVITYUPDATE", activity_id))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_echoes())

    async def _send_echoes(self) -> None:
        """Post the queued echoes one by one, as the portal's queue does; a refused one is not sent again."""
        assert self._handler is not None
        url, auth = self._handler
        await asyncio.sleep(self.echo_delay)  # after the request that caused them has been answered
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while self._outbox:
                event, entity_id = self._outbox.pop(0)
                body = urlencode({"event": event, "event_handler_id": "1", "data[FIELDS][ID]": str(entity_id),
                                  "ts": str(int(time.time())), **auth})
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    async with http.post(url, data=body, headers={
                            "Content-Type": "application/x-www-form-urlencoded"}) as response:
                        reply = await response.json(content_type=None) if response.status == 200 else {}
                        self.echoes_posted += response.status == 200
                        self.echo_replies["refused" if response.status != 200 else
                                          "ignored" if isinstance(reply, dict) and "ignored" in reply else "queued"] += 1

    async def echoes_sent(self, timeout: float = 30.0) -> None:
        """Wait (with a deadline) until every queued echo has been posted."""
        async with asyncio.timeout(timeout):
            while self._sender is not None and not self._sender.done():
                await asyncio.shield(self._sender)

    async def stop_echoes(self) -> None:
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender

    # -------------------------------------------------------- crm.activity.binding.*

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

    # -------------------------------------------------------- crm.lead/contact/company/deal.*

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

    # -------------------------------------------------------- crm.timeline.*

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

    # -------------------------------------------------------- event.offline.*

    def _offline_allowed(self) -> None:
        """event.offline.* work only for an application (rest/lib/api/event.php): a webhook gets
        WRONG_AUTH_TYPE, an application's user who is no administrator ACCESS_DENIED."""
        if self.auth_type != "oauth":
            raise BitrixError(401, "WRONG_AUTH_TYPE", "Current authorization type is denied for this method")
        if not self.admin:
            raise BitrixError(403, "ACCESS_DENIED", "Access denied!")

    def _offline_list(self, params: Mapping[str, Any]) -> Page:
        """The queue as it is, changing nothing (event.offline.list)."""
        self._offline_allowed()
        rows = [{**e, "PROCESS_ID": e["PROCESS_ID"] or "", "ERROR": "0"} for e in self.offline_events]
        return paged(rows, params)

    def _offline_get(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """clear=0 reserves the records under a process id, hidden from other readers until cleared."""
        self._offline_allowed()
        limit = positive_int(param(params, "limit")) or 50
        free = [e for e in self.offline_events if e["PROCESS_ID"] is None][:limit]
        if truthy(param(params, "clear") if param(params, "clear") is not None else 1):
            taken = {id(e) for e in free}
            self.offline_events = [e for e in self.offline_events if id(e) not in taken]
            return {"process_id": None, "events": [{k: v for k, v in e.items() if k != "PROCESS_ID"} for e in free]}
        process_id = f"p{self._new_id('process')}" if free else None
        for event in free:
            event["PROCESS_ID"] = process_id
        return {"process_id": process_id,
                "events": [{k: v for k, v in e.items() if k != "PROCESS_ID"} for e in free]}

    def _offline_clear(self, params: Mapping[str, Any]) -> bool:
        self._offline_allowed()
        process_id = param(params, "process_id")
        if not process_id:
            raise BitrixError(400, "", "PROCESS_ID is not defined")
        self.offline_events = [e for e in self.offline_events if e["PROCESS_ID"] != process_id]
        return True

    # -------------------------------------------------------- crm.duplicate.findbycomm

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
