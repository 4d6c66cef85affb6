"""POST /bitrix/events: authenticate, validate, queue, and only then answer."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
from collections.abc import Iterator
from typing import Any, TypedDict

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from app.api.keys import outage_key, queue_key, redis_key, rules_key, settings_key
from app.api.metrics import EVENT_LABELS
from app.intake.events import FORM, JSON, BadEvent, PortalEvent, decode_body, masked_payload
from app.intake.install import INSTALL_EVENT, accept_install, expected_token
from app.intake.spool import spool_key
from app.logs import Throttled
from app.portal_config import PortalConfig
from app.rules.model import RuleSet
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


class _Refused(Exception):
    """A request answered before it became a job; `answer` says why."""

    def __init__(self, answer: web.Response) -> None:
        super().__init__(answer.status)
        self.answer = answer


async def receive_event(request: web.Request) -> web.Response:
    """Check the sender, read the event, check its portal's token, then queue it (or spool it) and answer.

    The answer is 200 only once the event is in Redis or fsync'd in the spool: a portal never re-sends."""
    try:
        _check_before_reading(request)
        with _bad_bodies_refused(request):
            data = decode_body(request.content_type, await asyncio.wait_for(request.read(), BODY_TIMEOUT))
            if str(data.get("event", "")).upper() == INSTALL_EVENT:
                return await _install(request, data)
            event = PortalEvent.from_mapping(data)
        rules = request.app[rules_key].current  # one rule set for the request, whatever reloads meanwhile
        portal = await _authenticate(request, rules, event)
    except _Refused as refused:
        return refused.answer
    if event.name not in rules.events():
        request[EVENT_LABELS] = (portal.name, event.name, "ignored")
        return _answer(200, ignored=f"no rule listens to {event.name}")
    record = JobRecord.for_event(portal.name, event.name, event.entity_id, event.ts, event.handler_id)
    record.payload = masked_payload(data)
    return await _queue_or_spool(request, record)


def _check_before_reading(request: web.Request) -> None:
    """Refuse, before reading a byte of the body, what no portal sends: a foreign address, a huge body."""
    if not _source_allowed(request):
        throttled.warning("source", "refused an event from %s: not in B24_ALLOWED_SOURCES", request.remote)
        raise _Refused(_answer(403, error="this address may not post events; see B24_ALLOWED_SOURCES"))
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise _Refused(_too_large())
    if request.content_type not in (FORM, JSON):
        raise _Refused(_answer(415, error=f"unsupported content type; send {FORM} (as portals do) or {JSON}"))


@contextlib.contextmanager
def _bad_bodies_refused(request: web.Request) -> Iterator[None]:
    """A body that is slow, too large or not an event is answered with what is wrong, never a traceback."""
    try:
        yield
    except TimeoutError:
        throttled.warning("slow body", "refused an event from %s: its body took over %g s", request.remote,
                          BODY_TIMEOUT)
        raise _Refused(_answer(408, error=f"the body did not arrive within {BODY_TIMEOUT:g} s")) from None
    except web.HTTPRequestEntityTooLarge:  # the app's client_max_size is MAX_BODY
        raise _Refused(_too_large()) from None
    except BadEvent as exc:
        raise _Refused(_answer(400, error=f"not a Bitrix24 event: {exc}")) from None


async def _install(request: web.Request, data: dict[str, Any]) -> web.Response:
    status, answer = await accept_install(request.app[redis_key], request.app[rules_key].current, data)
    request[EVENT_LABELS] = ("-", INSTALL_EVENT, "installed")
    return _answer(status, **answer)


async def _authenticate(request: web.Request, rules: RuleSet, event: PortalEvent) -> PortalConfig:
    """The portal the event comes from, once its application token (and member id) match the rules file."""
    portal = rules.portal_for_domain(event.domain)
    try:
        expected = await expected_token(request.app[redis_key], portal) if portal is not None else None
    except (RedisError, OSError):
        unreachable = "cannot check the application's token while Redis is unreachable"
        raise _Refused(_answer(503, error=unreachable)) from None
    token_ok = expected is not None and hmac.compare_digest(event.application_token.encode(), expected.encode())
    if portal is None or not token_ok or (portal.member_id and portal.member_id != event.member_id):
        # The same answer for an unknown portal and a wrong token: a caller learns nothing.
        reason = ("unknown portal; add it to the rules file" if portal is None
                  else "application_token or member_id does not match the rules file")
        throttled.warning(reason, "refused %s from %s: %s", event.name, event.domain[:100], reason)
        raise _Refused(_answer(401, error="unknown portal or wrong application_token; check the outbound "
                                          "webhook's token and the portal's domain in the rules file"))
    return portal


async def _queue_or_spool(request: web.Request, record: JobRecord) -> web.Response:
    """Queue the job; to the spool on disk when Redis is away or a failover could still lose it."""
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
    log.debug("queued job %s: %s %s on %s%s", record.id, record.event, record.entity_id, record.portal,
              "" if created else " (duplicate delivery, nothing new queued)")
    request[EVENT_LABELS] = (record.portal, record.event, "queued" if created else "duplicate")
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


def _too_large() -> web.Response:
    return _answer(413, error=f"the body is over {MAX_BODY // 1024} KiB; a portal's event is far smaller")


def _answer(status: int, **body: object) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", charset="utf-8")
