"""The JSON API for people and tools: job lists, retries, stats and the audit log.

Every refusal is a 4xx with `{"error": "..."}` that says what to send instead; a request this API
cannot parse never becomes a 500.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

from aiohttp import web
from redis.exceptions import RedisError

from app.api import stats
from app.api.alerting import alert_context
from app.api.keys import queue_key, redis_key, rules_key, settings_key, store_key
from app.api.metrics import setup_metrics
from app.api.openapi import openapi_document
from app.api.stream import setup_stream
from app.bitrix.errors import B24Error
from app.intake.spool import spool_key
from app.rebind.undo import UndoRefused, undo_with_rules
from app.store.audit import AuditLog
from app.store.jobs import FINAL_STATES, Cursor, JobQuery, JobRecord, JobState, UnknownJob, is_job_id

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LIST_PARAMS = ("state", "portal", "event", "rule", "trigger", "entity", "lead", "since", "until", "limit", "cursor")
MAX_LIMIT = 500
MAX_RETRY = 1000
_NAME = re.compile(r"^[\w.:@/+-]{1,200}$")


class BadRequest(Exception):
    """A request parameter is missing or malformed; the message says what to send."""


def setup_api(app: web.Application) -> None:
    """Add the API routes, the live stream and /metrics to the web application."""
    app.middlewares.append(api_errors)
    app.router.add_get("/api/jobs", list_jobs)
    app.router.add_get("/api/jobs/{job_id}", get_job)
    app.router.add_post("/api/jobs/retry", retry_jobs)
    app.router.add_post("/api/jobs/{job_id}/retry", retry_job)
    app.router.add_post("/api/jobs/{job_id}/undo", undo_job_changes)
    app.router.add_get("/api/stats", get_stats)
    app.router.add_get("/api/audit", get_audit)
    app.router.add_get("/api/openapi.json", get_openapi)
    setup_stream(app)
    setup_metrics(app)
    app.cleanup_ctx.append(alert_context)  # B24_ALERT_WEBHOOK, when set


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bad parameters become 400, unknown routes and methods JSON errors, Redis outages 503."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except UnknownJob as exc:
        return web.json_response({"error": str(exc)}, status=404)
    except web.HTTPException as exc:
        if not request.path.startswith("/api/") or exc.status < 400:
            raise
        return web.json_response({"error": f"{exc.reason}: {request.method} {request.path[:100]}; see "
                                           "/api/openapi.json for the API"}, status=exc.status)
    except (RedisError, OSError):
        if not request.path.startswith("/api/"):
            raise
        log.debug("API request %s failed: Redis is unreachable", request.path)  # the outage is logged once
        return web.json_response({"error": "Redis is unreachable; job records cannot be read. Check Redis."},
                                 status=503)


async def list_jobs(request: web.Request) -> web.Response:
    """GET /api/jobs: job summaries, newest first, filtered, a page at a time."""
    query, limit, cursor = parse_list_query(request.query)
    page = await request.app[store_key].list(query, limit, cursor)
    return web.json_response({"jobs": [record.summary() for record in page.records],
                              "next_cursor": page.next_cursor})


async def _job_named(request: web.Request) -> JobRecord:
    """The job the path names; a 404 that says how long records are kept if there is none."""
    job_id = request.match_info["job_id"]
    record = await request.app[store_key].get(job_id) if is_job_id(job_id) else None
    if record is None:
        raise UnknownJob(job_id, request.app[settings_key].job_retention_days)
    return record


async def get_job(request: web.Request) -> web.Response:
    """GET /api/jobs/{id}: the job record, plan, changes and attempts."""
    return web.json_response((await _job_named(request)).model_dump(mode="json"))


async def retry_job(request: web.Request) -> web.Response:
    """POST /api/jobs/{id}/retry: queue a finished job again; it re-reads the portal first."""
    record = await _job_named(request)
    job_id = record.id
    if record.state not in FINAL_STATES:
        raise BadRequest(f"job {job_id} is {record.state.value}; only a finished job can be retried")
    await request.app[queue_key].requeue(record)
    log.info("job %s queued again by an API call", job_id)
    return web.json_response({"job_id": job_id, "state": record.state.value})


async def undo_job_changes(request: web.Request) -> web.Response:
    """POST /api/jobs/{id}/undo: restore the bindings a job changed, when nothing changed them since."""
    job_id = request.match_info["job_id"]
    if not is_job_id(job_id):
        raise BadRequest("a job id is letters and digits")
    days = request.app[settings_key].job_retention_days
    audit = AuditLog(request.app[redis_key], days * 86400)
    try:
        result = await undo_with_rules(job_id, audit, request.app[rules_key].current, request.app[redis_key],
                                       request.app[store_key], days)
    except UndoRefused as exc:
        return web.json_response({"error": str(exc)}, status=409)
    except B24Error as exc:  # the portal refused us or failed: say so, with what to do, not a 500
        return web.json_response({"error": f"undo stopped: the portal answered {exc.method}: {exc.code} "
                                           f"({exc.description}). {exc.hint}".strip()}, status=502)
    log.info("job %s undone by an API call: %d items restored", job_id, len(result.restored))
    record = await request.app[store_key].get(job_id)
    return web.json_response({"state": record.state.value if record else None,
                              "outcome": record.outcome if record else None,
                              "restored": [e.model_dump(mode="json") for e in result.restored],
                              "errors": result.errors}, status=200 if not result.errors else 502)


async def retry_jobs(request: web.Request) -> web.Response:
    """POST /api/jobs/retry?state=failed: replay the dead letters (failed or dead jobs) that match."""
    query, limit, _ = parse_list_query(request.query, default_limit=100, max_limit=MAX_RETRY, cursor=False)
    if query.state not in (JobState.FAILED, JobState.DEAD):
        raise BadRequest("give state=failed or state=dead: only failed jobs are replayed in bulk")
    page = await request.app[store_key].list(query, limit)
    for record in page.records:
        await request.app[queue_key].requeue(record)
    log.info("%d %s jobs queued again by an API call", len(page.records), query.state.value)
    return web.json_response({"retried": len(page.records), "job_ids": [r.id for r in page.records],
                              "more": page.next_cursor is not None})


async def get_stats(request: web.Request) -> web.Response:
    """GET /api/stats: counts per state, the queue, throughput and each portal's request budget."""
    answer = await stats.collect(request.app[redis_key], request.app[store_key], request.app[rules_key].current)
    spool = request.app.get(spool_key)  # events accepted while Redis was away, on this process's disk
    if spool is not None:
        answer["spool"] = spool.status()
    return web.json_response(answer)


