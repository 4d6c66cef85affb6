"""A spooled line: how an event is written as one, and how one is read back into a job, or found unfit.

Anything may be in a line by the time it is read (a crash mid-write, an edit by hand), so reading it
checks every field a job holds and says why a line cannot become one; the spool quarantines such a
line with that reason (`quarantine_line`) and goes on.
"""
from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Iterator
from typing import IO, Any

import orjson
import pydantic

from app.store.job_record import JobRecord, is_job_id

MAX_LINE = 64 * 1024  # a spooled event is about 300 bytes; a longer line was not written by a spool
LARGEST_ID = 2**63 - 1  # Bitrix24's ids are 64-bit signed integers, and so are Redis's
FIELDS = (
    "job_id",
    "portal",
    "event",
    "entity_id",
    "event_ts",
    "trigger",
    "only_rule",
    "dry_run",
    "received_at",
)


class UnfitLine(ValueError):
    """A spooled line that cannot become a job; the message is the reason, starting with its kind."""


def event_line(record: JobRecord) -> bytes:
    """The job as one JSON line: its fields and its id, never the portal's token."""
    fields = {"job_id": record.id, **{k: v for k, v in record.task_args().items() if k != "job_id"},
              "received_at": record.received_at}
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


def read_lines(file: IO[bytes]) -> Iterator[tuple[int, bytes, str]]:
    """Each line with its number, and why it is unfit when that is known before reading it (too long)."""
    number = 0
    while raw := file.readline(MAX_LINE + 1):
        number += 1
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            while (rest := file.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                pass
            yield number, raw[:1024], f"size: the line is over {MAX_LINE // 1024} KiB (its first KiB is kept)"
            continue
        yield number, raw, ""


def _no_constant(name: str) -> float:
    raise UnfitLine(f"range: {name} is not a number a job can hold")


def record_of(raw: bytes) -> JobRecord:
    """The job a spooled line holds; UnfitLine, with the reason, for one that holds none."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnfitLine(f"text: the line is not UTF-8 (byte {exc.start})") from None
    try:
        entry = json.loads(text, parse_constant=_no_constant)
    except UnfitLine:
        raise
    except (ValueError, RecursionError) as exc:
        raise UnfitLine(f"JSON: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("job_id"), str):
        raise UnfitLine("types: not a spooled event (no job_id)")
    _check_text(entry)
    if isinstance(entry.get("entity_id"), bool) or isinstance(entry.get("received_at"), bool):
        raise UnfitLine("types: entity_id and received_at are numbers, not true or false")
    if not is_job_id(entry["job_id"]):
        raise UnfitLine("types: job_id is not a job id (letters and digits, at most 64)")
    try:
        record = JobRecord.model_validate({"id": entry["job_id"], **{k: entry[k] for k in FIELDS[1:] if k in entry}})
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "the line"
        raise UnfitLine(f"types: {where}: {error['msg']}") from None
    if not 0 < record.entity_id <= LARGEST_ID:
        raise UnfitLine(f"range: entity_id {str(record.entity_id)[:40]} is not a positive 64-bit id")
    if not (math.isfinite(record.received_at) and record.received_at >= 0):
        raise UnfitLine(f"range: received_at {record.received_at!r} is not a time")
    try:  # what the queue will write: a value no serializer takes is unfit here, not a failure in Redis
        orjson.dumps(record.task_args())
        record.model_dump_json()
    except (TypeError, ValueError) as exc:
        raise UnfitLine(f"types: cannot be stored ({str(exc)[:160]})") from None
    return record


def _check_text(entry: dict[str, Any]) -> None:
    """Text Redis and every reader can take: UTF-8, so no lone surrogate (JSON lets "\\ud800" through).
    A loop, not recursion: a hostile line nests deep."""
    stack: list[tuple[str, object]] = [("", entry)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise UnfitLine(f"text: {where or 'a field'} holds a lone surrogate, which is not text") from None
        elif isinstance(value, dict):
            for key, item in value.items():
                stack += [(where, key), (f"{where}.{key}" if where else str(key), item)]
        elif isinstance(value, list):
            stack += [(where, item) for item in value]


def quarantine_line(segment: str, number: int, raw: bytes, why: str) -> bytes:
    """One JSON line: where the line was, why it is here, and the line itself (as text when it is UTF-8)."""
    entry: dict[str, object] = {"segment": segment, "line": number, "reason": why,
                                "quarantined_at": round(time.time(), 3)}
    try:
        entry["text"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        entry["base64"] = base64.b64encode(raw).decode()
    return orjson.dumps(entry) + b"\n"
