"""The REST methods the fake portal serves, over its CRM state: ``crm.activity.binding.*``,
``crm.activity.*``, ``crm.lead/contact/company/deal.*``, ``crm.timeline.*``, ``event.offline.*``,
``crm.duplicate.findbycomm`` and the methods `doctor` asks (``scope``, ``method.get``,
``crm.settings.mode.get``), with the error codes and quirks of the methods' pages in the official docs
(GitHub ``bitrix24/b24restdocs``, ``api-reference/crm/``).

Each family is a module of its own; `RestMethods` puts them together in the table the server looks a
method up in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from app.fakeportal.methods.activities import ActivityMethods
from app.fakeportal.methods.entities import EntityMethods
from app.fakeportal.methods.offline import OfflineEventMethods
from app.fakeportal.methods.timeline import TimelineMethods
from app.fakeportal.protocol import BitrixError, param
from app.fakeportal.records import TYPE_NAMES
from app.fakeportal.state import CrmState

# The global scope: methods every portal says are available (method.get), whatever the webhook's scopes.
GLOBAL_METHODS = ("event.", "scope", "method.")


class RestMethods(ActivityMethods, EntityMethods, TimelineMethods, OfflineEventMethods):
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
        self._init_echoes()

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
