"""Logging for every process: plain lines on a terminal, JSON lines elsewhere, secrets masked."""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from contextvars import ContextVar

import orjson

from app.queue import SWEEP_CRON

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
    worker, mostly to find it closed. A sweep that runs logs its own line; warnings and errors stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        # arq's per-job lines: "  1.00s → <job>()", "  0.00s ← <job> ● <result>"
        message = record.getMessage()
        return SWEEP_CRON not in message or not ("→" in message or "←" in message)


def mask(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


class TerminalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return f"{line} [job {record.job_id}]" if getattr(record, "job_id", None) else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if getattr(record, "job_id", None):
            entry["job_id"] = record.job_id
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
