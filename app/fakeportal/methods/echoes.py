"""The events the fake portal posts back to the service (its echoes): every crm.activity.binding.add,
delete and move goes through CCrmActivity::Update, which fires ONCRMACTIVITYUPDATE, and the portal's event
queue posts it to the handler `event.bind` named, a moment after the request."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from urllib.parse import urlencode

import aiohttp

from app.fakeportal.state import CrmState


class PortalEchoes(CrmState):
    """The CRM state that posts ONCRMACTIVITYUPDATE for the service's own binding writes."""

    def _init_echoes(self) -> None:
        # Kept apart from `events` (what people and the portal's own robots do), and posted to the
        # handler `subscribe` names, after the request.
        self.echoes: list[tuple[str, int]] = []
        self.echo_delay = 0.05  # the portal's event queue sends a moment after the request
        self.echoes_posted = 0
        self.echo_replies: Counter[str] = Counter()  # how the handler answered: ignored | queued | refused
        self._handler: tuple[str, dict[str, str]] | None = None
        self._outbox: list[tuple[str, int]] = []
        self._sender: asyncio.Task[None] | None = None

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
