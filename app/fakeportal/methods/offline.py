"""``event.offline.get/list/clear`` as the fake portal serves them: for an application only, and
`clear=0` reserves the records it hands out under a process id."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.fakeportal.protocol import BitrixError, Page, paged, param, positive_int, truthy
from app.fakeportal.state import CrmState


class OfflineEventMethods(CrmState):
    """The portal's queue of offline events, as an application reads and clears it."""

    auth_type: str  # how the request being served authenticated: webhook | oauth
    admin: bool  # whether the webhook's (or application's) user is a portal administrator

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
