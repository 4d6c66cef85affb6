"""The REST protocol as the fake portal reads and writes it: PHP-style parameters, filters, pages of 50,
the `time` block of every answer and the error envelope (the official docs: GitHub ``bitrix24/b24restdocs``,
``api-reference/`` and ``error-codes.md``). Nothing here knows the CRM.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

PAGE_SIZE = 50

# Filter operators, longest first so ">=" is not read as ">".
_OPERATORS = ("!@", ">=", "<=", "!=", "@", ">", "<", "=", "!")
_INT_RE = re.compile(r"-?\d+")
_KEY_PART_RE = re.compile(r"\[([^\[\]]*)\]")


class BitrixError(Exception):
    """An error answer: ``{"error": code, "error_description": description}`` with an HTTP status."""

    def __init__(self, status: int, code: str | int, description: str) -> None:
        super().__init__(f"{status} {code!r}: {description}")
        self.status, self.code, self.description = status, code, description

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "error_description": self.description}


@dataclass
class Page:
    """One page of a list method; ``total``/``next`` are None when they must be left out."""

    rows: list[dict[str, Any]]
    total: int | None
    next: int | None


# ---------------------------------------------------------------- parameter parsing


def _split_key(key: str) -> list[str]:
    """``filter[>ID]`` -> ``["filter", ">ID"]``; ``select[]`` -> ``["select", ""]``."""
    start = key.find("[")
    if start <= 0:
        return [key]
    parts, pos = [key[:start]], start
    for match in _KEY_PART_RE.finditer(key, start):
        if match.start() != pos:  # PHP ignores anything after a broken bracket sequence
            break
        parts.append(match.group(1))
        pos = match.end()
    return parts


def parse_php_query(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Rebuild nested params from PHP-style keys (``a[b][c]=1``; ``a[]=1`` appends to a list).

    Numeric keys stay string keys of a dict (``{"0": {...}}``); readers accept both shapes.
    """
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = _split_key(key)
        node: Any = root
        for index, part in enumerate(parts[:-1]):
            node = _child(node, part, list if parts[index + 1] == "" else dict)
        if parts[-1] == "" and isinstance(node, list):
            node.append(value)
        else:
            node[parts[-1]] = value
    return root


def _child(node: Any, part: str, kind: type) -> Any:
    if isinstance(node, list):  # "a[][x]": every "[]" starts a new element
        node.append(kind())
        return node[-1]
    if not isinstance(node.get(part), kind):
        node[part] = kind()
    return node[part]


def param(params: Mapping[str, Any], name: str) -> Any:
    """Look a parameter up by name, case-insensitively as Bitrix does for most methods."""
    if name in params:
        return params[name]
    lowered = name.lower()
    return next((v for k, v in params.items() if k.lower() == lowered), None)


def required_int(params: Mapping[str, Any], name: str) -> int:
    """A required integer parameter of the new-style (controller) methods: errors use code 100."""
    value = param(params, name)
    if value is None or value == "":
        raise BitrixError(400, 100, f"Could not find value for parameter {{{name}}}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BitrixError(
            400,
            100,
            f"Invalid value {value} to match with parameter {{{name}}}. Should be value of type int.",
        ) from None


