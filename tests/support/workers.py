"""Running a worker's jobs one at a time, as a poll would, for the runner's and the turns' tests."""
from __future__ import annotations

from arq import Worker


async def started(worker: Worker) -> Worker:
    """A worker ready to run jobs handed to it directly, as `main` makes it before polling."""
    worker.ctx["redis"] = worker.pool
    assert worker.on_startup is not None
    await worker.on_startup(worker.ctx)
    return worker


async def run_one(worker: Worker, job_id: str) -> None:
    """Claim and run one queued job, as a poll would."""
    await worker.start_jobs([job_id.encode()])
    await worker.tasks[job_id]