async def get_audit(request: web.Request) -> web.Response:
    """GET /api/audit?activity=ID (or comment=ID, or job=ID): the binding changes, newest first."""
    known = ("activity", "comment", "job", "portal", "limit")
    _refuse_unknown(request.query, known)
    params = {name: _single(request.query, name) for name in known}
    audit = AuditLog(request.app[redis_key], request.app[settings_key].job_retention_days * 86400)
    limit = _int(params["limit"], "limit", 1, 200) if params["limit"] else 50
    if params["job"]:
        if not is_job_id(params["job"]):
            raise BadRequest("job must be a job id (letters and digits)")
        entries = (await audit.for_job(params["job"]))[:limit]
    else:
        kind = "comment" if params["comment"] else "activity"
        given = params[kind]
        if not given:
            raise BadRequest("give activity=ID, comment=ID or job=ID")
        item = _int(given, kind, 1, 2**63)
        entries = await audit.for_item(item, kind, params["portal"], limit)
    return web.json_response({"entries": [e.model_dump(mode="json") for e in entries]})


async def get_openapi(request: web.Request) -> web.Response:
    """GET /api/openapi.json: the API's description."""
    return web.json_response(openapi_document())


def parse_list_query(params: Mapping[str, str], *, default_limit: int = 50, max_limit: int = MAX_LIMIT,
                     cursor: bool = True) -> tuple[JobQuery, int, Cursor | None]:
    """Read job filters from query parameters; BadRequest names the parameter and what it takes."""
    _refuse_unknown(params, LIST_PARAMS if cursor else tuple(p for p in LIST_PARAMS if p != "cursor"))
    values = {name: _single(params, name) for name in LIST_PARAMS}
    query = JobQuery(state=_state(values["state"]), portal=_name(values["portal"], "portal"),
                     event=(_name(values["event"], "event") or "").upper() or None,
                     rule=_name(values["rule"], "rule"), trigger=_name(values["trigger"], "trigger"),
                     entity=_int(values["entity"], "entity", 1, 2**63) if values["entity"] else None,
                     lead=_int(values["lead"], "lead", 1, 2**63) if values["lead"] else None,
                     since=_time(values["since"], "since"), until=_time(values["until"], "until"))
    if query.since is not None and query.until is not None and query.since > query.until:
        raise BadRequest("since is after until; give the earlier time as since")
    limit = _int(values["limit"], "limit", 1, max_limit) if values["limit"] else default_limit
    try:
        page_cursor = Cursor.decode(values["cursor"]) if values["cursor"] else None
    except ValueError:
        raise BadRequest("cursor is not one this API gave out; use next_cursor from the previous page") from None
    return query, limit, page_cursor


def _refuse_unknown(params: Mapping[str, str], known: tuple[str, ...]) -> None:
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0][:50]!r}; this call takes: {', '.join(known)}")


def _single(params: Mapping[str, str], name: str) -> str | None:
    values = params.getall(name, []) if hasattr(params, "getall") else [params[name]] if name in params else []
    if len(values) > 1:
        raise BadRequest(f"give {name} once")
    return values[0].strip() if values else None


def _state(text: str | None) -> JobState | None:
    if not text:
        return None
    try:
        return JobState(text.lower())
    except ValueError:
        raise BadRequest(f"state {text[:50]!r} is not a job state; use one of: "
                         f"{', '.join(s.value for s in JobState)}") from None


def _name(text: str | None, name: str) -> str | None:
    if not text:
        return None
    if not _NAME.match(text):
        raise BadRequest(f"{name} must be a name of up to 200 letters, digits and . _ - : @ / +")
    return text


def _int(text: str, name: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, not {text[:50]!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return value


def _time(text: str | None, name: str) -> float | None:
    """Unix seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    if not text:
        return None
    try:
        return float(text) if re.fullmatch(r"\d+(\.\d+)?", text) else _iso(text)
    except ValueError:
        raise BadRequest(f"{name} must be a time: Unix seconds or ISO 8601 like 2026-01-31T12:00:00Z, "
                         f"not {text[:50]!r}") from None


def _iso(text: str) -> float:
    # An unescaped "+02:00" arrives as " 02:00" in a query string.
    moment = datetime.fromisoformat(re.sub(r" (\d\d:?\d\d)$", r"+\1", text.replace("Z", "+00:00")))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
