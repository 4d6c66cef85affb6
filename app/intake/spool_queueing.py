"""Queueing a spooled job, and telling Redis refusing one value from Redis refusing every write.

The difference decides a line's fate: a value Redis refuses is the line's fault, and it is quarantined;
a Redis that refuses every write for now (out of memory, a read-only replica) or is away blames no line,
and the drain stops with everything not yet queued still on disk.
"""
from __future__ import annotations

from typing import Any

from arq.constants import in_progress_key_prefix, job_key_prefix
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    ExecAbortError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.intake.spool_lines import UnfitLine
from app.store.job_record import JobRecord, JobState
from app.store.outage import describe
from app.store.queue import JobQueue

# Redis's answers that refuse every write for now, whatever the value: the drain waits, no line is to blame.
REFUSES_EVERY_WRITE = ("OOM", "READONLY", "MISCONF", "BUSY", "MASTERDOWN", "NOREPLICAS", "LOADING", "NOPERM",
                       "NOAUTH", "WRONGPASS", "CLUSTERDOWN", "TRYAGAIN", "UNBLOCKED", "NOSCRIPT")


class RedisUnreachable(Exception):
    """Redis dropped mid-drain: what is not yet queued stays on disk."""


class RedisRefuses(Exception):
    """Redis answers every write with an error for now (out of memory, read-only): no line is to blame."""


async def queue_once(queue: JobQueue, redis: Any, record: JobRecord) -> int:
    """Queue the job unless it is queued already; UnfitLine when Redis refuses this value (not every write)."""
    try:
        if await queue.submit(record):
            return 1
        # The record exists: queued before, or created just before Redis went away and never enqueued.
        stored = await queue.store.get(record.id)
        if (
            stored is not None
            and stored.state == JobState.QUEUED
            and not await redis.exists(job_key_prefix + record.id, in_progress_key_prefix + record.id)
        ):
            await queue.requeue(stored)
            return 1
        return 0
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise RedisUnreachable(describe(exc)) from exc
    except RedisError as exc:
        if _refuses_every_write(exc):
            raise RedisRefuses(_refusal(exc)) from exc
        raise UnfitLine(f"Redis refused it: {describe(exc)}") from None
    except (TypeError, ValueError) as exc:  # the client could not encode it (a value record_of let through)
        raise UnfitLine(f"types: cannot be sent to Redis ({describe(exc)})") from None


def _refuses_every_write(exc: RedisError) -> bool:
    """An answer about Redis's state, not about the value: redis-py names the usual ones by class (and
    takes the code off the text); others, and those from inside a script, keep their code in the text."""
    if isinstance(exc, (OutOfMemoryError, ReadOnlyError, NoPermissionError, NoScriptError, ExecAbortError)):
        return True
    words = set(str(exc).replace(":", " ").replace("-", " ").split())
    return bool(words & set(REFUSES_EVERY_WRITE))


def _refusal(exc: RedisError) -> str:
    """What Redis said, from its code on (a script's error puts it after the script's name)."""
    text = " ".join(str(exc).split())
    found = [i for code in REFUSES_EVERY_WRITE if (i := text.find(code)) >= 0]
    return text[min(found):][:200] if found else describe(exc)
