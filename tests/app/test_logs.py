"""Log lines: JSON off a terminal, the job id on every line a job writes, secrets masked."""
from __future__ import annotations

import asyncio
import json
import logging

from app.logs import JobContext, JsonFormatter, SecretMask, current_job


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
