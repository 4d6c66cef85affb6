"""PortalRelay across worker processes: one process holds the portal and packs every process's parts,
on a real Redis and the fake portal over HTTP. A "process" here is a PortalSession with a relay of its
own, sharing only Redis with the others, as separate worker processes do."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from app.bitrix.client import Command, RestClient, RetryPolicy
from app.bitrix.errors import ConfigError, TransientError
from app.bitrix.portal import PortalConfig
from app.bitrix.ratelimit import RateLimiter
from app.bitrix.relay import PortalRelay, relay_fits
from app.bitrix.session import PortalSession
from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.rebind.executor import execute
from app.rules.plan import BindingPlan
from tests.app.bitrix.test_session import add, bindings_of, delete
from tests.app.rebind.test_executor import rebind

LEASE = 0.5  # seconds: a killed holder's portal is free again soon


class Process:
    """One worker process's sender for the portal: its session, its relay, its jobs."""

    def __init__(self, http: aiohttp.ClientSession, config: PortalConfig, redis: Any, linger: float) -> None:
        self.relay = PortalRelay(redis, config, lease=LEASE, renew_every=0.05)
        self.session = PortalSession(http, config, RateLimiter(redis), retry=RetryPolicy(attempts=2, base=0.01),
                                     linger=linger, relay=self.relay)

    def job(self) -> RestClient:
        return RestClient.joining(self.session)

    def kill(self) -> None:
        """The process dies where it stands: nothing is answered, given back or released."""
        relay, session = self.relay, self.session
        for task in [relay._holding_task, relay._replies_task, *(t for *_, t in relay._serving.values()),
                     session._sender, *session._deliveries]:
            if task is not None:
                task.cancel()


@pytest.fixture
async def processes(portal_config: PortalConfig, redis: Any) -> AsyncIterator[Callable[..., Process]]:
    async with aiohttp.ClientSession() as http:
        made: list[Process] = []

        def make(linger: float = 0.05, config: PortalConfig = portal_config) -> Process:
            made.append(Process(http, config, redis, linger))
            return made[-1]
        yield make
        for process in made:
            await process.session.close()


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def holding(process: Process) -> RestClient:
    """`process` takes the portal (its first job's read) and keeps a job that is busy elsewhere: its
    calls wait the session's linger for that job, and meanwhile other processes' parts join them."""
    first = process.job()
    await first.batch([Command("crm.lead.get", {"id": 1})])
    first.close()
    assert process.relay.holding
    return process.job()


async def two_processes(processes: Any, portal: FakePortal) -> tuple[Process, Process, RestClient]:
    """A holder whose calls wait for its busy job (so the other's parts join them), the other process,
    and the busy job to close; the portal's counters start from here."""
    holder, other = processes(linger=30.0), processes()
    busy = await holding(holder)
    portal.reset_counters()
    return holder, other, busy


async def test_parts_from_two_processes_leave_in_shared_calls_through_the_holder(
        processes: Any, portal: FakePortal) -> None:
    holder, other, busy = await two_processes(processes, portal)
    lead = portal.add_lead()
    facts = [Command("crm.lead.get", {"id": lead}), Command("crm.contact.list", {"filter": {"LEAD_ID": lead}})]
    activities = [portal.add_activity([(LEAD, lead)], subject=f"mail {n}") for n in range(3)]

    here = asyncio.create_task(holder.job().batch(facts + bindings_of(activities[0])))
    there = [asyncio.create_task(other.job().batch(facts + bindings_of(a))) for a in activities[1:]]
    await until(lambda: holder.relay.served == 2)
    last = await busy.batch(bindings_of(activities[0]))  # every job of the holder waits: the call leaves

    answers = [await here, *[await task for task in there]]
    # The lead's facts, asked by three jobs in two processes, and two reads asked twice, sent once.
    assert portal.requests == [("batch", 2 + 2 * 3)]
    assert [int(answer[0].result["ID"]) for answer in answers] == [lead] * 3
    assert [answer[3].result["SUBJECT"] for answer in answers] == ["mail 0", "mail 1", "mail 2"]
    assert last[1].result["SUBJECT"] == "mail 0"
    assert other.relay.forwarded == 2 and not other.relay.holding


async def test_point_reads_of_two_processes_go_as_one_list(processes: Any, portal: FakePortal) -> None:
    holder, other, busy = await two_processes(processes, portal)
    leads = [portal.add_lead(title=f"lead {n}") for n in range(2)]

    def lead(n: int) -> list[Command]:
        return [Command("crm.lead.get", {"id": leads[n]}, fields=("ID", "TITLE"))]

    there = asyncio.create_task(other.job().batch(lead(1)))
    await until(lambda: holder.relay.served == 1)
    here = await busy.batch(lead(0))

    # The fields a get names travel with it: both leads were read in one list by @ID.
    assert portal.requests == [("batch", 1)]
    assert [here[0].result["TITLE"], (await there)[0].result["TITLE"]] == ["lead 0", "lead 1"]


