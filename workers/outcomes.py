"""What an attempt of a job ended as, in one table: done, nothing to do, retry later, failed with a code,
or wait (for a lead's lock or a method's time budget).

An attempt that raised is looked up in `ENDINGS` by the exception's class (the first row that matches,
so a subclass comes before its parent); an attempt that carried its plan out is read from the items'
outcomes (`from_plan`). The portal's own codes are sorted into retry, give up or fix the configuration
by `app/bitrix/errors.py` first: this table says what each of those means for the job. It lives with
the workers because it names what the layers below raise (reading, locks, the session, Redis).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from redis.exceptions import RedisError

from app.bitrix.errors import B24Error, ConfigError, MethodBlocked, TransientError
from app.bitrix.guard import NotHeld
from app.rebind.locks import Busy
from app.rebind.reading import Echo, Gone
from app.store.jobs import JobState
from app.words import plural

LOCK_WAIT = 2.0  # seconds; the job holding the lead usually ends within that
AFTER_REDIS_FAILED = 5.0  # seconds before a job Redis failed runs again (and finds done what it did)


class Then(Enum):
    END = "end"  # the attempt's state stands
    BACK_OFF = "back_off"  # run again after the job's next retry delay, or dead past the last one
    WAIT = "wait"  # run again after `wait` seconds; waiting is not failing, so no retry is used up
    STOP = "stop"  # the worker is stopping: the job stays queued and the cancellation goes on


@dataclass(frozen=True)
class Ending:
    then: Then
    state: JobState
    text: str
    error: dict[str, Any] | None = None
    wait: float = 0.0
    attempt_outcome: str | None = None
    crashed: bool = False  # a bug: the worker logs its traceback
    superseded_check: bool = False  # ask whether another run has the job now (its record is not ours then)
    ask_crm_mode: bool = False  # a lead that cannot be read may be a portal in simple CRM mode


@dataclass(frozen=True)
class Attempt:
    """What a row needs to know besides the exception."""
    job_timeout: float
    timed_out: bool  # the job's own deadline expired (not some library's timeout)


def _crashed(exc: BaseException, _: Attempt) -> Ending:
    return Ending(Then.BACK_OFF, JobState.RETRYING, "crashed", {
        "code": "INTERNAL_ERROR", "description": type(exc).__name__,
        "what_to_do": "a bug in b24rebind or a Redis failure; see the worker's log"}, crashed=True)


def _stopping(_: BaseException, __: Attempt) -> Ending:
    return Ending(Then.STOP, JobState.RETRYING, "interrupted: the worker stopped; the job will run again",
                  attempt_outcome="interrupted")


def _timed_out(exc: BaseException, attempt: Attempt) -> Ending:
    if not attempt.timed_out:  # not the job's own limit: some library's, unhandled
        return _crashed(exc, attempt)
    return Ending(Then.BACK_OFF, JobState.RETRYING, "ran past its time limit every time", {
        "code": "JOB_TIMEOUT", "description": f"the job ran longer than {attempt.job_timeout:g} s",
        "what_to_do": "it runs again and continues where it stopped; if it never finishes, check how "
                      "fast the portal answers and how many activities the lead has"})


def _lock_lost(exc: BaseException, _: Attempt) -> Ending:
    return Ending(Then.WAIT, JobState.RETRYING, f"interrupted: {exc}; the job will run again", {
        "code": "LOCK_LOST", "description": str(exc),
        "what_to_do": "nothing: it runs again and finds what is left to do"}, wait=LOCK_WAIT,
        attempt_outcome="interrupted", superseded_check=True)


def _lead_busy(exc: BaseException, _: Attempt) -> Ending:
    return Ending(Then.WAIT, JobState.RETRYING, f"waiting {LOCK_WAIT:.0f} s: {exc}", wait=LOCK_WAIT,
                  attempt_outcome="deferred")


def _method_blocked(exc: BaseException, _: Attempt) -> Ending:
    assert isinstance(exc, MethodBlocked)
    wait = max(1.0, (exc.retry_at or 0) - time.time())
    return Ending(Then.WAIT, JobState.RETRYING, f"waiting {wait:.0f} s: {exc}", exc.as_record(), wait=wait,
                  attempt_outcome="deferred")


def _portal(then: Then, state: JobState, text: str) -> Callable[[BaseException, Attempt], Ending]:
    def ending(exc: BaseException, _: Attempt) -> Ending:
        assert isinstance(exc, B24Error)
        return Ending(then, state, text, exc.as_record())
    return ending


def _skipped(exc: BaseException, _: Attempt) -> Ending:
    return Ending(Then.END, JobState.SKIPPED, str(exc), ask_crm_mode=isinstance(exc, Gone))


def _redis_away(exc: BaseException, _: Attempt) -> Ending:
    # Redis is away (the worker says so once): the job runs again once it is back.
    return Ending(Then.WAIT, JobState.RETRYING, f"interrupted: Redis unreachable ({type(exc).__name__}); the job "
                  "will run again", wait=AFTER_REDIS_FAILED, attempt_outcome="interrupted")


# Most specific first: the first row whose class the exception is an instance of decides.
ENDINGS: tuple[tuple[type[BaseException], Callable[[BaseException, Attempt], Ending]], ...] = (
    (asyncio.CancelledError, _stopping),
    (TimeoutError, _timed_out),
    (NotHeld, _lock_lost),
    (Busy, _lead_busy),
    (MethodBlocked, _method_blocked),  # before TransientError, its parent
    (TransientError, _portal(Then.BACK_OFF, JobState.RETRYING, "gave up after retries")),
    (Gone, _skipped),
    (Echo, _skipped),
    (ConfigError, _portal(Then.END, JobState.FAILED, "the service's access to the portal needs fixing")),
    (B24Error, _portal(Then.END, JobState.FAILED, "the portal refused")),
    (RedisError, _redis_away),
    (Exception, _crashed),  # a bug: recorded on the job, and retried like a 5xx
)


def ending_of(exc: BaseException, attempt: Attempt) -> Ending | None:
    """How an attempt that raised `exc` ends; None for what is no job's business (KeyboardInterrupt)."""
    return next((row(exc, attempt) for cls, row in ENDINGS if isinstance(exc, cls)), None)


