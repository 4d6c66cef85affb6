"""Workers of a shard: each runs its shard's portals' jobs only, so a portal's jobs all run in one process."""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.portal_config import PortalConfig
from app.rules.model import RuleSet
from app.store.jobs import FINAL_STATES, JobRecord, JobState, JobStore
from app.store.queue import JobQueue, live_queue, shard_of, use_shards
from tests.conftest import DEFAULT_RULES, TOKEN
from tests.support.processes import WorkerProcess, b24rebind
from tests.support.waiting import until

# With two shards "acme" is shard 0 and "beta" shard 1; with four, beta is shard 3 (3 % 2 == 1).
assert (shard_of("acme", 2), shard_of("beta", 2), shard_of("beta", 4)) == (0, 1, 3)


@pytest.fixture
def two_shards() -> Iterator[None]:
    use_shards(2)
    yield
    use_shards(1)


def e_mail_on_a_converted_lead(portal: FakePortal) -> tuple[int, list[tuple[int, int]]]:
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    return portal.add_activity([(LEAD, lead)]), [(CONTACT, int(made["contact"] or 0)), (COMPANY, int(made["company"] or 0))]


async def test_a_worker_of_shard_k_runs_only_shard_k_s_jobs(two_shards: None, make_worker: Any, rules: RuleSet,
                                                            portal_config: PortalConfig, portal: FakePortal,
                                                            redis: ArqRedis) -> None:
    beta = portal_config.model_copy(update={"name": "beta", "domain": "beta.bitrix24.com"})
    both = rules.model_copy(update={"portals": {"acme": portal_config, "beta": beta}})
    store = JobStore(redis, 3600)
    queue = JobQueue(redis, store)
    jobs: dict[str, list[str]] = {"acme": [], "beta": []}
    for name in jobs:
        for n in range(3):
            activity, _ = e_mail_on_a_converted_lead(portal)
            record = JobRecord.for_event(name, "ONCRMACTIVITYADD", activity, str(n))
            assert await queue.submit(record)
            jobs[name].append(record.id)

    await make_worker(both, queue_name=live_queue(1)).async_run()  # burst: until shard 1's queue is empty

    assert [(await store.get(i)).state for i in jobs["beta"]] == [JobState.SUCCEEDED] * 3  # type: ignore[union-attr]
    assert [(await store.get(i)).state for i in jobs["acme"]] == [JobState.QUEUED] * 3  # type: ignore[union-attr]
    assert all([await redis.zscore(live_queue(0), i) is not None for i in jobs["acme"]])  # still waiting for shard 0


def test_a_worker_with_shards_but_no_shard_named_refuses_to_start_saying_what_to_do(tmp_path: Path) -> None:
    missing = b24rebind("worker", cwd=tmp_path, env={"B24_WORKER_SHARDS": "2"})
    assert missing.returncode != 0 and "--shard K" in missing.stderr and "Traceback" not in missing.stderr
    beyond = b24rebind("worker", "--shard", "2", cwd=tmp_path, env={"B24_WORKER_SHARDS": "2"})
    assert beyond.returncode != 0 and "shards are 0 to 1" in beyond.stderr and "Traceback" not in beyond.stderr


def two_portals_rules(path: Path, acme: FakePortal, beta: FakePortal) -> Path:
    portals = "".join(f"""
  {name}:
    domain: {name}.bitrix24.com
    rest_url: {fake.rest_url}
    application_token: {TOKEN}
    rate_limit: {{per_second: 1000, burst: 1000}}""" for name, fake in (("acme", acme), ("beta", beta)))
    path.write_text(f"portals:{portals}\n{DEFAULT_RULES}")
    return path


def jobs_run_by(process: WorkerProcess) -> set[str]:
    return set(re.findall(r"job (\w+) succeeded", process.log.read_text()))


@pytest.mark.slow  # real processes
async def test_two_worker_processes_of_two_shards_each_run_all_of_one_portal_s_jobs(
        redis: ArqRedis, redis_url: str, portal: FakePortal, tmp_path: Path) -> None:
    beta_portal = FakePortal(webhook_code="betacode", per_second=None)
    await beta_portal.start()
    store = JobStore(redis, 3600)
    queue = JobQueue(redis, store)
    jobs: dict[str, list[str]] = {"acme": [], "beta": []}
    wanted: list[tuple[FakePortal, int, list[tuple[int, int]]]] = []

    async def queue_e_mails(name: str, fake: FakePortal, count: int, tag: str) -> None:
        for n in range(count):
            activity, want = e_mail_on_a_converted_lead(fake)
            record = JobRecord.for_event(name, "ONCRMACTIVITYADD", activity, f"{tag}{n}")
            assert await queue.submit(record)
            jobs[name].append(record.id)
            wanted.append((fake, activity, want))

    try:
        use_shards(4)  # an earlier count: beta's jobs wait on shard 3's queue, which two shards do not have
        await queue_e_mails("beta", beta_portal, 3, "before")
        assert await redis.zcard(live_queue(3)) == 3
        use_shards(2)
        await queue_e_mails("acme", portal, 10, "")
        await queue_e_mails("beta", beta_portal, 10, "")
        rules = two_portals_rules(tmp_path / "rules.yaml", portal, beta_portal)
        workers = [WorkerProcess(redis_url, rules, tmp_path, f"shard{k}", B24_WORKER_SHARDS="2",
                                 B24_WORKER_SHARD=str(k)).start() for k in range(2)]
        try:
            async def all_ended() -> bool:
                records = [await store.get(i) for i in jobs["acme"] + jobs["beta"]]
                return all(r is not None and r.state in FINAL_STATES for r in records)

            await until(all_ended, 120, "every job to end")
            await until(lambda: jobs_run_by(workers[0]) | jobs_run_by(workers[1]) >= set(jobs["acme"] + jobs["beta"]),
                        30, "every job's line in its worker's log")
        finally:
            for worker in workers:
                worker.stop()
        assert all(fake.bindings(activity) == want for fake, activity, want in wanted)
        assert jobs_run_by(workers[0]) == set(jobs["acme"]), workers[0].log.read_text()[-3000:]
        # shard 1's worker ran beta's jobs, those left on shard 3's queue by the earlier count included
        assert jobs_run_by(workers[1]) == set(jobs["beta"]), workers[1].log.read_text()[-3000:]
        assert "arq:queue:shard3 holds jobs of a shard beyond B24_WORKER_SHARDS=2" in workers[1].log.read_text()
        assert await redis.zcard(live_queue(3)) == 0
    finally:
        use_shards(1)
        await beta_portal.close()
