"""POST /bitrix/events: authenticate, validate, queue, and only then answer."""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from typing import TypedDict

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from app.api.keys import outage_key, queue_key, redis_key, rules_key, settings_key
from app.api.metrics import EVENT_LABELS
from app.intake.events import FORM, JSON, BadEvent, PortalEvent, decode_body, masked_payload
from app.intake.install import INSTALL_EVENT, accept_install, expected_token
from app.intake.spool import spool_key
from app.logs import Throttled
from app.store.jobs import JobRecord
from app.store.queue import ReplicasNotConfirmed

log = logging.getLogger(__name__)
# Lines any caller can cause once per request, or every event while Redis is away: one every 10 s
# for each kind, with a count of the rest (each spooled event is also a job record once drained).
throttled = Throttled(log)

MAX_BODY = 64 * 1024
BODY_TIMEOUT = 10.0  # seconds for a body of at most MAX_BODY: a portal sends it at once; a slow sender holds a slot
# Passed to the server: a portal's request has a dozen short headers; a TLS proxy adds a few more.
class HeaderLimits(TypedDict):
    max_line_size: int
    max_field_size: int
    max_headers: int


HEADER_LIMITS = HeaderLimits(max_line_size=4096, max_field_size=4096, max_headers=64)


async def receive_event(request: web.Request) -> web.Response:
    if not _source_allowed(request):
        throttled.warning("source", "refused an event from %s: not in B24_ALLOWED_SOURCES", request.remote)
        return _answer(403, error="this address may not post events; see B24_ALLOWED_SOURCES")
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _answer(413, error=f"the body is over {MAX_BODY // 1024} KiB; a portal's event is far smaller")
    if request.content_type not in (FORM, JSON):
        return _answer(415, error=f"unsupported content type; send {FORM} (as portals do) or {JSON}")
    try:
        data = decode_body(request.content_type, await asyncio.wait_for(request.read(), BODY_TIMEOUT))
        if str(data.get("event", "")).upper() == INSTALL_EVENT:
            status, answer = await accept_install(request.app[redis_key], request.app[rules_key].current, data)
            request[EVENT_LABELS] = ("-", INSTALL_EVENT, "installed")
            return _answer(status, **answer)
        event = PortalEvent.from_mapping(data)
    except TimeoutError:
        throttled.warning("slow body", "refused an event from %s: its body took over %g s", request.remote,
                          BODY_TIMEOUT)
        return _answer(408, error=f"the body did not arrive within {BODY_TIMEOUT:g} s")
    except web.HTTPRequestEntityTooLarge:  # the app's client_max_size is MAX_BODY
        return _answer(413, error=f"the body is over {MAX_BODY // 1024} KiB; a portal's event is far smaller")
    except BadEvent as exc:
        return _answer(400, error=f"not a Bitrix24 event: {exc}")

    rules = request.app[rules_key].current
    portal = rules.portal_for_domain(event.domain)
    try:
        expected = await expected_token(request.app[redis_key], portal) if portal is not None else None
    except (RedisError, OSError):
        return _answer(503, error="cannot check the application's token while Redis is unreachable")
    token_ok = expected is not None and hmac.compare_digest(event.application_token.encode(), expected.encode())
    if portal is None or not token_ok or (portal.member_id and portal.member_id != event.member_id):
        # The same answer for an unknown portal and a wrong token: a caller learns nothing.
        reason = ("unknown portal; add it to the rules file" if portal is None
                  else "application_token or member_id does not match the rules file")
        throttled.warning(reason, "refused %s from %s: %s", event.name, event.domain[:100], reason)
        return _answer(401, error="unknown portal or wrong application_token; check the outbound webhook's "
                                  "token and the portal's domain in the rules file")
    if event.name not in rules.events():
        request[EVENT_LABELS] = (portal.name, event.name, "ignored")
        return _answer(200, ignored=f"no rule listens to {event.name}")

    record = JobRecord.for_event(portal.name, event.name, event.entity_id, event.ts, event.handler_id)
    record.payload = masked_payload(data)
    outage = request.app.get(outage_key)
    if outage is not None and outage.down_for is not None:
        return await _spool(request, record)  # Redis is known to be away: no need to wait for it to fail again
    try:
        created = await request.app[queue_key].submit(record)
    except ReplicasNotConfirmed as exc:  # in Redis, but a failover could still lose it: on disk too
        return await _spool(request, record, str(exc))
    except (RedisError, OSError):
        return await _spool(request, record)
    # DEBUG: the job record is the lasting trace, and /metrics and a summary line a minute count intake.
    log.debug("queued job %s: %s %s on %s%s", record.id, event.name, event.entity_id, portal.name,
              "" if created else " (duplicate delivery, nothing new queued)")
    request[EVENT_LABELS] = (portal.name, event.name, "queued" if created else "duplicate")
    return _answer(200, job_id=record.id, duplicate=not created)


async def _spool(request: web.Request, record: JobRecord, why: str = "Redis is unreachable") -> web.Response:
    """Redis is unreachable: keep the event on disk, where the spool's drainer will find it."""
    spool = request.app.get(spool_key)
    try:
        if spool is None:
            raise OSError("no spool")
        await spool.append(record)
    except OSError:
        log.error("could not queue or spool %s %s for %s", record.event, record.entity_id, record.portal)
        return _answer(503, error="the queue is unreachable; the event was not accepted. Check Redis.")
    throttled.warning("spooled", "%s: spooled job %s (%s %s on %s) to disk", why, record.id,
                      record.event, record.entity_id, record.portal)
    request[EVENT_LABELS] = (record.portal, record.event, "spooled")
    return _answer(200, job_id=record.id, spooled=True)


def _source_allowed(request: web.Request) -> bool:
    allowed = request.app[settings_key].allowed_sources
    if not allowed:
        return True
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    return any(address in network for network in allowed)


def _answer(status: int, **body: object) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", charset="utf-8")