async def test_request_counts_land_on_the_right_jobs_in_both_processes(processes: Any, portal: FakePortal) -> None:
    holder, other, busy = await two_processes(processes, portal)
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(31)]
    big, small, alone = holder.job(), other.job(), other.job()

    async def job_of(client: RestClient, commands: list[Command]) -> None:
        await client.batch(commands)
        client.close()

    # 50 commands of `big` (here) and 10 of `small` (there): two calls, each all one job's.
    reads = [asyncio.create_task(job_of(big, [c for a in activities[:25] for c in bindings_of(a)])),
             asyncio.create_task(job_of(small, [c for a in activities[25:30] for c in bindings_of(a)]))]
    await until(lambda: holder.relay.served == 1)
    busy.close()
    await asyncio.gather(*reads)
    await alone.batch(bindings_of(activities[30]))

    assert [n for _, n in portal.requests] == [50, 10, 2]
    assert (big.requests, big.commands) == (1, 50)
    assert (small.requests, small.commands) == (1, 10)
    assert (alone.requests, alone.commands) == (1, 2)
    assert sum(small.take_calls().values()) >= 10  # its commands' outcomes came back for its metrics


async def test_halting_write_groups_of_two_processes_stay_whole_and_ordered(processes: Any,
                                                                           portal: FakePortal) -> None:
    holder, other, busy = await two_processes(processes, portal)
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(4)]

    def group(activity: int) -> list[list[Command]]:
        return [[add(activity, CONTACT, made["contact"]), add(activity, COMPANY, made["company"])],
                [delete(activity, LEAD, lead)]]

    jobs = [(other if n % 2 else holder).job() for n in range(4)]
    writes = [asyncio.create_task(job.write(group(a))) for job, a in zip(jobs, activities)]
    await until(lambda: holder.relay.served == 2)
    busy.close()
    results = await asyncio.gather(*writes)

    assert portal.requests == [("batch", 12)]  # one call, halting at an error, both processes' groups in it
    assert all(r.ok for job in results for stage in job for r in stage)
    assert [job.requests for job in jobs] == [1, 1, 1, 1]
    for activity in activities:  # each group in order: both binds, then the unbind
        assert portal.binding_history[activity][-3:] == [
            ((LEAD, lead), (CONTACT, made["contact"])),
            ((LEAD, lead), (CONTACT, made["contact"]), (COMPANY, made["company"])),
            ((CONTACT, made["contact"]), (COMPANY, made["company"]))]


async def test_one_jobs_failure_stops_only_its_own_group_across_processes(processes: Any,
                                                                         portal: FakePortal) -> None:
    holder, other, busy = await two_processes(processes, portal)
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    refused, fine = portal.add_activity([(LEAD, lead)]), portal.add_activity([(LEAD, lead)])
    hidden = portal.add_contact()
    portal.set_access_denied({(CONTACT, hidden)})

    refusing = asyncio.create_task(other.job().write([[add(refused, CONTACT, hidden)], [delete(refused, LEAD, lead)]]))
    fine_write = asyncio.create_task(holder.job().write([[add(fine, CONTACT, made["contact"])],
                                                        [delete(fine, LEAD, lead)]]))
    await until(lambda: holder.relay.served == 1)
    busy.close()
    refused_results, fine_results = await refusing, await fine_write

    # The error travels back typed, the unbind after it never ran, and the other group was whole.
    first = refused_results[0][0].error
    assert first is not None and first.code == "ACCESS_DENIED" and type(first).__name__ == "PermanentError"
    assert refused_results[1][0].error is not None and refused_results[1][0].error.code == "NOT_RUN"
    assert all(r.ok for stage in fine_results for r in stage)
    assert portal.bindings(refused) == [(LEAD, lead)]
    assert portal.bindings(fine) == [(CONTACT, made["contact"])]


async def test_a_failed_call_raises_its_typed_error_in_the_forwarding_process(processes: Any,
                                                                             portal: FakePortal) -> None:
    holder, other = processes(), processes()
    await holding(holder)
    portal.fail_next(1, status=401, error="NO_AUTH_FOUND")

    with pytest.raises(ConfigError) as raised:
        await other.job().batch(bindings_of(portal.add_activity([(LEAD, portal.add_lead())])))

    assert raised.value.code == "NO_AUTH_FOUND" and raised.value.hint


