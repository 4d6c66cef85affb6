"""What a job asks of a portal (`Command`), what comes back (`CommandResult`, `Answer`) and what the job
spent (`Meter`)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from app.bitrix.errors import B24Error

BATCH_LIMIT = 50  # commands per batch call (docs: settings/how-to-call-rest-api/batch.md)
PAGE_SIZE = 50  # rows per page of every list method


@dataclass(frozen=True)
class Answer:
    result: Any
    total: int | None = None
    next: int | None = None
    time: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    # For a `.get`: the fields its caller uses. Then a batch may read it with others of its kind in
    # one list (app/bitrix/merge.py) and answer it with only those fields.
    fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class CommandResult:
    command: Command
    result: Any = None
    error: B24Error | None = None
    total: int | None = None
    next: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(eq=False)
class Meter:
    """What one job spent: the requests that carried its commands, and its commands."""

    requests: int = 0
    commands: int = 0
    # For metrics: (method, outcome, via); via "batch" is a command inside a batch, "request" an HTTP request.
    calls: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    waiting: int = 0  # parts of this job queued or on their way
    # Asked before each call carrying this job's writes: whether the job still holds what makes the writes
    # its own to send (its lead's lock). No: they are not sent, and the job learns it (`NotHeld`).
    guard: Callable[[], Awaitable[bool]] | None = None
