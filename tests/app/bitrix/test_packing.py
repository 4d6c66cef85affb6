"""What the session packs, without a portal: a job's stages leaving in order (`Part`), and a batch's
answer unpacked command by command (`unpack_batch`), whatever shape PHP gives its sections."""
from __future__ import annotations

import asyncio

import pytest

from app.bitrix.commands import Command, CommandResult, Meter
from app.bitrix.errors import PermanentError, Policy, TransientError, error_for, policy_for
from app.bitrix.packing import Part, stops_group, unpack_batch


def test_unpack_batch_maps_results_and_errors_by_key_in_order() -> None:
    commands = [Command("crm.activity.binding.add", {"activityId": i}) for i in range(5)]
    result = {
        # PHP may send the keys in any order; mapping is by key.
        "result": {"c4": True, "c2": True, "c0": [{"ID": "1"}]},
        "result_error": {"c3": {"error": 100, "error_description": "Could not find value"},
                         "c1": {"error": "ACTIVITY_IS_ALREADY_BOUND", "error_description": "bound"}},
        "result_total": {"c0": 1},
        "result_next": [],
        "result_time": [],
    }

    out = unpack_batch(commands, result)

    assert [r.command for r in out] == commands
    assert [r.ok for r in out] == [True, False, True, False, True]
    assert out[0].result == [{"ID": "1"}] and out[0].total == 1
    assert out[2].result is True and out[2].total is None
    assert type(out[1].error) is PermanentError and out[1].error.code == "ACTIVITY_IS_ALREADY_BOUND"
    assert policy_for(out[1].error.code).policy is Policy.DONE
    assert type(out[3].error) is PermanentError and out[3].error.code == "100"
    assert out[3].error.method == "crm.activity.binding.add"


def test_unpack_batch_copes_with_empty_sections_as_arrays() -> None:
    commands = [Command("crm.lead.get", {"id": 1}), Command("crm.lead.get", {"id": 2})]

    ok = unpack_batch(commands, {"result": {"c0": {"ID": "1"}, "c1": {"ID": "2"}}, "result_error": [],
                                  "result_total": [], "result_next": [], "result_time": []})
    assert [r.result for r in ok] == [{"ID": "1"}, {"ID": "2"}]
    assert all(r.ok for r in ok)

    failed = unpack_batch(commands, {"result": [], "result_error": {
        "c0": {"error": "NOT_FOUND", "error_description": "Not found"},
        "c1": {"error": "", "error_description": "Access denied."}}, "result_total": []})
    assert [r.error.code for r in failed if r.error] == ["NOT_FOUND", "ACCESS_DENIED"]


def test_unpack_batch_marks_commands_that_did_not_run() -> None:
    # With halt=1, or a cut-short answer, some keys are in no section at all.
    commands = [Command("crm.lead.get", {"id": i}) for i in range(3)]

    out = unpack_batch(commands, {"result": {"c0": {"ID": "0"}}, "result_error": {
        "c1": {"error": "INTERNAL_SERVER_ERROR", "error_description": "x"}}})

    assert out[0].ok
    assert type(out[1].error) is TransientError
    assert isinstance(out[2].error, TransientError) and out[2].error.code == "NOT_RUN"
    assert [r.command for r in unpack_batch(commands, [])] == commands
    assert all(isinstance(r.error, TransientError) for r in unpack_batch(commands, None))


async def test_a_parts_next_stage_is_ready_only_once_its_stage_is_sent() -> None:
    binds = [Command("crm.activity.binding.add", {"activityId": i}) for i in range(3)]
    unbind = [Command("crm.activity.binding.delete", {"activityId": 0})]
    part = Part(Meter(), [binds, [], unbind], write=True, low=False)

    assert len(part.stages) == 2 and part.ready == 3  # an empty stage is no stage
    assert part.remaining() == [(0, 0), (0, 1), (0, 2), (1, 0)]
    part.sent = 3
    assert part.ready == 0  # the unbinds wait for the binds' answers

    part.finish()
    (first, second) = await asyncio.wait_for(part.done, 1)
    assert [r.error.code for r in first + second if r.error] == ["NOT_RUN"] * 4


def test_already_so_does_not_stop_a_group_and_a_refusal_does() -> None:
    command = Command("crm.activity.binding.add", {"activityId": 1})
    bound = CommandResult(command, error=error_for(command.method, "ACTIVITY_IS_ALREADY_BOUND", "bound"))
    denied = CommandResult(command, error=error_for(command.method, "ACCESS_DENIED", "denied"))
    assert not stops_group(bound) and stops_group(denied) and not stops_group(CommandResult(command, result=True))


@pytest.mark.parametrize("error", [None, RuntimeError("the session closed")])
async def test_a_finished_part_stays_finished(error: BaseException | None) -> None:
    part = Part(Meter(), [[Command("crm.lead.get", {"id": 1})]], write=False, low=False)
    part.finish(error)
    part.finish(RuntimeError("a second ending"))  # ignored: a job hears of its part once
    if error is None:
        assert (await part.done)[0][0].error is not None
    else:
        with pytest.raises(RuntimeError, match="the session closed"):
            await part.done
