"""The one table of how a job's attempt ends (workers/outcomes.py): each kind of failure, what the job's
record says and what arq is told. The jobs that end each way run for real in test_runner and test_end_to_end."""
from __future__ import annotations

import asyncio
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.bitrix.errors import ConfigError, MethodBlocked, PermanentError, RateLimited, TransientError
from app.bitrix.guard import NotHeld
from app.rebind.locks import Busy
from app.rebind.reading import Echo, Gone
from app.store.jobs import JobState
from workers.outcomes import AFTER_REDIS_FAILED, ENDINGS, LOCK_WAIT, Attempt, Then, ending_of

RUNNING = Attempt(job_timeout=300.0, timed_out=False)


def test_no_row_is_hidden_behind_an_earlier_one() -> None:
    """The first matching row decides, so a class listed after one of its parents would never be read."""
    hidden = [(later.__name__, earlier.__name__) for i, (later, _) in enumerate(ENDINGS)
              for earlier, _ in ENDINGS[:i] if issubclass(later, earlier)]
    assert hidden == []


def test_the_portals_answers_end_as_its_error_table_sorts_them() -> None:
    transient = ending_of(TransientError("batch", "INTERNAL_SERVER_ERROR", "boom", status=500), RUNNING)
    limited = ending_of(RateLimited("batch", "QUERY_LIMIT_EXCEEDED", "too many"), RUNNING)
    config = ending_of(ConfigError("batch", "NO_AUTH_FOUND", "no auth"), RUNNING)
    refused = ending_of(PermanentError("crm.activity.binding.add", "ACCESS_DENIED", "denied"), RUNNING)
    assert transient and limited and config and refused
    assert (transient.then, transient.text, transient.error and transient.error["code"]) == \
        (Then.BACK_OFF, "gave up after retries", "INTERNAL_SERVER_ERROR")
    assert limited.then is Then.BACK_OFF
    assert (config.then, config.state, config.text) == \
        (Then.END, JobState.FAILED, "the service's access to the portal needs fixing")
    assert (refused.then, refused.state, refused.error and refused.error["code"]) == \
        (Then.END, JobState.FAILED, "ACCESS_DENIED")


def test_waiting_for_a_budget_or_a_lead_uses_up_no_retry() -> None:
    blocked = ending_of(MethodBlocked("crm.activity.list", "OPERATION_TIME_LIMIT", "slow",
                                      retry_at=time.time() + 30), RUNNING)
    busy = ending_of(Busy("lead 7 is being worked on"), RUNNING)
    assert blocked and busy
    assert (blocked.then, blocked.attempt_outcome) == (Then.WAIT, "deferred") and 28 <= blocked.wait <= 30
    assert (busy.then, busy.attempt_outcome, busy.wait, busy.error) == (Then.WAIT, "deferred", LOCK_WAIT, None)


def test_a_lost_lock_asks_whether_another_run_has_the_job() -> None:
    ending = ending_of(NotHeld("the lock on lead 7 lapsed"), RUNNING)
    assert ending and ending.superseded_check and ending.then is Then.WAIT
    assert ending.error and ending.error["code"] == "LOCK_LOST"


def test_a_deleted_record_or_an_echo_is_nothing_to_do() -> None:
    gone, echo = ending_of(Gone("lead 7 was deleted", "lead"), RUNNING), ending_of(Echo("our own write"), RUNNING)
    assert gone and echo
    assert (gone.then, gone.state, gone.ask_crm_mode) == (Then.END, JobState.SKIPPED, True)
    assert (echo.then, echo.state, echo.ask_crm_mode, echo.text) == (Then.END, JobState.SKIPPED, False, "our own write")


def test_redis_away_runs_the_job_again_and_a_bug_backs_off_with_its_traceback() -> None:
    for exc in (RedisConnectionError("gone"), RedisTimeoutError("slow")):
        ending = ending_of(exc, RUNNING)
        assert ending and (ending.then, ending.wait, ending.crashed) == (Then.WAIT, AFTER_REDIS_FAILED, False)
    bug = ending_of(KeyError("x"), RUNNING)
    assert bug and (bug.then, bug.crashed) == (Then.BACK_OFF, True)
    assert bug.error and bug.error["code"] == "INTERNAL_ERROR"


def test_only_the_jobs_own_deadline_is_a_job_timeout() -> None:
    own = ending_of(TimeoutError(), Attempt(job_timeout=300.0, timed_out=True))
    libraries = ending_of(TimeoutError(), RUNNING)
    assert own and own.error and own.error["code"] == "JOB_TIMEOUT" and "300 s" in own.error["description"]
    assert libraries and libraries.crashed


def test_a_stopping_worker_passes_the_cancellation_on_and_what_is_no_jobs_is_left_alone() -> None:
    stopping = ending_of(asyncio.CancelledError(), RUNNING)
    assert stopping and (stopping.then, stopping.attempt_outcome) == (Then.STOP, "interrupted")
    assert ending_of(KeyboardInterrupt(), RUNNING) is None
