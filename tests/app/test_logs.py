"""Log lines: JSON off a terminal, the job id on every line a job writes, secrets masked."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest

from app.logs import JobContext, JsonFormatter, SecretMask, configure, current_job


def test_each_job_task_logs_its_own_id_and_secrets_never_pass() -> None:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretMask(["s3cretcode"]))
    handler.addFilter(JobContext())
    log = logging.getLogger("test.jobs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    async def job(job_id: str) -> None:
        current_job.set(job_id)
        await asyncio.sleep(0)
        log.info("calling https://x.bitrix24.com/rest/1/%s/batch", "s3cretcode")

    async def both() -> None:
        await asyncio.gather(job("job-a"), job("job-b"))

    try:
        asyncio.run(both())
    finally:
        log.removeHandler(handler)

    entries = [json.loads(line) for line in lines]
    assert sorted(entry["job_id"] for entry in entries) == ["job-a", "job-b"]
    assert all("s3cretcode" not in line for line in lines)
    assert "rest/1/***/batch" in entries[0]["message"]


def test_the_crons_idle_ticks_and_arqs_lines_for_event_jobs_stay_out_of_the_log_but_failures_do_not(
        capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    arq_log = logging.getLogger("arq.worker")
    configure("INFO")
    try:
        arq_log.info("%6.2fs → %s()%s", 1.0, "cron:reconcile_job", "")
        arq_log.info("%6.2fs ← %s ● %s", 0.0, "cron:reconcile_job", 0)
        arq_log.info("Starting worker for 2 functions: process_event, cron:reconcile_job")
        arq_log.error("%6.2fs ! %s failed, %s: %s", 0.1, "cron:reconcile_job", "RedisError", "down")
        # An event job logs its own line when it ends: arq's lines for it would say it twice.
        arq_log.info("%6.2fs → %s(%s)%s", 0.0, "f00d:process_event", "{'job_id': 'f00d'}", "")
        arq_log.info("%6.2fs ↻ %s retrying job in %0.2fs", 0.1, "f00d:process_event", 2.0)
        arq_log.info("%6.2fs ← %s ● %s", 0.1, "f00d:process_event", "'succeeded'")
        arq_log.warning("%6.2fs ! %s max retries %d exceeded", 0.0, "f00d:process_event", 200)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        arq_log.filters.clear()

    logged = [json.loads(line)["message"] for line in capsys.readouterr().err.splitlines()]
    assert logged == ["Starting worker for 2 functions: process_event, cron:reconcile_job",
                      "  0.10s ! cron:reconcile_job failed, RedisError: down",
                      "  0.00s ! f00d:process_event max retries 200 exceeded"]


def test_a_message_no_fast_encoder_takes_still_becomes_one_json_line() -> None:
    # A JSON body can carry a lone surrogate ("\ud800") into a refusal's log line.
    record = logging.LogRecord("app.intake.webhook", logging.WARNING, __file__, 1, "refused an event from %s",
                               ("evil\ud800.bitrix24.com",), None)
    SecretMask([]).filter(record)

    entry = json.loads(JsonFormatter().format(record))

    assert entry["message"] == "refused an event from evil\ud800.bitrix24.com"
    assert entry["level"] == "WARNING" and entry["logger"] == "app.intake.webhook"