async def test_a_holder_that_stops_hands_the_portal_over_and_loses_nothing(
        processes: Any, portal: FakePortal, caplog: pytest.LogCaptureFixture) -> None:
    holder, other = processes(linger=30.0), processes()
    await holding(holder)  # its busy job keeps the forwarded parts waiting: none is sent before it stops
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)], subject="kept")
    job = other.job()
    read = asyncio.create_task(job.batch(bindings_of(activity)))
    write = asyncio.create_task(execute(BindingPlan(activities=(rebind(activity, lead, made["contact"]),)),
                                        other.job()))
    await until(lambda: holder.relay.served == 2)
    portal.reset_counters()

    with caplog.at_level(logging.INFO, logger="app.bitrix.relay"):
        await holder.session.close()
        answer, outcomes = await read, await write

    assert answer[1].result["SUBJECT"] == "kept" and job.requests == 1
    assert [o.status for o in outcomes] == ["changed"]
    assert portal.bindings(activity) == [(CONTACT, made["contact"])]
    assert other.relay.holding  # it took the portal when nobody held it
    assert "2 parts given back, 0 write groups" in caplog.text
    assert portal.request_count == 2  # each part sent once, by the new holder


async def test_a_holder_killed_before_sending_loses_nothing(processes: Any, portal: FakePortal,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    holder, other = processes(linger=30.0), processes()
    await holding(holder)
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)], subject="kept")
    read = asyncio.create_task(other.job().batch(bindings_of(activity)))
    write = asyncio.create_task(execute(BindingPlan(activities=(rebind(activity, lead, made["contact"]),)),
                                        other.job()))
    await until(lambda: holder.relay.served == 2)

    with caplog.at_level(logging.INFO, logger="app.bitrix.relay"):
        holder.kill()  # its taken parts stay taken; its lease lapses
        answer, outcomes = await read, await write

    # The read was sent again by the process that took over; the write group, whose fate the new
    # holder cannot know, was reported so: the executor read the bindings and sent what was missing.
    assert answer[1].result["SUBJECT"] == "kept"
    assert [o.status for o in outcomes] == ["changed"]
    assert portal.bindings(activity) == [(CONTACT, made["contact"])]
    assert "1 reads sent again, 1 write groups reported of unknown fate" in caplog.text


async def test_a_holder_killed_while_its_writes_reach_the_portal_loses_nothing(
        processes: Any, portal: FakePortal, caplog: pytest.LogCaptureFixture) -> None:
    holder, other = processes(), processes()
    await holding(holder)
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    # The holder dies as the portal runs its call: the writes land, and it never answers.
    portal.before_request("crm.activity.binding.add", holder.kill)

    with caplog.at_level(logging.INFO, logger="app.bitrix.relay"):
        outcomes = await execute(BindingPlan(activities=(rebind(activity, lead, made["contact"],
                                                                made["company"]),)), other.job())

    assert [o.status for o in outcomes] != ["failed"]
    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    assert "1 write groups reported of unknown fate" in caplog.text
    assert other.relay.holding


async def test_a_part_whose_stop_rule_cannot_travel_is_sent_by_its_own_process(processes: Any,
                                                                              portal: FakePortal) -> None:
    holder, other = processes(), processes()
    await holding(holder)
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])

    await other.job().write([[add(activity, CONTACT, made["contact"])]], stops=lambda result: False)

    assert other.relay.forwarded == 0 and portal.bindings(activity) == [(LEAD, lead), (CONTACT, made["contact"])]