def positive_int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def as_list(value: Any) -> list[Any]:
    """A list sent as JSON (list) or as a PHP form (dict with "0", "1"... keys), or a single item."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and value and all(_INT_RE.fullmatch(str(k)) for k in value):
        return list(value.values())
    return [value]


def truthy(value: Any) -> bool:
    return str(value).strip().lower() in {"1", "true", "y", "yes"}


# ---------------------------------------------------------------- filtering and paging


def norm(value: Any) -> Any:
    """Compare numbers as numbers whether they came as "12" or 12 (Bitrix mixes both)."""
    if isinstance(value, bool):
        return "Y" if value else "N"
    if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
        return int(value)
    return value


def _test(actual: Any, op: str, wanted: Any) -> bool:
    if op in ("@", "!@"):
        found = any(_test(actual, "=", w) for w in as_list(wanted))
        return found if op == "@" else not found
    if op in ("!", "!="):
        return not _test(actual, "=", wanted)
    if isinstance(wanted, (list, dict)):  # {"ID": [1, 2]} means "ID in (1, 2)"
        return _test(actual, "@", wanted)
    a, b = norm(actual), norm(wanted)
    if op == "=":
        return a == b or (a in (None, "", 0) and b in (None, "", 0))
    if a is None or b is None:
        return False
    if not (isinstance(a, int) and isinstance(b, int)):
        a, b = str(a), str(b)  # ISO dates compare correctly as strings
    return bool({">": a > b, ">=": a >= b, "<": a < b, "<=": a <= b}[op])


def _split_operator(key: str) -> tuple[str, str]:
    for op in _OPERATORS:
        if key.startswith(op):
            return op, key[len(op) :].upper()
    return "=", key.upper()


def narrowed(filters: Mapping[str, Any], field: str) -> set[int] | None:
    """The record numbers an equality or IN condition on `field` allows (to look them up rather than
    test every row; `matches` still tests them), or None when the filter does not narrow by it."""
    for key, wanted in filters.items():
        op, name = _split_operator(key)
        if name == field and op in ("=", "@"):
            values = {norm(v) for v in as_list(wanted)}
            if all(isinstance(v, int) and v > 0 for v in values):
                return values
    return None


def known_filter(filters: Mapping[str, Any], fields: set[str] | frozenset[str]) -> dict[str, Any]:
    """The filter as the portal applies it: a key whose field is not in the entity's field list is
    dropped without a word (crm restservice.php, internalizeFilterFields), so the list comes back
    unfiltered by it."""
    return {key: value for key, value in filters.items() if _split_operator(key)[1] in fields}


def matches(row: Mapping[str, Any], filters: Mapping[str, Any]) -> bool:
    for key, wanted in filters.items():
        op, field = _split_operator(key)
        if not _test(row.get(field), op, wanted):
            return False
    return True


def _sort_key(value: Any) -> tuple[int, Any]:
    value = norm(value)
    if value is None:
        return (2, "")
    return (0, value) if isinstance(value, int) else (1, str(value))


def _field_sort_key(field: str) -> Callable[[Mapping[str, Any]], tuple[int, Any]]:
    return lambda row: _sort_key(row.get(field))


def paged(rows: list[dict[str, Any]], params: Mapping[str, Any]) -> Page:
    """Order and cut one page of 50 the way every Bitrix list method does."""
    order = param(params, "order")
    order = order if isinstance(order, dict) and order else {"ID": "ASC"}
    for field, direction in reversed(list(order.items())):  # stable sorts: last key first
        rows.sort(key=_field_sort_key(field.upper()), reverse=str(direction).upper() == "DESC")
    start = norm(param(params, "start")) or 0
    start = start if isinstance(start, int) else 0
    if start == -1:  # the fast form: no COUNT, so no next, and a total of 0 whatever the rows (IRestService)
        return Page(rows[:PAGE_SIZE], 0, None)
    start = max(start, 0)
    if start >= len(rows):  # a page past the end is page 1 again (main's CDBResult), not an empty page
        start = 0
    following = start + PAGE_SIZE
    return Page(rows[start:following], len(rows), following if following < len(rows) else None)


def selected(page: Page, params: Mapping[str, Any], multiple: tuple[str, ...] = ()) -> Page:
    """Only the fields `select` names (ID always); "*" or no select means every single-valued field."""
    wanted = {str(f).upper() for f in as_list(param(params, "select"))}
    keep: Callable[[str], bool] = (lambda k: k not in multiple or k in wanted) if not wanted or "*" in wanted \
        else (lambda k: k in wanted or k == "ID")
    page.rows = [{k: v for k, v in row.items() if keep(k)} for row in page.rows]
    return page


def filter_of(params: Mapping[str, Any]) -> dict[str, Any]:
    value = param(params, "filter")
    return value if isinstance(value, dict) else {}


def time_info(start: float, finish: float, operating: float = 0.0,
               reset_at: float | None = None) -> dict[str, Any]:
    def iso(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).astimezone().isoformat(timespec="seconds")

    return {
        "start": start,
        "finish": finish,
        "duration": finish - start,
        "processing": finish - start,
        "date_start": iso(start),
        "date_finish": iso(finish),
        "operating": round(operating, 3),
        "operating_reset_at": math.ceil(reset_at if reset_at is not None else start + 600),
    }
