"""What one `batch` sends for the commands packed into it: point reads of one kind as one list.

Jobs read one record at a time: a lead, the contact made from it, whether a record a plan binds to
still exists. In a `batch` shared by many jobs these are many commands of one shape that differ in
one number; a CRM list method takes them all at once with an IN filter (`"@LEAD_ID": [...]`, docs:
api-reference/crm/contacts/crm-contact-list.md, "Possible prefix values"). So a `BatchChunk`:

- sends a read that several jobs ask once;
- merges `.list` reads filtered by one `*ID` field equal to a number (`{"filter": {"LEAD_ID": 7},
  "select": ["ID"]}`) into one list by `@LEAD_ID`, and gives each its own rows;
- merges `.get` reads that name the fields they use (`Command("crm.lead.get", {"id": 7},
  fields=(...))`) into one list by `@ID`, and gives each its row.

The answers stay the portal's own: a record missing from a merged list (deleted, or hidden from the
webhook's user) and a merged list with more rows than its page leave their commands to be asked
alone (`answers` says which), so a caller sees exactly what the command alone would have got.
Merging is only for calls that do not halt: a `.get` of a missing record must stop a halting call.

A portal drops a filter on a field it does not know and answers the whole table (crm restservice.php):
so every row of a merged list must carry one of the numbers asked, or every command of it gets the
error LIST_NOT_FILTERED, and nothing is done on an unfiltered table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.bitrix.commands import BATCH_LIMIT, Command, CommandResult
from app.bitrix.errors import POLICIES, PermanentError

# The CRM records whose list methods take `@FIELD` filters and whose reads jobs make one by one.
MERGEABLE = ("crm.lead", "crm.contact", "crm.company", "crm.deal", "crm.activity")
_FIELD = re.compile(r"ID|[A-Z][A-Z0-9_]*_ID")  # a bare field name (no operator prefix) that holds an ID


def read_key(command: Command) -> bytes | None:
    """What makes two reads the same read (None for a write: two jobs' writes are two writes)."""
    if command.method.endswith((".get", ".list")):
        return command.method.encode() + b"?" + _json(command.params) + b"|" + ",".join(command.fields).encode()
    return None


@dataclass(frozen=True)
class Shape:
    """What point reads must share to go as one list: the list method, the field, what they select."""

    method: str
    field: str
    select: tuple[str, ...]
    get: bool  # a `.get` (one row, by ID) rather than a list


def shape_of(command: Command) -> tuple[Shape, int] | None:
    """The shape of a point read and the number it reads by, or None if it is no point read."""
    record, _, verb = command.method.rpartition(".")
    if record not in MERGEABLE:
        return None
    params = command.params
    if verb == "get" and command.fields and set(params) == {"id"} and _is_id(params["id"]):
        return Shape(record + ".list", "ID", tuple(dict.fromkeys(("ID", *command.fields))), get=True), int(params["id"])
    if verb != "list" or command.fields or not set(params) <= {"filter", "select", "order", "start"}:
        return None
    filter, select = params.get("filter"), params.get("select", [])
    if not (isinstance(filter, dict) and len(filter) == 1 and isinstance(select, list)):
        return None
    ((name, value),) = filter.items()
    if not (isinstance(name, str) and _FIELD.fullmatch(name) and _is_id(value)):
        return None
    if params.get("order", {"ID": "ASC"}) != {"ID": "ASC"} or params.get("start", 0) not in (0, -1):
        return None
    return Shape(command.method, name, tuple(str(s) for s in select), get=False), int(value)


@dataclass
class _Merged:
    shape: Shape
    first: Command  # sent as it is while it is alone: a list of one would gain nothing
    values: dict[int, None] = field(default_factory=dict)  # ordered, each once

    @property
    def alone(self) -> bool:
        return len(self.values) == 1

    def command(self) -> Command:
        if self.alone:
            return self.first
        select = list(self.shape.select)
        if select and "*" not in select and self.shape.field not in select:
            select.append(self.shape.field)  # to tell whose each row is
        # By ID a number has one row at most, so 50 fit a page and the fast form (no count) will do; by
        # another field the count (`next`) tells whether the page held every row.
        params: dict[str, Any] = {"filter": {f"@{self.shape.field}": list(self.values)}, "order": {"ID": "ASC"},
                                  "start": -1 if self.shape.field == "ID" else 0}
        if select:
            params["select"] = select
        return Command(self.shape.method, params)

    def answer(self, asked: Command, value: int, result: CommandResult) -> CommandResult | None:
        """The asked read's answer out of the merged list's, or None when it must be asked alone."""
        if result.error is not None:
            return CommandResult(asked, error=result.error)
        rows = result.result if isinstance(result.result, list) else []
        stray = unfiltered(self.shape.method, rows, self.shape.field, self.values)
        if stray is not None:
            return CommandResult(asked, error=stray)
        if self.shape.get:
            row = next((r for r in rows if _number(r.get("ID")) == value), None)
            return CommandResult(asked, result=row) if row is not None else None
        if result.next is not None or (result.total or 0) > len(rows):
            return None  # more rows than a page: each asks alone (rare: a lead makes one contact)
        hidden = self.shape.field not in self.shape.select and self.shape.select and "*" not in self.shape.select
        mine = [{k: v for k, v in row.items() if not (hidden and k == self.shape.field)}
                for row in rows if _number(row.get(self.shape.field)) == value]
        return CommandResult(asked, result=mine, total=len(mine))


@dataclass
class BatchChunk:
    """The commands one `batch` sends for the commands asked of it, in order (see the module's docstring)."""

    merge: bool = True
    limit: int = BATCH_LIMIT
    _sent: list[Command | _Merged] = field(default_factory=list)
    _asked: list[Command] = field(default_factory=list)
    _where: list[tuple[int, int | None]] = field(default_factory=list)  # per asked: entry sent, value read
    _reads: dict[bytes, tuple[int, int | None]] = field(default_factory=dict)
    _open: dict[Shape, int] = field(default_factory=dict)  # a shape's merged list that has room

    @property
    def size(self) -> int:
        """Commands the `batch` sends."""
        return len(self._sent)

    def fits(self, command: Command) -> bool:
        return self.size + self._cost(command) <= self.limit

    def add(self, command: Command) -> None:
        key = read_key(command)
        where = self._reads.get(key) if key is not None else None
        if where is None:
            shaped = shape_of(command) if self.merge else None
            where = self._add_merged(command, *shaped) if shaped else self._add_alone(command)
            if key is not None:
                self._reads[key] = where
        self._asked.append(command)
        self._where.append(where)

    def commands(self) -> list[Command]:
        return [entry.command() if isinstance(entry, _Merged) else entry for entry in self._sent]

    def answers(self, sent: list[CommandResult]) -> list[CommandResult | None]:
        """Each asked command's answer, given the answers of what was sent; None: ask it alone."""
        out: list[CommandResult | None] = []
        for asked, (index, value) in zip(self._asked, self._where):
            entry, result = self._sent[index], sent[index]
            if isinstance(entry, _Merged) and not entry.alone and value is not None:
                out.append(entry.answer(asked, value, result))
            else:
                out.append(CommandResult(asked, result.result, result.error, result.total, result.next))
        return out

    def _cost(self, command: Command) -> int:
        key = read_key(command)
        if key is not None and key in self._reads:
            return 0
        shaped = shape_of(command) if self.merge else None
        if shaped is None:
            return 1
        open_ = self._open.get(shaped[0])
        if open_ is None:
            return 1
        values = self._merged(open_).values
        return 0 if shaped[1] in values or len(values) < self.limit else 1

    def _add_alone(self, command: Command) -> tuple[int, None]:
        self._sent.append(command)
        return len(self._sent) - 1, None

    def _add_merged(self, command: Command, shape: Shape, value: int) -> tuple[int, int]:
        index = self._open.get(shape)
        if index is None or (value not in self._merged(index).values
                             and len(self._merged(index).values) >= self.limit):
            self._sent.append(_Merged(shape, command))
            index = self._open[shape] = len(self._sent) - 1
        self._merged(index).values[value] = None
        return index, value

    def _merged(self, index: int) -> _Merged:
        entry = self._sent[index]
        assert isinstance(entry, _Merged)
        return entry


def unfiltered(method: str, rows: list[Any], field: str, wanted: dict[int, None] | set[int]) -> PermanentError | None:
    """The error for a list whose rows are not all among those its filter asked (`field` in `wanted`):
    the portal ignored the filter (an unknown field is dropped without a word). None when all are."""
    stray = [row.get(field) if isinstance(row, dict) else row for row in rows
             if not isinstance(row, dict) or _number(row.get(field)) not in wanted]
    if not stray:
        return None
    shown = ", ".join(str(value) for value in stray[:3]) + (", ..." if len(stray) > 3 else "")
    return PermanentError(method, "LIST_NOT_FILTERED",
                          f"asked for {field} in {sorted(wanted)[:5]}, the portal answered {len(stray)} other row(s) "
                          f"({field} {shown})", hint=POLICIES["LIST_NOT_FILTERED"].hint)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _json(payload: dict[str, Any]) -> bytes:
    return orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS)
