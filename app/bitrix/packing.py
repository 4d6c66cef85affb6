"""What the batcher packs: a job's commands waiting to leave (`Part`), one `batch` request being filled
(`BatchCall`), and a batch's answer unpacked command by command (`unpack_batch`)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.bitrix.commands import Command, CommandResult, Meter
from app.bitrix.errors import Policy, TransientError, error_for, policy_for
from app.bitrix.merge import BatchChunk
from app.bitrix.transport import int_or_none


def not_run(command: Command, why: str = "the batch did not run this command") -> CommandResult:
    return CommandResult(command, error=TransientError(command.method, "NOT_RUN", why))


class Part:
    """One job's commands waiting for the batcher: one stage for reads, a group of stages for writes."""

    def __init__(self, meter: Meter, stages: list[list[Command]], *, write: bool, low: bool,
                 stops: Callable[[CommandResult], bool] | None = None) -> None:
        self.meter, self.write, self.low = meter, write, low
        self.stops = stops or stops_group
        self.stages = [stage for stage in stages if stage]
        self.results: list[list[CommandResult | None]] = [[None] * len(s) for s in self.stages]
        self.until = len(self.stages)  # stages to send: a failure stops the ones after its own
        self.stage = 0  # the stage being sent
        self.sent = 0  # commands of that stage handed to a call so far
        self.out = 0  # calls on their way with commands of this part
        self.done: asyncio.Future[list[list[CommandResult]]] = asyncio.get_running_loop().create_future()
        self.queued_at = time.monotonic()

    @property
    def ready(self) -> int:
        """Commands that may leave now: the rest of the current stage (a next stage waits for this one)."""
        if self.done.done() or self.stage >= self.until:
            return 0
        if self.sent < len(self.stages[self.stage]):
            return len(self.stages[self.stage]) - self.sent
        return 0

    def remaining(self) -> list[tuple[int, int]]:
        """(stage, index) of every command not yet sent, in order."""
        if self.stage >= self.until:
            return []
        rest = [(self.stage, i) for i in range(self.sent, len(self.stages[self.stage]))]
        return rest + [(s, i) for s in range(self.stage + 1, self.until) for i in range(len(self.stages[s]))]

    def command(self, at: tuple[int, int]) -> Command:
        return self.stages[at[0]][at[1]]

    def finish(self, error: BaseException | None = None) -> None:
        if self.done.done():
            return
        if error is not None:
            self.done.set_exception(error)
            return
        self.done.set_result([[r or not_run(self.stages[s][i], "an earlier step of this job failed; not sent")
                               for i, r in enumerate(results)] for s, results in enumerate(self.results)])


@dataclass
class BatchCall:
    """One `batch` request: which commands of which parts it carries, in order."""

    write: bool
    halt: bool
    slots: list[tuple[Part, tuple[int, int]]] = field(default_factory=list)
    # What it sends: a read several jobs ask once, point reads of one kind as one list (not when it halts).
    chunk: BatchChunk = field(default_factory=BatchChunk)

    def take(self, part: Part, at: tuple[int, int]) -> None:
        self.chunk.add(part.command(at))
        self.slots.append((part, at))

    @property
    def low(self) -> bool:
        return all(part.low for part, _ in self.slots)


def stops_group(result: CommandResult) -> bool:
    """A command that stops its group: an error other than 'already so' (already bound, not bound any more)."""
    return result.error is not None and policy_for(result.error.code).policy != Policy.DONE


def unpack_batch(chunk: Sequence[Command], result: Any) -> list[CommandResult]:
    # Empty sections arrive as [] rather than {}.
    def section(name: str) -> dict[str, Any]:
        value = (result or {}).get(name) if isinstance(result, dict) else None
        return value if isinstance(value, dict) else {}

    results, errors = section("result"), section("result_error")
    totals, nexts = section("result_total"), section("result_next")
    out = []
    for i, command in enumerate(chunk):
        key = f"c{i}"
        if key in errors:
            err = errors[key] if isinstance(errors[key], dict) else {}
            out.append(CommandResult(command, error=error_for(command.method, err.get("error"),
                                                              err.get("error_description"))))
        elif key in results:
            out.append(CommandResult(command, result=results[key], total=int_or_none(totals.get(key)),
                                     next=int_or_none(nexts.get(key))))
        else:
            out.append(not_run(command))
    return out
