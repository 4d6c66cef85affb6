"""PortalBatcher against the fake portal: every job's commands packed into shared batches, each job
getting its own results, its own failures and its own request count."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from app.bitrix.client import Command, RestClient, RetryPolicy
from app.bitrix.errors import ConfigError, MethodBlocked, TransientError
from app.portal_config import PortalConfig
from app.bitrix.ratelimit import LocalRateLimiter
from app.bitrix.guard import NotHeld
from app.bitrix.batcher import PortalBatcher
from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.rebind.executor import execute
from app.rules.plan import BindingPlan
from tests.support.plans import rebind
from tests.conftest import post_event


@pytest.fixture
async def jobs(portal_config: PortalConfig) -> AsyncIterator[Any]:
    """RestClients as a worker's jobs have them: all on the portal's one session."""
    async with aiohttp.ClientSession() as http:
        session = PortalBatcher(http, portal_config, LocalRateLimiter(), retry=RetryPolicy(attempts=2, base=0.01))

        def make(low_priority: bool = False) -> RestClient:
            return RestClient.joining(session, low_priority=low_priority)
        yield make, session
        await session.close()


def bindings_of(activity: int) -> list[Command]:
    return [Command("crm.activity.binding.list", {"activityId": activity}),
            Command("crm.activity.get", {"id": activity})]


def add(activity: int, type_id: int, entity: int) -> Command:
    return Command("crm.activity.binding.add", {"activityId": activity, "entityTypeId": type_id, "entityId": entity})


def delete(activity: int, type_id: int, entity: int) -> Command:
    return Command("crm.activity.binding.delete", {"activityId": activity, "entityTypeId": type_id,
                                                   "entityId": entity})


async def test_reads_of_concurrent_jobs_leave_in_one_call(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)], subject=f"mail {n}") for n in range(3)]

    answers = await asyncio.gather(*(make().batch(bindings_of(a)) for a in activities))

    assert portal.requests == [("batch", 6)]
    assert [answer[1].result["SUBJECT"] for answer in answers] == ["mail 0", "mail 1", "mail 2"]


async def test_a_read_alone_leaves_at_once_and_the_request_counts_on_its_job(jobs: Any,
                                                                            portal: FakePortal) -> None:
    make, _ = jobs
    activity = portal.add_activity([(LEAD, portal.add_lead())])
    first, second = make(), make()

    # `second` is a job of the session too, busy elsewhere: `first` does not wait for it past LINGER.
    await first.batch(bindings_of(activity))
    first.close()
    await second.batch(bindings_of(activity))

    assert portal.requests == [("batch", 2), ("batch", 2)]
    assert (first.requests, second.requests) == (1, 1)


async def test_request_counts_land_on_every_job_a_call_carried(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(30)]
    big, small, alone = make(), make(), make()

    # 50 commands of `big` and 10 of `small` leave together: 60 commands, two calls; `alone` reads later.
    await asyncio.gather(big.batch([c for a in activities[:25] for c in bindings_of(a)]),
                         small.batch([c for a in activities[25:] for c in bindings_of(a)]))
    await alone.batch(bindings_of(activities[0]))

    assert [n for _, n in portal.requests] == [50, 10, 2]
    assert (big.requests, big.commands) == (1, 50)  # the first call was all its own
    assert (small.requests, small.commands) == (1, 10)  # the second all its own
    assert (alone.requests, alone.commands) == (1, 2)


async def test_a_shared_call_counts_on_each_of_its_jobs(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    activity = portal.add_activity([(LEAD, portal.add_lead())])
    clients = [make() for _ in range(3)]

    await asyncio.gather(*(c.batch(bindings_of(activity)) for c in clients))

    assert portal.request_count == 1
    assert [(c.requests, c.commands) for c in clients] == [(1, 2)] * 3


async def test_reads_past_one_call_are_split_at_fifty_commands(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(30)]

    answers = await asyncio.gather(*(make().batch(bindings_of(a)) for a in activities))

    assert [n for _, n in portal.requests] == [50, 10]
    assert [int(answer[1].result["ID"]) for answer in answers] == activities


async def test_a_failed_call_fails_every_job_that_shared_it(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    activity = portal.add_activity([(LEAD, portal.add_lead())])
    portal.fail_next(1, status=401, error="NO_AUTH_FOUND")

    outcomes = await asyncio.gather(*(make().batch(bindings_of(activity)) for _ in range(3)),
                                    return_exceptions=True)

    assert [type(o) for o in outcomes] == [ConfigError] * 3
    assert len(portal.requests) == 1


async def test_reads_and_writes_never_share_a_call(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])

    await asyncio.gather(make().batch(bindings_of(activity)),
                         make().batch([add(activity, CONTACT, made["contact"])], write=True))

    assert sorted(portal.requests) == [("batch", 1), ("batch", 2)]


async def test_halting_groups_stay_whole_and_ordered_inside_a_shared_call(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(5)]

    await asyncio.gather(*(make().write([[add(a, CONTACT, made["contact"]), add(a, COMPANY, made["company"])],
                                         [delete(a, LEAD, lead)]]) for a in activities))

    assert portal.requests == [("batch", 15)]  # one call, halting at an error
    for activity in activities:  # each group in order: both binds, then the unbind
        assert portal.binding_history[activity][-3:] == [
            ((LEAD, lead), (CONTACT, made["contact"])),
            ((LEAD, lead), (CONTACT, made["contact"]), (COMPANY, made["company"])),
            ((CONTACT, made["contact"]), (COMPANY, made["company"]))]


async def test_under_a_backlog_groups_go_stage_by_stage_in_full_calls(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(40)]

    await asyncio.gather(*(make().write([[add(a, CONTACT, made["contact"]), add(a, COMPANY, made["company"])],
                                         [delete(a, LEAD, lead)]]) for a in activities))

    # 80 binds, then 40 unbinds; no unbind before its own binds came back.
    assert sum(n for _, n in portal.requests) == 120
    assert len(portal.requests) <= 4
    assert all(portal.bindings(a) == [(CONTACT, made["contact"]), (COMPANY, made["company"])] for a in activities)
    assert all(len(state) >= 2 for a in activities for state in portal.binding_history[a][-1:])


async def test_one_jobs_failure_stops_only_its_own_group(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    refused, fine = portal.add_activity([(LEAD, lead)]), portal.add_activity([(LEAD, lead)])
    hidden = portal.add_contact()
    portal.set_access_denied({(CONTACT, hidden)})

    refused_results, fine_results = await asyncio.gather(
        make().write([[add(refused, CONTACT, hidden)], [delete(refused, LEAD, lead)]]),
        make().write([[add(fine, CONTACT, made["contact"])], [delete(fine, LEAD, lead)]]))

    assert refused_results[0][0].error is not None and refused_results[0][0].error.code == "ACCESS_DENIED"
    assert refused_results[1][0].error is not None and refused_results[1][0].error.code == "NOT_RUN"
    assert all(r.ok for stage in fine_results for r in stage)
    assert portal.bindings(refused) == [(LEAD, lead)]
    assert portal.bindings(fine) == [(CONTACT, made["contact"])]
    # The shared call halted at the refused bind; the other group went again, whole, in the next.
    assert portal.requests == [("batch", 4), ("batch", 2)]


async def test_already_bound_counts_as_done_and_the_group_goes_on(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead), (CONTACT, made["contact"])])

    results = await make().write([[add(activity, CONTACT, made["contact"])], [delete(activity, LEAD, lead)]])

    assert results[0][0].error is not None and results[0][0].error.code == "ACTIVITY_IS_ALREADY_BOUND"
    assert results[1][0].ok
    assert portal.bindings(activity) == [(CONTACT, made["contact"])]


async def test_live_commands_go_before_low_priority_ones(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(30)]
    backfill, live = make(low_priority=True), make()

    await asyncio.gather(backfill.batch([c for a in activities[1:] for c in bindings_of(a)]),
                         live.batch(bindings_of(activities[0])))

    # The live job's two commands lead the first call; the backfill's 58 fill the rest and the next.
    assert [n for _, n in portal.requests] == [50, 10]
    assert live.requests == 1 and backfill.requests == 2


async def test_a_method_out_of_its_budget_defers_only_the_jobs_that_need_it(jobs: Any, portal: FakePortal,
                                                                            redis: Any) -> None:
    from app.bitrix.budget import MethodBudget

    make, session = jobs
    session.budget = budget = MethodBudget(redis, "acme", 480)
    await budget.block("crm.activity.get")
    activity = portal.add_activity([(LEAD, portal.add_lead())])

    blocked, fine = await asyncio.gather(make().batch(bindings_of(activity)),
                                         make().batch(bindings_of(activity)[:1]), return_exceptions=True)

    assert isinstance(blocked, MethodBlocked) and blocked.retry_at
    assert isinstance(fine, list) and fine[0].ok
    assert portal.requests == [("batch", 1)]


async def test_a_write_call_that_failed_with_500_is_reported_not_resent(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    portal.fail_next(1)

    with pytest.raises(TransientError):
        await make().write([[add(activity, CONTACT, made["contact"])], [delete(activity, LEAD, lead)]])

    assert portal.request_count == 1


async def test_the_same_read_asked_by_several_jobs_is_sent_once(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    lead = portal.add_lead()
    facts = [Command("crm.lead.get", {"id": lead}), Command("crm.contact.list", {"filter": {"LEAD_ID": lead}})]
    clients = [make() for _ in range(3)]

    answers = await asyncio.gather(*(c.batch(facts) for c in clients))

    assert portal.requests == [("batch", 2)]
    assert all(int(answer[0].result["ID"]) == lead for answer in answers)
    assert [c.commands for c in clients] == [2, 2, 2]


async def test_a_worker_under_load_sends_fewer_requests_and_every_activity_ends_right(
        client: Any, worker: Any, portal: FakePortal) -> None:
    made, activities = [], []
    for _ in range(10):
        lead = portal.add_lead()
        made.append(portal.convert_lead(lead))
        activities.append(portal.add_activity([(LEAD, lead)]))
    for activity in activities:
        await post_event(client, "ONCRMACTIVITYADD", activity)

    await worker.run_check()

    assert all(portal.bindings(a) == [(3, m["contact"]), (4, m["company"])] for a, m in zip(activities, made))
    assert len(portal.requests) < 3 * len(activities)  # each job alone makes 3


async def test_jobs_waiting_on_a_call_are_not_left_hanging_when_the_worker_stops(jobs: Any,
                                                                                 portal: FakePortal) -> None:
    make, session = jobs
    activity = portal.add_activity([(LEAD, portal.add_lead())])
    portal.stall_next(1, 30.0)
    first = asyncio.create_task(make().batch(bindings_of(activity)))
    await asyncio.sleep(0.2)  # its call is on its way, and stuck
    second = asyncio.create_task(make().batch(bindings_of(activity)))
    await asyncio.sleep(0)

    await asyncio.wait_for(session.close(), timeout=5)  # the call on its way is stopped, not waited for

    outcomes = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), timeout=5)
    assert all(isinstance(outcome, asyncio.CancelledError) for outcome in outcomes)


async def test_a_halt_in_one_jobs_plan_leaves_the_other_jobs_plan_whole(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    refused, fine = portal.add_activity([(LEAD, lead)]), portal.add_activity([(LEAD, lead)])
    hidden = portal.add_contact()
    portal.set_access_denied({(CONTACT, hidden)})

    outcomes = await asyncio.gather(execute(BindingPlan(activities=(rebind(refused, lead, hidden),)), make()),
                                    execute(BindingPlan(activities=(rebind(fine, lead, made["contact"]),)), make()))

    assert [[o.status for o in job] for job in outcomes] == [["failed"], ["changed"]]
    assert portal.bindings(refused) == [(LEAD, lead)]
    assert portal.bindings(fine) == [(CONTACT, made["contact"])]


async def test_a_429_on_batch_itself_defers_every_job_until_the_reset(jobs: Any, portal: FakePortal,
                                                                      redis: Any) -> None:
    from app.bitrix.budget import MethodBudget

    make, session = jobs
    session.budget = budget = MethodBudget(redis, "acme", 480.0)  # the service expects far more than it gets
    portal.set_operating_limit(3.0, cost_per_call=1.0, charge_batch=True)
    activity = portal.add_activity([(LEAD, portal.add_lead())])
    await make().batch(bindings_of(activity))
    await make().batch(bindings_of(activity))  # 4 s charged to `batch`: the next call is refused

    outcomes = await asyncio.gather(*(make().batch(bindings_of(activity)[:1]) for _ in range(2)),
                                    return_exceptions=True)

    assert all(isinstance(o, MethodBlocked) and o.method == "batch" and o.retry_at for o in outcomes)
    assert portal.blocked_for_time == 1  # both jobs' commands were in the one call the portal refused
    before = portal.request_count
    later = await asyncio.gather(make().batch(bindings_of(activity)), return_exceptions=True)
    assert isinstance(later[0], MethodBlocked)  # deferred here, not sent until the reset
    assert portal.request_count == before
    # The batch-wide figure was noted for `batch`, not as each method's own.
    await budget.refresh()
    assert budget.blocked(["crm.activity.binding.list", "crm.activity.get"]) is None


async def test_per_method_figures_are_noted_on_portals_that_charge_each_method(jobs: Any, portal: FakePortal,
                                                                               redis: Any) -> None:
    from app.bitrix.budget import MethodBudget

    make, session = jobs
    session.budget = budget = MethodBudget(redis, "acme", 2.0)
    portal.set_operating_limit(10.0, cost_per_call=1.0)
    activity = portal.add_activity([(LEAD, portal.add_lead())])
    await make().batch(bindings_of(activity))
    await make().batch(bindings_of(activity)[1:])

    await budget.refresh()
    blocked = budget.blocked(["crm.activity.binding.list", "crm.activity.get"])
    assert blocked is not None and blocked.method == "crm.activity.get"  # 2 s of 2: near its budget


async def test_a_portal_handed_from_a_stopping_worker_to_another_loses_nothing(
        client: Any, make_worker: Any, portal: FakePortal, redis: Any) -> None:
    from app.store.jobs import JobStore
    from workers.main import shutdown

    made, activities, job_ids = [], [], []
    for _ in range(8):
        lead = portal.add_lead()
        made.append(portal.convert_lead(lead))
        activities.append(portal.add_activity([(LEAD, lead)]))
        job_ids.append(str((await post_event(client, "ONCRMACTIVITYADD", activities[-1]))[1]["job_id"]))
    portal.stall_next(1, 5.0)
    first = make_worker()
    first.ctx["redis"] = first.pool
    await first.on_startup(first.ctx)
    await first.start_jobs([job_id.encode() for job_id in job_ids])
    await asyncio.sleep(0.3)  # one call stuck at the portal, the other jobs' commands waiting behind it

    for task in list(first.tasks.values()):  # the process stops, as arq's close does with running jobs
        task.cancel()
    await asyncio.gather(*first.tasks.values(), return_exceptions=True)
    await shutdown(first.ctx)
    await make_worker().run_check()  # another process takes the portal's work

    assert all(portal.bindings(a) == [(CONTACT, m["contact"]), (COMPANY, m["company"])]
               for a, m in zip(activities, made))
    records = [await JobStore(redis, 3600).get(job_id) for job_id in job_ids]
    assert all(r is not None and r.state.value in ("succeeded", "skipped") for r in records)


def lead_facts(lead: int) -> list[Command]:
    return [Command("crm.lead.get", {"id": lead}, fields=("ID", "STATUS_ID", "CONTACT_ID")),
            Command("crm.contact.list", {"filter": {"LEAD_ID": lead}, "select": ["ID"], "order": {"ID": "ASC"}})]


async def test_point_reads_of_many_jobs_go_as_one_list_each_and_every_job_gets_its_own(
        jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    leads = [portal.add_lead(status="CONVERTED") for _ in range(20)]
    made = {lead: portal.add_contact(lead_id=lead) for lead in leads[::2]}

    answers = await asyncio.gather(*(make().batch(lead_facts(lead)) for lead in leads))

    assert portal.requests == [("batch", 2)]  # 40 reads: one list of leads, one of contacts
    assert (portal.method_calls["crm.lead.list"], portal.method_calls["crm.contact.list"]) == (1, 1)
    for lead, (lead_row, contacts) in zip(leads, answers):
        assert (int(lead_row.result["ID"]), lead_row.result["STATUS_ID"]) == (lead, "CONVERTED")
        assert [int(row["ID"]) for row in contacts.result] == ([made[lead]] if lead in made else [])


async def test_a_record_missing_from_a_merged_list_gets_the_portals_own_answer(
        jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    here, gone, hidden = portal.add_lead(), portal.add_lead(), portal.add_lead()
    portal.delete_entity(LEAD, gone)
    portal.set_access_denied([(LEAD, hidden)])
    clients = [make() for _ in range(3)]

    answers = await asyncio.gather(*(c.batch(lead_facts(lead)[:1]) for c, lead in zip(clients, (here, gone, hidden))))

    assert [a[0].ok for a in answers] == [True, False, False]
    assert answers[1][0].error is not None and answers[1][0].error.code == "NOT_FOUND"
    assert answers[2][0].error is not None and "Access denied" in answers[2][0].error.description
    assert portal.method_calls["crm.lead.get"] == 2  # the two the list did not settle, asked alone
    assert [c.requests for c in clients] == [1, 2, 2]


async def test_a_check_that_stops_a_halting_call_is_never_merged(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    lead = portal.add_lead()
    contact = portal.add_contact(lead_id=lead)
    activity = portal.add_activity([(LEAD, lead)])
    portal.delete_entity(CONTACT, contact)
    check = Command("crm.contact.get", {"id": contact}, fields=("ID",))

    (checked, added, deleted) = await make().write([[check], [add(activity, CONTACT, contact)],
                                                   [delete(activity, LEAD, lead)]],
                                                  stops=lambda r: r.error is not None)

    assert checked[0].error is not None and checked[0].error.code == "NOT_FOUND"
    assert [r.error.code for r in added + deleted if r.error] == ["NOT_RUN", "NOT_RUN"]
    assert portal.bindings(activity) == [(LEAD, lead)]
    assert portal.method_calls["crm.contact.list"] == 0


async def test_a_merged_list_with_more_rows_than_a_page_is_asked_again_command_by_command(
        jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    crowded, plain = portal.add_lead(), portal.add_lead()
    many = [portal.add_contact(lead_id=crowded) for _ in range(50)]  # a page's worth for one lead alone
    one = portal.add_contact(lead_id=plain)

    answers = await asyncio.gather(*(make().batch(lead_facts(lead)[1:]) for lead in (crowded, plain)))

    assert [[int(row["ID"]) for row in answer[0].result] for answer in answers] == [many, [one]]
    assert portal.method_calls["crm.contact.list"] == 3  # the merged list, then each alone
    assert [n for _, n in portal.requests] == [1, 2]


async def test_a_job_whose_lock_lapsed_sends_none_of_its_writes_and_the_others_still_go(
        jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    lead = portal.add_lead()
    kept, lost = (portal.add_activity([(LEAD, lead)]) for _ in range(2))
    contact = portal.add_contact(name="Client")
    holder, paused = make(), make()
    holder.meter.guard = _answers(True)
    paused.meter.guard = _answers(False)  # its lead's lock lapsed while its process was stopped

    results = await asyncio.gather(holder.write([[add(kept, CONTACT, contact)]]),
                                   paused.write([[add(lost, CONTACT, contact)]]), return_exceptions=True)

    assert isinstance(results[1], NotHeld)
    assert not isinstance(results[0], BaseException)
    sent = [r for r in portal.requests if r.method == "batch"]
    assert sent == [("batch", 1)]  # the holder's add alone
    assert portal.bindings(lost) == [(LEAD, lead)]


def _answers(held: bool) -> Any:
    async def guard() -> bool:
        return held
    return guard


async def test_under_a_backlog_the_targets_checks_travel_with_other_jobs_reads(jobs: Any, portal: FakePortal) -> None:
    """Write groups too many for one call go stage by stage; their first stage only reads (the targets'
    checks, a merged list or two), so it goes in the call of reads, not in a request of its own."""
    make, _ = jobs
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(20)]
    check = Command("crm.contact.get", {"id": made["contact"]}, fields=("ID",))

    await asyncio.gather(*(make().batch(bindings_of(a)) for a in activities),
                         *(make().write([[check], [add(a, CONTACT, made["contact"]), add(a, COMPANY, made["company"])],
                                         [delete(a, LEAD, lead)]]) for a in activities))

    # Reads and checks (41 commands), 40 binds, 20 unbinds: three requests, not four.
    assert portal.requests == [("batch", 41), ("batch", 40), ("batch", 20)]
    assert all(portal.bindings(a) == [(CONTACT, made["contact"]), (COMPANY, made["company"])] for a in activities)


async def test_a_check_gone_in_a_call_of_reads_still_stops_its_own_group_only(jobs: Any, portal: FakePortal) -> None:
    make, _ = jobs
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    gone = portal.add_contact(lead_id=lead)
    portal.delete_entity(CONTACT, gone)
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(20)]

    def group(activity: int, contact: int) -> list[list[Command]]:
        return [[Command("crm.contact.get", {"id": contact}, fields=("ID",))], [add(activity, CONTACT, contact)],
                [delete(activity, LEAD, lead)]]

    answers = await asyncio.gather(*(make().write(group(a, gone if n == 0 else made["contact"]),
                                                  stops=lambda r: r.error is not None)
                                     for n, a in enumerate(activities)))

    (checked,), added, deleted = answers[0]
    assert checked.error is not None and checked.error.code == "NOT_FOUND"
    assert [r.error.code for r in added + deleted if r.error] == ["NOT_RUN", "NOT_RUN"]
    assert portal.bindings(activities[0]) == [(LEAD, lead)]
    assert all(portal.bindings(a) == [(CONTACT, made["contact"])] for a in activities[1:])