async def test_without_redis_a_process_sends_its_own_requests(portal_config: PortalConfig, private_redis: Any,
                                                              portal: FakePortal,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from app.bitrix.ratelimit import LocalRateLimiter
    from app.store.queue import connect

    redis = await connect(private_redis.url)
    async with aiohttp.ClientSession() as http:
        relay = PortalRelay(redis, portal_config, lease=LEASE, renew_every=0.05)
        session = PortalSession(http, portal_config, LocalRateLimiter(), relay=relay)
        private_redis.stop()
        activity = portal.add_activity([(LEAD, portal.add_lead())], subject="still read")

        with caplog.at_level(logging.WARNING, logger="app.bitrix.relay"):
            answer = await RestClient.joining(session).batch(bindings_of(activity))

        assert answer[1].result["SUBJECT"] == "still read"
        assert "this process sends its own requests meanwhile" in caplog.text
        await session.close()
    await redis.aclose()


async def test_a_write_waiting_for_a_holder_when_redis_fails_is_reported_of_unknown_fate(
        portal_config: PortalConfig, private_redis: Any, portal: FakePortal) -> None:
    from app.bitrix.ratelimit import LocalRateLimiter
    from app.store.queue import connect

    redis = await connect(private_redis.url)
    async with aiohttp.ClientSession() as http:
        relays = [PortalRelay(redis, portal_config, lease=LEASE, renew_every=0.05) for _ in range(2)]
        sessions = [PortalSession(http, portal_config, LocalRateLimiter(), linger=30.0, relay=r) for r in relays]
        holder, other = sessions
        first = RestClient.joining(holder)
        await first.batch([Command("crm.lead.get", {"id": 1})])
        first.close()
        RestClient.joining(holder)  # busy: the forwarded part waits in the holder
        lead = portal.add_lead()
        activity = portal.add_activity([(LEAD, lead)])
        write = asyncio.create_task(RestClient.joining(other).write([[add(activity, CONTACT, lead)]]))
        await until(lambda: relays[0].served == 1)

        private_redis.stop()

        with pytest.raises(TransientError) as raised:
            await write
        assert raised.value.code == "RELAY_FATE_UNKNOWN"
        for session in sessions:
            await session.close()
    await redis.aclose()


async def test_a_session_retired_by_a_rules_change_hands_the_portal_over(processes: Any,
                                                                         portal: FakePortal) -> None:
    old, other = processes(), processes()
    await holding(old)
    activity = portal.add_activity([(LEAD, portal.add_lead())], subject="read")

    await old.relay.retire()  # the rules file changed the portal: old settings send for nobody else
    answer = await other.job().batch(bindings_of(activity))
    mine = await old.job().batch(bindings_of(activity))  # a job that started before still runs, here

    assert answer[1].result["SUBJECT"] == mine[1].result["SUBJECT"] == "read"
    assert other.relay.holding and not old.relay.holding
    assert other.relay.forwarded == 0 and old.relay.forwarded == 0


async def test_processes_whose_rules_differ_on_the_portal_each_send_with_their_own_settings(
        processes: Any, portal: FakePortal, portal_config: PortalConfig) -> None:
    holder = processes()
    await holding(holder)
    moved = portal_config.model_copy(update={"rest_url": type(portal_config.rest_url)(
        portal.rest_url.replace(portal.webhook_code, "an0therwebhookc0de"))})
    reloaded = processes(config=moved)  # its rules file says another webhook: not yet reloaded elsewhere

    with pytest.raises(ConfigError):
        await reloaded.job().batch(bindings_of(portal.add_activity([(LEAD, portal.add_lead())])))

    assert reloaded.relay.holding and reloaded.relay.forwarded == 0


async def test_an_idle_holder_gives_the_portal_up_and_the_next_process_with_work_takes_it(
        portal_config: PortalConfig, redis: Any, portal: FakePortal) -> None:
    from app.bitrix.ratelimit import LocalRateLimiter

    async with aiohttp.ClientSession() as http:
        relays = [PortalRelay(redis, portal_config, lease=LEASE, renew_every=0.05, idle=0.2) for _ in range(2)]
        first, second = [PortalSession(http, portal_config, LocalRateLimiter(), relay=r) for r in relays]
        activity = portal.add_activity([(LEAD, portal.add_lead())], subject="read")
        await RestClient.joining(first).batch(bindings_of(activity))
        assert relays[0].holding

        await until(lambda: not relays[0].holding)  # nothing came by for a while
        answer = await RestClient.joining(second).batch(bindings_of(activity))

        assert answer[1].result["SUBJECT"] == "read"
        assert relays[1].holding and relays[1].forwarded == 0
        for session in (first, second):
            await session.close()


def test_a_redis_older_than_6_2_has_no_relay() -> None:
    assert [relay_fits(v) for v in ("7.0.15", "6.2.14", "6.2.0", "6.0.16", "5.0.7", "", "x")] == \
        [True, True, True, False, False, False, False]


async def test_on_a_redis_without_blmove_each_process_sends_its_own(processes: Any, portal: FakePortal,
                                                                    redis: Any, caplog: Any) -> None:
    first, second = processes(), processes()

    async def an_old_redis(section: str = "") -> dict[str, Any]:
        return {"redis_version": "6.0.16"}
    for process in (first, second):
        process.relay._redis.info = an_old_redis  # type: ignore[method-assign]
    activity = portal.add_activity([(LEAD, portal.add_lead())])

    with caplog.at_level(logging.WARNING):
        answers = await asyncio.gather(*(p.job().batch(bindings_of(activity)) for p in (first, second)))

    assert all(r.ok for answer in answers for r in answer)
    assert not (first.relay.holding or second.relay.holding)
    assert first.relay.forwarded == second.relay.forwarded == 0
    assert not await redis.keys("*relay*")  # no lease, no inbox
    assert "lacks BLMOVE" in caplog.text
