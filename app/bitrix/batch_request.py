"""One `batch` request of the batcher: its commands encoded, its answer unpacked in the order they
were asked (each job its own rows of a merged list), the methods' time budgets noted."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.bitrix.budget import MethodBudget
from app.bitrix.commands import BATCH_LIMIT, Command, CommandResult
from app.bitrix.errors import B24Error, MethodBlocked
from app.bitrix.packing import BatchCall, Part, unpack_batch
from app.bitrix.query import http_build_query
from app.bitrix.transport import PortalTransport


def batch_params(commands: Sequence[Command], halt: bool) -> dict[str, Any]:
    """`batch`'s parameters: each command as `method?query`, named c0, c1, … in order."""
    return {"halt": int(halt), "cmd": {f"c{i}": f"{c.method}?{http_build_query(c.params)}"
                                       for i, c in enumerate(commands)}}


async def send_call(transport: PortalTransport, budget: MethodBudget | None, call: BatchCall, parts: list[Part],
                    reserve: int) -> list[CommandResult]:
    """The call's results, one per slot; the request's token is already taken. `reserve`: slots of the
    burst a read sent alone afterwards leaves free (`PortalBatcher._reserve`)."""
    chunk = call.chunk.commands()
    meters = list(dict.fromkeys(part.meter for part in parts))
    answer = await transport.request("batch", batch_params(chunk, call.halt), write=call.write, meters=meters,
                                     acquired=True)
    sent = unpack_batch(chunk, answer.result)
    if budget:
        await budget.note_batch(chunk, answer)
        for result in sent:
            if isinstance(result.error, MethodBlocked):
                await budget.block(result.error.method)
    answers = call.chunk.answers(sent)
    alone = [i for i, a in enumerate(answers) if a is None]
    if alone:  # a merged list did not settle them: a record missing from it, or a page that filled
        asked = [call.slots[i] for i in alone]
        for i, result in zip(alone, await _ask_alone(transport, budget, asked, reserve)):
            answers[i] = result
    unpacked = [a for a in answers if a is not None]
    for (part, _), result in zip(call.slots, unpacked):
        part.meter.commands += 1
        part.meter.calls[(result.command.method, str(result.error.code) if result.error else "ok", "batch")] += 1
    return unpacked


async def _ask_alone(transport: PortalTransport, budget: MethodBudget | None,
                     slots: list[tuple[Part, tuple[int, int]]], reserve: int) -> list[CommandResult]:
    """Reads a merged list did not settle, each as its own command, so that each gets the portal's
    own answer (its "Not found", its rows past the first page): rare, one more request."""
    results: list[CommandResult] = []
    for start in range(0, len(slots), BATCH_LIMIT):
        some = slots[start:start + BATCH_LIMIT]
        commands = [part.command(at) for part, at in some]
        meters = list(dict.fromkeys(part.meter for part, _ in some))
        try:
            answer = await transport.request("batch", batch_params(commands, False), write=False, meters=meters,
                                             reserve=reserve)
        except B24Error as exc:
            results += [CommandResult(command, error=exc) for command in commands]
            continue
        if budget:
            await budget.note_batch(commands, answer)
        results += unpack_batch(commands, answer.result)
    return results
