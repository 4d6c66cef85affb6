"""The OpenAPI 3.1 description of the service's HTTP interface, served at /api/openapi.json.

Written by hand next to the handlers; tests/app/api/test_endpoints.py checks that its paths and methods are
exactly the application's routes, so a new route without a description fails the suite.
"""
from __future__ import annotations

from typing import Any

from app.store.jobs import JobState

_ERROR = {"description": "refused", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_AUTH = {"401": {**_ERROR, "description": "B24_API_TOKEN is set and the request does not carry it"},
         "403": {**_ERROR, "description": "no B24_API_TOKEN is set and the request is not from loopback"}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _param(name: str, description: str, schema: dict[str, Any], where: str = "query",
           required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path", "description": description,
            "schema": schema}


_FILTERS = [
    _param("state", "job state", {"type": "string", "enum": [s.value for s in JobState]}),
    _param("portal", "portal name from the rules file", {"type": "string"}),
    _param("event", "event code, e.g. ONCRMACTIVITYADD (any case)", {"type": "string"}),
    _param("rule", "a rule that matched", {"type": "string"}),
    _param("trigger", "webhook, backfill or retry", {"type": "string"}),
    _param("entity", "the entity id the event was about", {"type": "integer", "minimum": 1}),
    _param("lead", "the lead the job was about: its own events and its activities'",
           {"type": "integer", "minimum": 1}),
    _param("since", "received at or after: Unix seconds or ISO 8601", {"type": "string"}),
    _param("until", "received at or before: Unix seconds or ISO 8601", {"type": "string"}),
]
_JOB_ID = _param("job_id", "the job's id, as the event endpoint answered it", {"type": "string"}, "path")


def _operation(summary: str, responses: dict[str, Any], parameters: list[dict[str, Any]] | None = None,
               auth: bool = True) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {**responses, **(_AUTH if auth else {})}}
    if parameters:
        operation["parameters"] = parameters
    if not auth:
        operation["security"] = []
    return operation


_PATHS: dict[str, dict[str, Any]] = {
    "/bitrix/events": {"post": _operation(
        "A portal's outbound-webhook event (form-encoded as portals send it, or JSON)",
        {"200": _json("queued, a duplicate delivery, or ignored", {"type": "object"}),
         "400": _ERROR, "401": _ERROR, "413": _ERROR, "415": _ERROR, "503": _ERROR}, auth=False)},
    "/api/jobs": {"get": _operation(
        "Job summaries, newest first",
        {"200": _json("a page of jobs", {"$ref": "#/components/schemas/JobPage"}), "400": _ERROR},
        [*_FILTERS, _param("limit", "jobs per page (1-500, default 50)", {"type": "integer"}),
         _param("cursor", "next_cursor of the previous page", {"type": "string"})])},
    "/api/jobs/retry": {"post": _operation(
        "Replay dead letters: queue the failed (or dead) jobs that match again",
        {"200": _json("the jobs queued again", {"type": "object", "properties": {
            "retried": {"type": "integer"}, "job_ids": {"type": "array", "items": {"type": "string"}},
            "more": {"type": "boolean"}}}), "400": _ERROR},
        [{**_FILTERS[0], "required": True, "schema": {"type": "string", "enum": ["failed", "dead"]}}, *_FILTERS[1:],
         _param("limit", "at most this many (1-1000, default 100)", {"type": "integer"})])},
    "/api/jobs/{job_id}": {"get": _operation(
        "One job: plan, changes with bindings before and after, attempts with errors and what to do",
        {"200": _json("the job record", {"$ref": "#/components/schemas/Job"}), "404": _ERROR}, [_JOB_ID])},
    "/api/jobs/{job_id}/retry": {"post": _operation(
        "Queue a finished job again; it re-reads the portal before writing",
        {"200": _json("queued", {"type": "object"}), "400": _ERROR, "404": _ERROR}, [_JOB_ID])},
    "/api/jobs/{job_id}/undo": {"post": _operation(
        "Restore the bindings a job changed, all or nothing; refused when any of them changed since. The job's "
        "state becomes `undone`; its rules apply again on the next event unless the rule is paused",
        {"200": _json("the job's new state and outcome, and the items restored", {"type": "object"}), "400": _ERROR,
         "404": _ERROR, "409": _ERROR,
         "502": _ERROR}, [_JOB_ID])},
    "/api/stats": {"get": _operation(
        "Counts per state, queue depth, oldest queued age, jobs per minute, REST requests and headroom per portal",
        {"200": _json("the numbers", {"type": "object"})})},
    "/api/audit": {"get": _operation(
        "Binding changes of one activity, comment or job, newest first",
        {"200": _json("audit entries", {"type": "object"}), "400": _ERROR},
        [_param("activity", "activity id", {"type": "integer"}), _param("comment", "comment id", {"type": "integer"}),
         _param("job", "job id", {"type": "string"}), _param("portal", "portal name", {"type": "string"}),
         _param("limit", "1-200, default 50", {"type": "integer"})])},
    "/api/stream": {"get": _operation(
        "Server-sent events: `event: job` with a job summary at each transition",
        {"200": {"description": "an event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}}})},
    "/api/openapi.json": {"get": _operation("This document", {"200": _json("OpenAPI 3.1", {"type": "object"})})},
    "/metrics": {"get": _operation(
        "Prometheus metrics", {"200": {"description": "text exposition format",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}}})},
    "/healthz": {"get": _operation("The process is alive", {"200": _json("ok", {"type": "object"})}, auth=False)},
    "/readyz": {"get": _operation("Redis reachable and rules loaded",
                                  {"200": _json("ready, or degraded (spooled events wait to be queued)", {"type": "object"}),
                                   "503": _json("not ready", {"type": "object"})},
                                  auth=False)},
    "/": {"get": _operation("The dashboard (HTML)", {"200": {"description": "the page"}}, auth=False)},
    "/favicon.ico": {"get": _operation("The dashboard's icon (SVG)", {"200": {"description": "the icon"}}, auth=False)},
    "/dashboard/{filename}": {"get": _operation(
        "The dashboard's script, style sheet and icon", {"200": {"description": "a static file"}, "404": _ERROR},
        [_param("filename", "file name", {"type": "string"}, "path")], auth=False)},
}

_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "JobSummary": {"type": "object", "properties": {
        "id": {"type": "string"}, "state": {"type": "string", "enum": [s.value for s in JobState]},
        "portal": {"type": "string"}, "event": {"type": "string"}, "entity_id": {"type": "integer"},
        "trigger": {"type": "string"}, "rules": {"type": "array", "items": {"type": "string"}},
        "received_at": {"type": "number"}, "started_at": {"type": ["number", "null"]},
        "finished_at": {"type": ["number", "null"]}, "outcome": {"type": "string"},
        "attempts": {"type": "integer"}, "requests": {"type": "integer"}, "changes": {"type": "integer"},
        "error": {"type": ["object", "null"]}}},
    "Binding": {"type": "object", "required": ["entity_type", "entity_id"], "properties": {
        "entity_type": {"type": "integer", "description": "as crm.enum.ownertype numbers it: 1 lead, 2 deal, "
                                                          "3 contact, 4 company; others as the portal numbers them"},
        "entity_id": {"type": "integer"}}},
    "ItemBindings": {"type": "object", "description": "one activity's (or timeline comment's) bindings",
                     "required": ["before", "after"], "properties": {
        "activity": {"type": "integer"}, "comment": {"type": "integer"},
        **{key: {"type": "array", "items": {"$ref": "#/components/schemas/Binding"}}
           for key in ("before", "after", "add", "remove")},
        "move": {"type": "array", "items": {"type": "object", "properties": {
            "from": {"$ref": "#/components/schemas/Binding"}, "to": {"$ref": "#/components/schemas/Binding"}}}},
        "status": {"type": "string", "enum": ["changed", "dry_run", "failed", "gone"]},
        "errors": {"type": "array", "items": {"type": "object"}}}},
    "Job": {"type": "object", "properties": {
        "id": {"type": "string"}, "state": {"type": "string", "enum": [s.value for s in JobState]},
        "plan": {"type": "array", "items": {"$ref": "#/components/schemas/ItemBindings"}},
        "changes": {"type": "array", "items": {"$ref": "#/components/schemas/ItemBindings"}},
        "attempts": {"type": "array", "items": {"type": "object"}}}},
    "JobPage": {"type": "object", "properties": {
        "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobSummary"}},
        "next_cursor": {"type": ["string", "null"]}}},
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "b24rebind", "version": "0.1.0",
                 "description": "Re-binds Bitrix24 CRM activities by rules; job status, live updates, audit."},
        "paths": _PATHS,
        "components": {"schemas": _SCHEMAS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "B24_API_TOKEN"}}},
        "security": [{"bearer": []}],
    }