def from_plan(outcomes: list[Any], gone: str) -> tuple[JobState, str, dict[str, Any] | None]:
    """An attempt that carried its plan out: succeeded, skipped (everything deleted since read) or failed
    (with the first failed item's error)."""
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        first = failed[0].errors[0] if failed[0].errors else None
        return JobState.FAILED, gone + f"{len(failed)} of {plural(len(outcomes), 'item')} could not be changed", \
            first
    changed = sum(o.status == "changed" for o in outcomes)
    dry = sum(o.status == "dry_run" for o in outcomes)
    deleted = sum(o.status == "gone" for o in outcomes)
    kept = sum(o.status == "kept" for o in outcomes)
    done = f"re-bound {plural(changed, 'item')}" if changed or not (dry or deleted) else ""
    would = f"dry run: would re-bind {plural(dry, 'item')}" + ("" if changed else ", wrote nothing") if dry else ""
    left = f"{plural(deleted, 'item')} deleted since read: nothing to do for {'it' if deleted == 1 else 'them'}" \
        if deleted else ""
    full = f"{plural(kept, 'item')} kept as found: the plan would pass 100 bindings" if kept else ""
    state = JobState.SKIPPED if deleted and not changed and not dry else JobState.SUCCEEDED
    return state, gone + "; ".join(part for part in (done, would, left, full) if part), None


def nothing_to_do(plan: Any, activities: tuple[Any, ...]) -> str:
    """Why a plan that changes nothing is empty."""
    if not activities:
        return "no activities to look at"
    if not plan.matched_rules:
        return "no rule matched"
    notes = [note for a in plan.activities for note in a.notes]
    return notes[0] if notes else "bindings already as the rules want them"
