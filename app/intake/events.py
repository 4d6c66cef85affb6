"""Outbound-webhook events as a portal posts them, parsed without trusting any of it."""
from __future__ import annotations

import itertools
import json
import re
from typing import Any

from pydantic import BaseModel

from app.bitrix.query import parse_php_query, parse_query_pairs

MAX_FIELDS = 200  # a real event has about ten; more is an attack or a mistake
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


class BadEvent(ValueError):
    """The body is not an event a portal would send; the message says what is wrong."""


class PortalEvent(BaseModel):
    name: str
    entity_id: int
    ts: str
    handler_id: str
    domain: str
    member_id: str
    application_token: str

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> PortalEvent:
        auth = data.get("auth")
        fields = (data.get("data") or {}).get("FIELDS") if isinstance(data.get("data"), dict) else None
        if not isinstance(auth, dict):
            raise BadEvent("missing 'auth' (auth[domain], auth[application_token]); is this a Bitrix24 event?")
        event = _text(data, "event")
        if not event.isascii() or not event.replace("_", "").isalnum():
            raise BadEvent("'event' must be an event code such as ONCRMACTIVITYADD")
        if not isinstance(fields, dict):
            raise BadEvent("missing 'data[FIELDS][ID]': the id of the record the event is about")
        entity = _text(fields, "ID", "data[FIELDS][ID]")
        # isascii(): isdigit() passes "¹", which int() refuses
        if not (entity.isascii() and entity.isdigit()) or len(entity) > 18 or int(entity) == 0:
            raise BadEvent("'data[FIELDS][ID]' must be a positive whole number")
        ts = str(data.get("ts", ""))[:20]
        return cls(name=event.upper(), entity_id=int(entity), ts=ts if ts.isascii() and ts.isdigit() else "",
                   handler_id=str(data.get("event_handler_id", ""))[:20],
                   domain=_text(auth, "domain", "auth[domain]").lower(),
                   member_id=str(auth.get("member_id", ""))[:64],
                   application_token=_text(auth, "application_token", "auth[application_token]"))


NUL_FIELD = "a field name or value holds a NUL byte (%00 or a raw NUL), which no portal's event has"


def decode_body(content_type: str, body: bytes) -> dict[str, Any]:
    if b"\0" in body:  # the form parser splits on NUL: a raw one would shift every field after it
        raise BadEvent(NUL_FIELD)
    data = _decode(content_type, body)
    if _holds_nul(data):
        raise BadEvent(NUL_FIELD)
    try:  # a JSON "\ud800" (or a form's escaped equivalent) is text no one can store, log or compare
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadEvent("a field holds a lone surrogate (such as \\ud800), which is not text") from None
    return data


def _decode(content_type: str, body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadEvent("the body is not UTF-8 text") from None
    if content_type == FORM:
        try:
            pairs = parse_query_pairs(text, max_fields=MAX_FIELDS)
        except ValueError:
            raise BadEvent(f"more than {MAX_FIELDS} fields; a portal's event has about ten") from None
        try:
            return parse_php_query(pairs)
        except ValueError as exc:
            raise BadEvent(str(exc)) from None
    if content_type == JSON:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise BadEvent("the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise BadEvent("the JSON body must be an object")
        return data
    raise BadEvent(f"unsupported content type; send {FORM} (as portals do) or {JSON}")


def _text(data: dict[str, Any], key: str, label: str | None = None) -> str:
    value = data.get(key)
    if not isinstance(value, (str, int)) or str(value).strip() == "":
        raise BadEvent(f"missing '{label or key}'")
    return str(value).strip()


def _holds_nul(data: object) -> bool:
    """Whether any key or text in the decoded body holds NUL; a loop, not recursion: JSON nests deep."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if "\0" in value:
                return True
        elif isinstance(value, dict):
            stack += value.keys()
            stack += value.values()
        elif isinstance(value, list):
            stack += value
    return False
_SECRET = re.compile("token|secret|password", re.IGNORECASE)  # auth[application_token], auth[access_token], ...
PAYLOAD_DEPTH = 6
PAYLOAD_TEXT = 500


def masked_payload(data: Any, depth: int = 0) -> Any:
    """The event as the portal sent it, for people to read in the job's detail: every token and secret
    (and an `auth` that is not a block of fields) replaced by "***" before it is stored anywhere.
    On intake's path: about 5 µs for a portal's event (decoding it costs 28)."""
    if isinstance(data, dict):
        if depth >= PAYLOAD_DEPTH:
            return "…"
        masked = {}
        for key, value in itertools.islice(data.items(), MAX_FIELDS):
            name = key if isinstance(key, str) and len(key) <= 100 else str(key)[:100]
            if _SECRET.search(name) or (name == "auth" and not isinstance(value, dict)):
                masked[name] = "***"
            elif isinstance(value, str):
                masked[name] = value if len(value) <= PAYLOAD_TEXT else value[:PAYLOAD_TEXT]
            else:
                masked[name] = masked_payload(value, depth + 1)
        return masked
    if isinstance(data, str):
        return data[:PAYLOAD_TEXT]
    if isinstance(data, list):
        return [masked_payload(value, depth + 1) for value in data[:MAX_FIELDS]] if depth < PAYLOAD_DEPTH else "…"
    return data if isinstance(data, (int, float, bool)) or data is None else str(data)[:PAYLOAD_TEXT]
