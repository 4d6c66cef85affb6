"""What a job asks of a portal (`Command`) and what comes back (`CommandResult`, `Answer`)."""
from __future__ import annotations

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
