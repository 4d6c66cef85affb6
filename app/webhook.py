"""POST /bitrix/events: authenticate, validate, queue, and only then answer."""
from __future__ import annotations

import hmac
import logging

from aiohttp import web
from redis.exceptions import RedisError

from app.events import FORM, JSON, BadEvent, PortalEvent
from app.jobs import JobRecord
from app.keys import queue_key, rules_key

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024


async def receive_event(request: web.Request) -> web.Response:
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _answer(413, error=f"the body is over {MAX_BODY // 1024} KiB; a portal's event is far smaller")
    if request.content_type not in (FORM, JSON):
        return _answer(415, error=f"unsupported content type; send {FORM} (as portals do) or {JSON}")
    try:
        event = PortalEvent.from_body(request.content_type, await request.read())
    except web.HTTPRequestEntityTooLarge:  # the app's client_max_size is MAX_BODY
        return _answer(413, error=f"the body is over {MAX_BODY // 1024} KiB; a portal's event is far smaller")
    except BadEvent as exc:
        return _answer(400, error=f"not a Bitrix24 event: {exc}")

    rules = request.app[rules_key].current
    portal = rules.portal_for_domain(event.domain)
    token_ok = portal is not None and hmac.compare_digest(
        event.application_token.encode(), portal.application_token.get_secret_value().encode())
    if portal is None or not token_ok or (portal.member_id and portal.member_id != event.member_id):
        # The same answer for an unknown portal and a wrong token: a caller learns nothing.
        log.warning("refused %s from %s: %s", event.name, event.domain[:100],
                    "unknown portal; add it to the rules file" if portal is None
                    else "application_token or member_id does not match the rules file")
        return _answer(401, error="unknown portal or wrong application_token; check the outbound webhook's "
                                  "token and the portal's domain in the rules file")
    if event.name not in rules.events():
        return _answer(200, ignored=f"no rule listens to {event.name}")

    record = JobRecord.for_event(portal.name, event.name, event.entity_id, event.ts, event.handler_id)
    try:
        created = await request.app[queue_key].submit(record)
    except (RedisError, OSError):
        log.error("could not queue %s %s for %s: Redis is unreachable", event.name, event.entity_id, portal.name)
        return _answer(503, error="the queue is unreachable; the event was not accepted. Check Redis.")
    log.info("queued job %s: %s %s on %s%s", record.id, event.name, event.entity_id, portal.name,
             "" if created else " (duplicate delivery, nothing new queued)")
    return _answer(200, job_id=record.id, duplicate=not created)


def _answer(status: int, **body: object) -> web.Response:
    return web.json_response(body, status=status)
