"""MethodBudget on a real Redis: budgets shared by every process, read once a second by each."""
from __future__ import annotations

import time

import pytest
from arq.connections import ArqRedis

from app.bitrix import budget
from app.bitrix.budget import BudgetReads, MethodBudget
from app.bitrix.errors import MethodBlocked


async def test_jobs_of_one_process_share_one_read_of_the_budgets(redis: ArqRedis) -> None:
    reads = BudgetReads()
    await MethodBudget(redis, "acme", 480, reads).check(["crm.activity.list"])
    # Another process records that the method is nearly spent; within FRESH_FOR this one does not look.
    other = MethodBudget(redis, "acme", 480)
    await other.note("crm.activity.list", {"operating": 470, "operating_reset_at": time.time() + 300})

    await MethodBudget(redis, "acme", 480, reads).check(["crm.activity.list"])


async def test_a_block_seen_by_another_process_reaches_new_jobs_within_a_second(
        redis: ArqRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget, "FRESH_FOR", 0.0)
    reads = BudgetReads()
    await MethodBudget(redis, "acme", 480, reads).check(["crm.activity.list"])
    await MethodBudget(redis, "acme", 480).block("crm.activity.list")

    with pytest.raises(MethodBlocked):
        await MethodBudget(redis, "acme", 480, reads).check(["crm.activity.list"])


async def test_what_a_process_writes_its_next_job_sees_at_once(redis: ArqRedis) -> None:
    reads = BudgetReads()
    first = MethodBudget(redis, "acme", 480, reads)
    await first.check(["crm.activity.list"])
    await first.block("crm.activity.list")

    with pytest.raises(MethodBlocked):
        await MethodBudget(redis, "acme", 480, reads).check(["crm.activity.list"])
