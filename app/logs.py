"""Logging for every process: plain lines on a terminal, JSON lines elsewhere, secrets masked."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterable
from contextvars import ContextVar

import orjson
from aiohttp.http_exceptions import HttpProcessingError

from app.store.queue import PROCESS_EVENT, RESCUE_CRON, SWEEP_CRON

MASK = "***"
# The job a log line belongs to; arq runs each job in its own task, so each sees its own value.
current_job: ContextVar[str | None] = ContextVar("current_job", default=None)


class JobContext(logging.Filter):
    """Puts the current job's id on every log line written while it runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = current_job.get()
        return True


class SecretMask(logging.Filter):
    """A safety net: whatever a message holds, known secret values leave it as ***."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        # The masked text replaces the template and its arguments, so no later step formats it again.
        record.msg, record.args = mask(record.getMessage(), self.secrets), None
        return True


class QuietSweepTicks(logging.Filter):
    """Drops arq's two INFO lines for each look the reconcile cron takes at its gate: every 10 s, per
    worker, mostly to find it closed; and for the minute's look for stranded jobs. A sweep that runs,
    and a stranded job found, log their own lines; warnings and errors stay. An event job logs one
    line of its own when it ends (what it did, or why not): arq's start, end and retry lines for it go."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        # arq's per-job lines: "  1.00s → <job>()", "  0.00s ← <job> ● <result>"
        message = record.getMessage()
        if ":" + PROCESS_EVENT + "(" in message or ":" + PROCESS_EVENT + " " in message:
            return not ("→" in message or "←" in message or "↻" in message)
        return (SWEEP_CRON not in message and RESCUE_CRON not in message) or not ("→" in message or "←" in message)


class Throttled:
    """Writes each kind of line at most once every `every` seconds, and says how many it held back.

    For lines that anyone on the network can cause once per request (a forged token, a foreign
    address): a flood of them would fill the log and, at ~50 µs a line in a busy web process, slow
    intake down. Kinds are fixed strings chosen by the caller, never the request's data, so the
    state stays a few entries.
    """

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self._logger = logger
        self._every = every
        self._kinds: dict[str, tuple[float, int]] = {}  # kind -> (when last written, held back since)

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        written, held = self._kinds.get(kind, (-math.inf, 0))
        if now - written < self._every:
            self._kinds[kind] = (written, held + 1)
            return
        self._kinds[kind] = (now, 0)
        if held:
            message += " (and %d more like it in the last %.0f s)"
            args = (*args, held, now - written)
        self._logger.warning(message, *args)


class QuietBadRequests(logging.Filter):
    """aiohttp logs every malformed request (oversized or too many headers, broken HTTP) with a
    traceback, and anyone can send one a request: here one line, at most one every 10 s, with a count
    of the rest. Errors in the service's own handlers keep their traceback."""

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self._every = every
        self._written, self._held = -math.inf, 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        now = time.monotonic()
        if now - self._written < self._every:
            self._held += 1
            return False
        held, self._held, self._written = self._held, 0, now
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg = "refused a malformed request from %s: %s" + (" (and %d more like it)" if held else "")
        record.args = (remote, str(error.message)[:200], *((held,) if held else ()))
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True

    @classmethod
    def install(cls) -> None:
        server = logging.getLogger("aiohttp.server")
        if not any(isinstance(f, cls) for f in server.filters):
            server.addFilter(cls())


def mask(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


class TerminalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job_id = getattr(record, "job_id", None)
        return f"{line} [job {job_id}]" if job_id else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if job_id := getattr(record, "job_id", None):
            entry["job_id"] = job_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(entry).decode()
        except orjson.JSONEncodeError:  # a lone surrogate, from a JSON body's "\ud800": json escapes it
            return json.dumps(entry)


def configure(level: str, secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(TerminalFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    else:
        handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretMask(secrets))
    handler.addFilter(JobContext())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel("WARNING")
    arq_log = logging.getLogger("arq.worker")
    arq_log.filters[:] = [f for f in arq_log.filters if not isinstance(f, QuietSweepTicks)]
    arq_log.addFilter(QuietSweepTicks())
