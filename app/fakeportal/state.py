"""An in-memory Bitrix24 portal served over real HTTP, for the test suite and the `demo` mode.

`FakePortal` answers the inbound-webhook URL form ``/rest/{user_id}/{code}/{method}[.json]`` with
the same envelopes, HTTP statuses and error codes as the cloud portal (the official docs: GitHub
``bitrix24/b24restdocs``, ``error-codes.md`` and the methods' pages under ``api-reference/crm/``), for the small set of CRM methods the service uses:
activity bindings, activity/lead/contact/company/deal reads and lists, timeline comments and their
bindings, duplicate search and ``batch``. It also enforces the portal-wide leaky-bucket request
limit and lets a test inject failures (5xx, ``QUERY_LIMIT_EXCEEDED``, HTML error pages).

State is plain Python (dicts of string-valued fields, like Bitrix returns them) so tests can set it
up and inspect it directly through the synchronous helpers (`add_lead`, `convert_lead`, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from json import JSONDecodeError
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from aiohttp import web

LEAD, DEAL, CONTACT, COMPANY = 1, 2, 3, 4
QUOTE, SMART_INVOICE = 7, 31  # other types an activity may be bound to; smart processes are 128+ and 1030+
TYPE_NAMES = {LEAD: "lead", DEAL: "deal", CONTACT: "contact", COMPANY: "company"}
CLIENT_TYPES = (CONTACT, COMPANY)  # never the owner while another binding exists (appendOwnerFromBindings)
PAGE_SIZE = 50
MAX_BATCH = 50
MAX_BINDINGS = 100
FINDBYCOMM_LIMIT = 20
COMPLETABLE_TYPES = ("1", "2", "6")  # meeting, call, task/to-do: completed when their lead closes

Binding = tuple[int, int]  # (entityTypeId, entityId)

# Filter operators, longest first so ">=" is not read as ">".
_OPERATORS = ("!@", ">=", "<=", "!=", "@", ">", "<", "=", "!")
_INT_RE = re.compile(r"-?\d+")
_KEY_PART_RE = re.compile(r"\[([^\[\]]*)\]")
_SEMANTICS = {"CONVERTED": "S", "JUNK": "F"}  # any other lead status is "in progress" (P)
_SYSTEM_ERRORS = {
    "INTERNAL_SERVER_ERROR": "Internal server error",
    "QUERY_LIMIT_EXCEEDED": "Too many requests",
    "ERROR_UNEXPECTED_ANSWER": "Server returned an unexpected response",
    "OPERATION_TIME_LIMIT": "Method is blocked due to operation time limit.",
}


class BitrixError(Exception):
    """An error answer: ``{"error": code, "error_description": description}`` with an HTTP status."""

    def __init__(self, status: int, code: str | int, description: str) -> None:
        super().__init__(f"{status} {code!r}: {description}")
        self.status, self.code, self.description = status, code, description

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "error_description": self.description}


class RequestRecord(NamedTuple):
    """One HTTP request that passed authentication; ``n_commands`` is the batch size (1 otherwise)."""

    method: str
    n_commands: int


@dataclass
class Page:
    """One page of a list method; ``total``/``next`` are None when they must be left out."""

    rows: list[dict[str, Any]]
    total: int | None
    next: int | None


@dataclass
class _Fault:
    status: int
    error: str
    description: str
    html: bool = False


class LeakyBucket:
    """The portal-wide request limit: holds `burst` requests and drains `per_second` of them."""

    def __init__(self, per_second: float, burst: int, clock: Callable[[], float]) -> None:
        self.per_second, self.burst, self.clock = per_second, burst, clock
        self.level = 0.0
        self._last = clock()

    def try_take(self) -> bool:
        now = self.clock()
        self.level = max(0.0, self.level - (now - self._last) * self.per_second)
        self._last = now
        if self.level + 1 > self.burst:
            return False
        self.level += 1
        return True


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


def _param(params: Mapping[str, Any], name: str) -> Any:
    """Look a parameter up by name, case-insensitively as Bitrix does for most methods."""
    if name in params:
        return params[name]
    lowered = name.lower()
    return next((v for k, v in params.items() if k.lower() == lowered), None)


def _required_int(params: Mapping[str, Any], name: str) -> int:
    """A required integer parameter of the new-style (controller) methods: errors use code 100."""
    value = _param(params, name)
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


def _positive_int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _items(value: Any) -> list[Any]:
    """A list sent as JSON (list) or as a PHP form (dict with "0", "1"... keys), or a single item."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and value and all(_INT_RE.fullmatch(str(k)) for k in value):
        return list(value.values())
    return [value]


def _binding_pairs(value: Any) -> set[Binding]:
    """``[{"OWNER_TYPE_ID": 1, "OWNER_ID": 5}, ...]`` (JSON or PHP form) as a set of pairs."""
    pairs = set()
    for item in _items(value):
        if isinstance(item, dict):
            type_id, entity_id = (
                _positive_int(_param(item, "OWNER_TYPE_ID")),
                _positive_int(_param(item, "OWNER_ID")),
            )
            if type_id is not None and entity_id is not None:
                pairs.add((type_id, entity_id))
    return pairs


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in {"1", "true", "y", "yes"}


# ---------------------------------------------------------------- filtering and paging


def _norm(value: Any) -> Any:
    """Compare numbers as numbers whether they came as "12" or 12 (Bitrix mixes both)."""
    if isinstance(value, bool):
        return "Y" if value else "N"
    if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
        return int(value)
    return value


def _test(actual: Any, op: str, wanted: Any) -> bool:
    if op in ("@", "!@"):
        found = any(_test(actual, "=", w) for w in _items(wanted))
        return found if op == "@" else not found
    if op in ("!", "!="):
        return not _test(actual, "=", wanted)
    if isinstance(wanted, (list, dict)):  # {"ID": [1, 2]} means "ID in (1, 2)"
        return _test(actual, "@", wanted)
    a, b = _norm(actual), _norm(wanted)
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


def _matches(row: Mapping[str, Any], filters: Mapping[str, Any]) -> bool:
    for key, wanted in filters.items():
        op, field = _split_operator(key)
        if not _test(row.get(field), op, wanted):
            return False
    return True


def _sort_key(value: Any) -> tuple[int, Any]:
    value = _norm(value)
    if value is None:
        return (2, "")
    return (0, value) if isinstance(value, int) else (1, str(value))


def _field_sort_key(field: str) -> Callable[[Mapping[str, Any]], tuple[int, Any]]:
    return lambda row: _sort_key(row.get(field))


def _page(rows: list[dict[str, Any]], params: Mapping[str, Any]) -> Page:
    """Order and cut one page of 50 the way every Bitrix list method does."""
    order = _param(params, "order")
    order = order if isinstance(order, dict) and order else {"ID": "ASC"}
    for field, direction in reversed(list(order.items())):  # stable sorts: last key first
        rows.sort(key=_field_sort_key(field.upper()), reverse=str(direction).upper() == "DESC")
    start = _norm(_param(params, "start")) or 0
    start = start if isinstance(start, int) else 0
    if start == -1:  # the fast form: no COUNT, so no next, and a total of 0 whatever the rows (IRestService)
        return Page(rows[:PAGE_SIZE], 0, None)
    start = max(start, 0)
    following = start + PAGE_SIZE
    return Page(rows[start:following], len(rows), following if following < len(rows) else None)


def _selected(page: Page, params: Mapping[str, Any], multiple: tuple[str, ...] = ()) -> Page:
    """Only the fields `select` names (ID always); "*" or no select means every single-valued field."""
    wanted = {str(f).upper() for f in _items(_param(params, "select"))}
    keep: Callable[[str], bool] = (lambda k: k not in multiple or k in wanted) if not wanted or "*" in wanted \
        else (lambda k: k in wanted or k == "ID")
    page.rows = [{k: v for k, v in row.items() if keep(k)} for row in page.rows]
    return page


def _filter_of(params: Mapping[str, Any]) -> dict[str, Any]:
    value = _param(params, "filter")
    return value if isinstance(value, dict) else {}


def _stringify(value: Any) -> Any:
    """Field values as Bitrix returns them: numbers as strings, booleans as Y/N."""
    if isinstance(value, bool):
        return "Y" if value else "N"
    if isinstance(value, (int, float)):
        return str(value)
    return value


def _multifield(kind: str, value: Any) -> list[dict[str, str]]:
    """EMAIL/PHONE as a Bitrix multi-field: ``[{"VALUE": ..., "VALUE_TYPE": "WORK", ...}]``."""
    out = []
    for item in _items(value):
        text = item.get("VALUE") if isinstance(item, dict) else item
        if text:
            out.append({"TYPE_ID": kind, "VALUE": str(text), "VALUE_TYPE": "WORK"})
    return out


def _comm_key(kind: str, value: str) -> str:
    """Duplicate search ignores case in e-mails and formatting in phone numbers."""
    return re.sub(r"\D", "", value) if kind == "PHONE" else value.strip().lower()


def _now_iso() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")


def _time_info(start: float, finish: float, operating: float = 0.0,
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


def _owner_of(bindings: list[Binding]) -> Binding:
    """appendOwnerFromBindings: the last binding that is not a contact or company, else the first."""
    others = [b for b in bindings if b[0] not in CLIENT_TYPES]
    return others[-1] if others else bindings[0]


def _type_label(entity_type_id: int) -> str:
    return TYPE_NAMES.get(entity_type_id, f"entity type {entity_type_id}")


# ---------------------------------------------------------------- the portal


class FakePortal:
    """A Bitrix24 portal with an inbound webhook, in memory, behind a real aiohttp server."""

    def __init__(
        self,
        webhook_code: str = "demo0secret0code",
        user_id: int = 1,
        per_second: float | None = 2.0,
        burst: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.webhook_code, self.user_id, self.clock = webhook_code, user_id, clock
        self.leads: dict[int, dict[str, Any]] = {}
        self.deals: dict[int, dict[str, Any]] = {}
        self.contacts: dict[int, dict[str, Any]] = {}
        self.companies: dict[int, dict[str, Any]] = {}
        self.activities: dict[int, dict[str, Any]] = {}
        self.activity_bindings: dict[int, set[Binding]] = {}
        self._binding_order: dict[int, list[Binding]] = {}  # the portal's bindings table keeps insertion order
        self.items: dict[int, dict[int, dict[str, Any]]] = {}  # quotes, smart invoices, smart-process items
        # What the portal would send to outbound webhooks, in order: (event, id).
        self.events: list[tuple[str, int]] = []
        # Broken invariants a real portal would let through silently (a binding to a record that does
        # not exist): the service must never cause one, and the test fixtures assert this stays empty.
        self.violations: list[str] = []
        # Off by default: records the webhook's user may not read or change (set_access_denied).
        self.unreadable: set[Binding] = set()
        self._before_requests: deque[tuple[str, Callable[[], None]]] = deque()
        self.scopes = ["crm", "user_brief"]  # the webhook's scopes, as `scope` answers
        self.crm_mode = 1  # crm.settings.mode.get: 1 classic, 2 simple (no leads)
        self.bindings_filter_ignored = False  # an old portal: crm.activity.list ignores filter[BINDINGS]
        self.binding_history: dict[int, list[tuple[Binding, ...]]] = {}
        self.comments: dict[int, dict[str, Any]] = {}
        self.comment_binding_sets: dict[int, set[tuple[str, int]]] = {}
        self.requests: list[RequestRecord] = []
        self._next_ids: dict[str, int] = {}
        self._faults: deque[_Fault] = deque()
        self._lost_answers: deque[str] = deque()
        self._stalls: deque[float] = deque()
        self._closing = asyncio.Event()  # ends the stalls: close() does not wait for them
        # The per-method server-time budget (limits.md): off unless a test sets it.
        self.operating_limit: float | None = None
        self.operating_cost = 0.0
        self.operating_window = 600.0
        self.charge_batch = False
        self._charging = False  # inside a batch whose time is charged to `batch`
        self._operating: dict[str, deque[tuple[float, float]]] = {}
        self._operating_sums: dict[str, float] = {}
        # Indexes, so that the lists the service filters on cost what they cost a real portal's
        # database, not a scan of every row (benchmarks run thousands of leads).
        self._by_lead: dict[int, dict[int, set[int]]] = {CONTACT: {}, COMPANY: {}, DEAL: {}}
        self._bound: dict[Binding, set[int]] = {}
        self.offline_events: list[dict[str, Any]] = []
        self.access_tokens: dict[str, float] = {}  # application mode: token -> expiry
        self.refresh_tokens: set[str] = set()
        self.oauth_client: tuple[str, str] | None = None
        self.oauth_refreshes = 0
        self.application_token = ""
        self._random_failures = 0.0
        self._random = random.Random(0)
        self.refused_for_rate = 0  # QUERY_LIMIT_EXCEEDED answers given
        self.blocked_for_time = 0  # OPERATION_TIME_LIMIT answers given
        self.counted_lists: Counter[str] = Counter()
        self.method_calls: Counter[str] = Counter()  # every method run, inside a batch or not
        self._bucket: LeakyBucket | None = None
        self.set_rate_limit(per_second, burst)
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.extra_routes: list[tuple[str, str, Any]] = []  # the demo's control routes
        self._methods: dict[str, Callable[[Mapping[str, Any]], Any]] = self._method_table()

    # -------------------------------------------------------- server lifecycle

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/rest/{user_id}/{code}/{method}", self._handle)
        app.router.add_route("*", "/rest/{method}", self._handle_app)
        app.router.add_get("/oauth/token/", self._oauth_token)
        for method, path, handler in self.extra_routes:
            app.router.add_route(method, path, handler)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._closing = asyncio.Event()
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_port = self._runner.addresses[0][1]  # port=0 lets the OS pick a free one
        self.base_url = f"http://{host}:{bound_port}"

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakePortal:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def rest_url(self) -> str:
        return f"{self.base_url}/rest/{self.user_id}/{self.webhook_code}/"

    # -------------------------------------------------------- counters and fault injection

    @property
    def request_count(self) -> int:
        return len(self.requests)

    def reset_counters(self) -> None:
        self.requests.clear()

    def fail_next(
        self, n: int, status: int = 500, error: str = "INTERNAL_SERVER_ERROR", description: str | None = None
    ) -> None:
        """Answer the next `n` authenticated requests with this error, doing nothing else."""
        text = description if description is not None else _SYSTEM_ERRORS.get(error, error)
        self._faults.extend(_Fault(status, error, text) for _ in range(n))

    def fail_randomly(self, rate: float, seed: int = 0) -> None:
        """Answer this share of requests (0..1) with a 500 before doing anything, as a flaky portal does."""
        self._random_failures, self._random = rate, random.Random(seed)

    def lose_answers(self, n: int, containing: str = "") -> None:
        """The next n requests whose method and params mention `containing` run, then answer 500."""
        self._lost_answers.extend([containing] * n)

    def before_request(self, containing: str, action: Callable[[], None]) -> None:
        """Run `action` just before serving the next request whose method and params mention `containing`:
        a person changing the CRM between the service's read and its write."""
        self._before_requests.append((containing, action))

    def stall_next(self, n: int, seconds: float) -> None:
        """The next `n` requests wait this long before being served, as an overloaded portal does."""
        self._stalls.extend([seconds] * n)

    def html_next(self, n: int, status: int = 502) -> None:
        """Answer the next `n` requests with an HTML page, as a proxy in front of the portal would."""
        self._faults.extend(_Fault(status, "", "", html=True) for _ in range(n))

    def set_rate_limit(self, per_second: float | None, burst: int = 50) -> None:
        self._bucket = None if per_second is None else LeakyBucket(per_second, burst, self.clock)

    # -------------------------------------------------------- synchronous helpers for tests and demo

    def _new_id(self, kind: str) -> int:
        self._next_ids[kind] = self._next_ids.get(kind, 0) + 1
        return self._next_ids[kind]

    def table(self, entity_type_id: int) -> dict[int, dict[str, Any]]:
        tables = {LEAD: self.leads, DEAL: self.deals, CONTACT: self.contacts, COMPANY: self.companies}
        if entity_type_id not in tables:
            raise KeyError(f"unsupported entity type {entity_type_id}")
        return tables[entity_type_id]

    def entity_exists(self, entity_type_id: int, entity_id: int) -> bool:
        if entity_type_id in TYPE_NAMES:
            return entity_id in self.table(entity_type_id)
        return entity_id in self.items.get(entity_type_id, {})

    def _insert(self, entity_type_id: int, fields: Mapping[str, Any]) -> int:
        new_id = self._new_id(TYPE_NAMES[entity_type_id])
        now = _now_iso()
        row: dict[str, Any] = {"ID": str(new_id), "DATE_CREATE": now, "DATE_MODIFY": now}
        row.update(self._clean_fields(fields))
        row["ID"] = str(new_id)
        self.table(entity_type_id)[new_id] = row
        self._index_lead_id(entity_type_id, new_id, None)
        self.events.append((f"ONCRM{TYPE_NAMES[entity_type_id].upper()}ADD", new_id))
        return new_id

    def add_item(self, entity_type_id: int, title: str = "Item") -> int:
        """A record of another type an activity can be bound to: a quote (7), a smart invoice (31), a
        smart-process item (128+, 1030+). Only its existence matters to the service."""
        if entity_type_id in TYPE_NAMES:
            raise ValueError("use add_lead/add_contact/add_company/add_deal for the four main types")
        new_id = self._new_id(f"item{entity_type_id}")
        self.items.setdefault(entity_type_id, {})[new_id] = {"id": new_id, "title": title}
        return new_id

    def delete_entity(self, entity_type_id: int, entity_id: int) -> None:
        """Delete a record as a person does in the UI: its bindings go with it, and an activity left with
        no binding is deleted too. Leads, deals and contacts that named it stop naming it."""
        if entity_type_id in TYPE_NAMES:
            del self.table(entity_type_id)[entity_id]
            for ids in self._by_lead.get(entity_type_id, {}).values():
                ids.discard(entity_id)
        else:
            del self.items[entity_type_id][entity_id]
        field = {CONTACT: "CONTACT_ID", COMPANY: "COMPANY_ID"}.get(entity_type_id)
        if field:
            for table in (self.leads, self.deals, self.contacts):
                for row in table.values():
                    if _norm(row.get(field)) == entity_id:
                        row[field] = None
        gone = (entity_type_id, entity_id)
        for activity_id in sorted(self._bound.get(gone, set())):
            left = [b for b in self._binding_order[activity_id] if b != gone]
            if left:
                self._set_bindings(activity_id, left)
            else:
                self._bound[gone].discard(activity_id)
                del self.activities[activity_id], self.activity_bindings[activity_id]
                del self._binding_order[activity_id]
        name = TYPE_NAMES.get(entity_type_id)
        for comment_id, bindings in list(self.comment_binding_sets.items()):
            bindings.discard((name or "", entity_id))
            if not bindings:
                del self.comment_binding_sets[comment_id], self.comments[comment_id]
        self.events.append((f"ONCRM{(name or 'item').upper()}DELETE", entity_id))

    def delete_activity(self, activity_id: int) -> None:
        """Delete an activity as a person does in the UI."""
        for binding in self._binding_order.pop(activity_id):
            self._bound[binding].discard(activity_id)
        del self.activities[activity_id], self.activity_bindings[activity_id]
        self.events.append(("ONCRMACTIVITYDELETE", activity_id))

    def set_access_denied(self, records: Iterable[Binding]) -> None:
        """The webhook's user has no rights on these records (off by default): lists leave them out,
        crm.activity.binding.list hides bindings to them, reads answer "Access denied." and writes
        ACCESS_DENIED, as a portal does for a webhook made by a user without full CRM rights."""
        self.unreadable = set(records)

    def check_invariants(self) -> list[str]:
        """The violations so far, and any activity now bound to a record that does not exist."""
        dangling = [f"activity {a} is bound to {_type_label(t)} {i}, which does not exist"
                    for a, bindings in self._binding_order.items() for t, i in bindings
                    if not self.entity_exists(t, i)]
        return [*self.violations, *(d for d in dangling if d not in self.violations)]

    def _index_lead_id(self, entity_type_id: int, entity_id: int, old_lead_id: Any) -> None:
        index = self._by_lead.get(entity_type_id)
        if index is None:
            return
        index.get(_norm(old_lead_id), set()).discard(entity_id)
        lead_id = _norm(self.table(entity_type_id)[entity_id].get("LEAD_ID"))
        if lead_id is not None:
            index.setdefault(lead_id, set()).add(entity_id)

    @staticmethod
    def _clean_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in fields.items():
            key = key.upper()
            out[key] = _multifield(key, value) if key in ("EMAIL", "PHONE") else _stringify(value)
        return out

    def add_lead(
        self,
        title: str = "Lead",
        status: str = "NEW",
        name: str | None = None,
        email: str | None = None,
        phone: str | None = None,
        contact_id: int | None = None,
        company_id: int | None = None,
    ) -> int:
        """A lead; `contact_id`/`company_id` make it a repeat lead of a known client, as the portal
        makes one when a known client writes in (IS_RETURN_CUSTOMER)."""
        return self._insert(
            LEAD,
            {
                "TITLE": title,
                "NAME": name,
                "STATUS_ID": status,
                "STATUS_SEMANTIC_ID": _SEMANTICS.get(status, "P"),
                "CONTACT_ID": contact_id,
                "COMPANY_ID": company_id,
                "IS_RETURN_CUSTOMER": "Y" if contact_id or company_id else "N",
                "EMAIL": email,
                "PHONE": phone,
            },
        )

    def add_contact(
        self,
        name: str = "Contact",
        lead_id: int | None = None,
        email: str | None = None,
        phone: str | None = None,
        company_id: int | None = None,
    ) -> int:
        return self._insert(
            CONTACT,
            {"NAME": name, "LEAD_ID": lead_id, "EMAIL": email, "PHONE": phone, "COMPANY_ID": company_id},
        )

    def add_company(
        self,
        title: str = "Company",
        lead_id: int | None = None,
        email: str | None = None,
        phone: str | None = None,
    ) -> int:
        return self._insert(COMPANY, {"TITLE": title, "LEAD_ID": lead_id, "EMAIL": email, "PHONE": phone})

    def add_deal(
        self,
        title: str = "Deal",
        lead_id: int | None = None,
        contact_id: int | None = None,
        company_id: int | None = None,
    ) -> int:
        return self._insert(
            DEAL,
            {
                "TITLE": title,
                "STAGE_ID": "NEW",
                "LEAD_ID": lead_id,
                "CONTACT_ID": contact_id,
                "COMPANY_ID": company_id,
            },
        )

    def update_lead(self, lead_id: int, **fields: Any) -> None:
        """Change lead fields; STATUS_SEMANTIC_ID and DATE_MODIFY follow, as on the portal."""
        lead = self.leads[lead_id]
        was_final = lead.get("STATUS_SEMANTIC_ID") in ("S", "F")
        lead.update(self._clean_fields(fields))
        if "STATUS_ID" in {k.upper() for k in fields}:
            lead["STATUS_SEMANTIC_ID"] = _SEMANTICS.get(lead["STATUS_ID"], "P")
        lead["DATE_MODIFY"] = _now_iso()
        self.events.append(("ONCRMLEADUPDATE", lead_id))
        if lead["STATUS_SEMANTIC_ID"] in ("S", "F") and not was_final:
            self._complete_open_activities((LEAD, lead_id))

    def _complete_open_activities(self, owner: Binding) -> None:
        """A lead reaching a final status completes its open activities of the kinds that can be completed
        (CCrmLead), a burst of ONCRMACTIVITYUPDATE. Which kinds exactly is not documented: the fake takes
        meetings, calls and to-dos, and leaves e-mails (completed when read) alone."""
        for activity_id in sorted(self._bound.get(owner, set())):
            activity = self.activities[activity_id]
            if activity["COMPLETED"] == "N" and activity["TYPE_ID"] in COMPLETABLE_TYPES:
                activity["COMPLETED"], activity["LAST_UPDATED"] = "Y", _now_iso()
                self.events.append(("ONCRMACTIVITYUPDATE", activity_id))

    def convert_lead(
        self, lead_id: int, contact: bool = True, company: bool = True, deal: bool = False
    ) -> dict[str, int | None]:
        """Convert as the portal's UI and robots do (crm/lib/conversion/leadconverter.php).

        Company, contact and deal are made in that order with LEAD_ID set, then every activity and
        timeline comment of the lead gets a binding to *each* of them: a copy, the lead binding stays,
        and no ONCRMACTIVITYUPDATE fires for it. Then the lead is closed (ONCRMLEADUPDATE).

        A repeat lead (one made with `contact_id`/`company_id` of a known client) makes only a deal,
        whatever is asked: the client exists already and gets nothing attached.
        """
        lead = self.leads[lead_id]
        repeat = lead.get("IS_RETURN_CUSTOMER") == "Y"
        emails = [f["VALUE"] for f in lead.get("EMAIL") or []]
        phones = [f["VALUE"] for f in lead.get("PHONE") or []]
        created: dict[str, int | None] = {"contact": None, "company": None, "deal": None}
        if company and not repeat:
            created["company"] = self._insert(
                COMPANY, {"TITLE": lead.get("COMPANY_TITLE") or lead.get("TITLE"), "LEAD_ID": lead_id}
            )
        if contact and not repeat:
            created["contact"] = self._insert(
                CONTACT,
                {
                    "NAME": lead.get("NAME") or lead.get("TITLE"),
                    "LEAD_ID": lead_id,
                    "EMAIL": emails,
                    "PHONE": phones,
                    "COMPANY_ID": created["company"],
                },
            )
        if deal or repeat:
            created["deal"] = self.add_deal(
                lead.get("TITLE") or "Deal", lead_id,
                created["contact"] or _norm(lead.get("CONTACT_ID")) or None,
                created["company"] or _norm(lead.get("COMPANY_ID")) or None,
            )
        made = [(type_id, made_id) for type_id, name in ((COMPANY, "company"), (CONTACT, "contact"), (DEAL, "deal"))
                if (made_id := created[name])]
        self._attach_all((LEAD, lead_id), made)
        fields: dict[str, Any] = {"STATUS_ID": "CONVERTED"}
        if not repeat:
            fields.update(CONTACT_ID=created["contact"], COMPANY_ID=created["company"])
        self.update_lead(lead_id, **fields)
        return created

    def convert_lead_over_rest(self, lead_id: int) -> int:
        """A "conversion" by another integration: REST has no conversion method, so it adds a contact
        (LEAD_ID is read-only over REST and stays empty) and sets the lead's status and contact.
        Nothing is attached to the contact. Returns the contact's id."""
        lead = self.leads[lead_id]
        contact_id = self._insert(CONTACT, {
            "NAME": lead.get("NAME") or lead.get("TITLE"),
            "EMAIL": [f["VALUE"] for f in lead.get("EMAIL") or []],
            "PHONE": [f["VALUE"] for f in lead.get("PHONE") or []],
        })
        self.update_lead(lead_id, STATUS_ID="CONVERTED", CONTACT_ID=contact_id)
        return contact_id

    def _attach_all(self, source: Binding, targets: list[Binding]) -> None:
        """CCrmActivity::AttachBinding and TimelineBindingTable::attach: saved directly, no event."""
        if not targets:
            return
        for activity_id in sorted(self._bound.get(source, set())):
            order = self._binding_order[activity_id]
            self._set_bindings(activity_id, [*order, *(t for t in targets if t not in order)])
        name = TYPE_NAMES[source[0]]
        for bindings in self.comment_binding_sets.values():
            if (name, source[1]) in bindings:
                bindings.update((TYPE_NAMES[t], i) for t, i in targets)

    def add_activity(
        self,
        bound_to: list[Binding],
        subject: str = "Activity",
        type_id: int = 4,
        provider_id: str = "CRM_EMAIL",
        direction: int = 1,
        responsible_id: int = 1,
        email: str | None = None,
    ) -> int:
        """Create an activity bound to these records, in this order (which decides its owner)."""
        if not bound_to:
            raise ValueError("an activity needs at least one binding")
        activity_id = self._new_id("activity")
        now = _now_iso()
        self.activities[activity_id] = {
            "ID": str(activity_id),
            "SUBJECT": subject,
            "TYPE_ID": str(type_id),
            "PROVIDER_ID": provider_id,
            "DIRECTION": str(direction),
            "RESPONSIBLE_ID": str(responsible_id),
            "COMPLETED": "N",
            "CREATED": now,
            "LAST_UPDATED": now,
            "COMMUNICATIONS": [{"TYPE": "EMAIL", "VALUE": email}] if email else [],
        }
        self.activity_bindings[activity_id] = set()
        self._binding_order[activity_id] = []
        self.binding_history[activity_id] = []
        self._set_bindings(activity_id, list(dict.fromkeys((int(t), int(i)) for t, i in bound_to)))
        self.events.append(("ONCRMACTIVITYADD", activity_id))
        return activity_id

    def bindings(self, activity_id: int) -> list[Binding]:
        return sorted(self.activity_bindings[activity_id])

    def bind_by_hand(self, activity_id: int, binding: Binding) -> None:
        """Add a binding as a person does in the portal's UI (no REST call, no limit)."""
        self._set_bindings(activity_id, [*self._binding_order[activity_id], binding])

    def _set_bindings(self, activity_id: int, new: list[Binding]) -> None:
        """Save an activity's bindings (kept ones keep their place, new ones go last), keeping the
        history, and recalculate the owner as every save does on the portal."""
        old = self._binding_order[activity_id]
        order = [b for b in old if b in new] + [b for b in dict.fromkeys(new) if b not in old]
        for binding in set(old) - set(order):
            self._bound[binding].discard(activity_id)
        for binding in order:
            self._bound.setdefault(binding, set()).add(activity_id)
        self._binding_order[activity_id] = order
        self.activity_bindings[activity_id] = set(order)
        self.binding_history[activity_id].append(tuple(sorted(order)))
        self._set_owner(activity_id, _owner_of(order))
        self.activities[activity_id]["LAST_UPDATED"] = _now_iso()

    def _set_owner(self, activity_id: int, binding: Binding) -> None:
        activity = self.activities[activity_id]
        activity["OWNER_TYPE_ID"], activity["OWNER_ID"] = str(binding[0]), str(binding[1])

    def add_timeline_comment(self, entity_type_name: str, entity_id: int, text: str) -> int:
        comment_id = self._new_id("comment")
        self.comments[comment_id] = {
            "ID": str(comment_id),
            "CREATED": _now_iso(),
            "ENTITY_ID": str(entity_id),
            "ENTITY_TYPE": entity_type_name,
            "AUTHOR_ID": str(self.user_id),
            "COMMENT": text,
        }
        self.comment_binding_sets[comment_id] = {(entity_type_name, int(entity_id))}
        return comment_id

    def comment_bindings(self, comment_id: int) -> list[tuple[str, int]]:
        return sorted(self.comment_binding_sets[comment_id])

    # -------------------------------------------------------- HTTP handling

    # -------------------------------------------------------- application (OAuth) mode

    def install_app(self, client_id: str = "app.client", client_secret: str = "app-secret") -> dict[str, str]:
        """Install an application: returns the `auth` block its ONAPPINSTALL event carries."""
        self.oauth_client = (client_id, client_secret)
        self.application_token = f"apptoken{self._new_id('app')}"
        return {**self._issue_tokens(), "application_token": self.application_token, "expires_in": "3600",
                "client_endpoint": f"{self.base_url}/rest/", "member_id": "fake-member", "scope": "crm",
                "domain": "fake.bitrix24.local", "status": "L"}

    def expire_access_tokens(self) -> None:
        self.access_tokens = dict.fromkeys(self.access_tokens, 0.0)

    def _issue_tokens(self) -> dict[str, str]:
        n = self._new_id("token")
        access, refresh = f"access{n}", f"refresh{n}"
        self.access_tokens[access] = time.time() + 3600
        self.refresh_tokens.add(refresh)
        return {"access_token": access, "refresh_token": refresh}

    async def _oauth_token(self, request: web.Request) -> web.Response:
        """oauth.bitrix.info/oauth/token/: a refresh token buys new tokens, once."""
        query = request.query
        if (query.get("client_id"), query.get("client_secret")) != self.oauth_client:
            return web.json_response({"error": "invalid_client"}, status=401)
        if query.get("grant_type") != "refresh_token" or query.get("refresh_token") not in self.refresh_tokens:
            return web.json_response({"error": "invalid_grant"}, status=400)
        self.refresh_tokens.discard(query["refresh_token"])
        self.oauth_refreshes += 1
        return web.json_response({**self._issue_tokens(), "expires_in": 3600,
                                  "client_endpoint": f"{self.base_url}/rest/"})

    async def _handle_app(self, request: web.Request) -> web.StreamResponse:
        token = request.query.get("auth") or ""
        if not token and request.content_type == "application/json" and request.body_exists:
            body = await request.json()
            token = str(body.get("auth", "")) if isinstance(body, dict) else ""
        if token not in self.access_tokens:
            return self._error(BitrixError(401, "invalid_token", "Unable to get application by token"))
        if self.access_tokens[token] < time.time():
            return self._error(BitrixError(401, "expired_token", "The access token provided has expired"))
        return await self._serve(request)

    # -------------------------------------------------------- webhook mode

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if (
            request.match_info["user_id"] != str(self.user_id)
            or request.match_info["code"] != self.webhook_code
        ):
            return self._error(BitrixError(401, "NO_AUTH_FOUND", "Wrong authorization data"))
        return await self._serve(request)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        if self._stalls:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self._stalls.popleft())
        started = time.time()
        method = request.match_info["method"].lower().removesuffix(".json")
        try:
            params = await self._read_params(request)
            params.pop("auth", None)
        except BitrixError as exc:
            self.requests.append(RequestRecord(method, 1))
            return self._error(exc)
        if self._before_requests and self._before_requests[0][0] in f"{method} {params}":
            self._before_requests.popleft()[1]()
        commands = _param(params, "cmd")
        batch_size = (len(commands) if isinstance(commands, (dict, list)) else 0) if method == "batch" else 1
        self.requests.append(RequestRecord(method, batch_size))
        if self._faults:
            return self._fault_response(self._faults.popleft())
        if self._random_failures and self._random.random() < self._random_failures:
            return self._error(BitrixError(500, "INTERNAL_SERVER_ERROR", "Internal server error"))
        if self._bucket is not None and not self._bucket.try_take():
            self.refused_for_rate += 1
            return self._error(BitrixError(503, "QUERY_LIMIT_EXCEEDED", "Too many requests"))
        try:
            result = self._batch(params) if method == "batch" else self._call(method, params)
        except BitrixError as exc:
            return self._error(exc)
        if self._lost_answers and self._lost_answers[0] in f"{method} {params}":
            # The portal did the work, but the caller never learns it: as when a proxy times out.
            self._lost_answers.popleft()
            return self._error(BitrixError(500, "INTERNAL_SERVER_ERROR", "Internal server error"))
        return web.json_response(self._timed(self._envelope(result, started), method))

    async def _read_params(self, request: web.Request) -> dict[str, Any]:
        """Query string and form body with PHP-style keys, overlaid by a JSON body if there is one."""
        pairs = list(request.query.items())
        json_body: Any = {}
        if request.content_type == "application/json":
            raw = await request.text()
            try:
                json_body = await request.json() if raw.strip() else {}
            except JSONDecodeError:
                raise BitrixError(400, "INVALID_REQUEST", "Invalid JSON in the request body") from None
            if not isinstance(json_body, dict):
                raise BitrixError(400, "INVALID_REQUEST", "The JSON body must be an object")
        elif request.body_exists:
            form = await request.post()
            pairs += [(k, v) for k, v in form.items() if isinstance(v, str)]  # files are not supported
        params = parse_php_query(pairs)
        params.update(json_body)
        return params

    @staticmethod
    def _error(exc: BitrixError) -> web.Response:
        return web.json_response(exc.body(), status=exc.status)

    @staticmethod
    def _fault_response(fault: _Fault) -> web.Response:
        if fault.html:
            page = f"<html><head><title>{fault.status}</title></head><body><h1>Bad Gateway</h1></body></html>"
            return web.Response(status=fault.status, text=page, content_type="text/html")
        return web.json_response(
            {"error": fault.error, "error_description": fault.description}, status=fault.status
        )

    @staticmethod
    def _envelope(result: Any, started: float) -> dict[str, Any]:
        if isinstance(result, Page):
            body: dict[str, Any] = {"result": result.rows}
            if result.next is not None:
                body["next"] = result.next
            if result.total is not None:
                body["total"] = result.total
        else:
            body = {"result": result}
        body["time"] = _time_info(started, time.time())
        return body

    def _timed(self, body: dict[str, Any], method: str) -> dict[str, Any]:
        body["time"].update(operating=round(self.operating(method), 3),
                            operating_reset_at=math.ceil(self.operating_reset_at(method)))
        return body

    def _call(self, method: str, params: Mapping[str, Any]) -> Any:
        handler = self._methods.get(method)
        if handler is None:
            raise BitrixError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        self.method_calls[method] += 1
        if method.endswith(".list") and str(_param(params, "start")) != "-1":
            self.counted_lists[method] += 1  # without start=-1 a list runs a COUNT query
        charged_to = "batch" if self._charging else method  # some portals charge a batch's time to `batch`
        if not self._charging and self.operating_limit is not None and self.operating(method) >= self.operating_limit:
            self.blocked_for_time += 1
            raise BitrixError(429, "OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit.")
        if self.operating_cost:
            self._operating.setdefault(charged_to, deque()).append((time.time(), self.operating_cost))
            self._operating_sums[charged_to] = self._operating_sums.get(charged_to, 0.0) + self.operating_cost
        return handler(params)

    def set_operating_limit(self, limit: float | None, cost_per_call: float = 1.0, window: float = 600.0,
                            charge_batch: bool = False) -> None:
        """Each call of a method costs `cost_per_call` seconds; over `limit` within `window` it is blocked.

        With `charge_batch`, as recent portals may: a batch's commands are charged to the method
        `batch` itself, every sub-result carries that one batch-wide figure, and past the limit the
        whole `batch` answers 429 OPERATION_TIME_LIMIT."""
        self.operating_limit, self.operating_cost, self.operating_window = limit, cost_per_call, window
        self.charge_batch = charge_batch

    def operating(self, method: str) -> float:
        """Server time `method` used within the window, as the `time.operating` of its answers reports."""
        calls = self._operating.get(method, deque())
        while calls and calls[0][0] < time.time() - self.operating_window:
            self._operating_sums[method] -= calls.popleft()[1]
        return max(0.0, self._operating_sums.get(method, 0.0)) if calls else 0.0

    def operating_reset_at(self, method: str) -> float:
        calls = self._operating.get(method)
        return (calls[0][0] if calls else time.time()) + self.operating_window

    # -------------------------------------------------------- batch

    def _batch(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Run sub-calls in order; one HTTP request, HTTP 200 even when sub-calls fail."""
        commands = _param(params, "cmd")
        if isinstance(commands, list):
            commands = {str(i): c for i, c in enumerate(commands)}
        if not isinstance(commands, dict):
            commands = {}
        halt = _truthy(_param(params, "halt"))
        charged = self.charge_batch and self.operating_limit is not None
        if charged and self.operating("batch") >= self.operating_limit:  # type: ignore[operator]
            self.blocked_for_time += 1
            raise BitrixError(429, "OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit.")
        sections: dict[str, dict[str, Any]] = {
            "result": {},
            "result_error": {},
            "result_total": {},
            "result_next": {},
            "result_time": {},
        }
        for n, (key, command) in enumerate(commands.items()):
            if n >= MAX_BATCH:  # the first 50 run; each one past them is refused (CRestProvider::methodsBatch)
                sections["result_error"][key] = {"error": "ERROR_BATCH_LENGTH_EXCEEDED",
                                                 "error_description": "Max batch length exceeded"}
                continue
            started = time.time()
            try:
                self._charging = charged
                result = self._batch_command(str(command))
            except BitrixError as exc:
                sections["result_error"][key] = exc.body()
                if halt:
                    break
                continue
            if isinstance(result, Page):
                sections["result"][key] = result.rows
                if result.total is not None:
                    sections["result_total"][key] = result.total
                if result.next is not None:
                    sections["result_next"][key] = result.next
            else:
                sections["result"][key] = result
            inner = "batch" if charged else str(command).partition("?")[0].strip().strip("/").lower().removesuffix(".json")
            sections["result_time"][key] = _time_info(started, time.time(), self.operating(inner),
                                                      self.operating_reset_at(inner))
        self._charging = False
        if charged:  # one batch-wide figure on every command
            for timing in sections["result_time"].values():
                timing.update(operating=round(self.operating("batch"), 3))
        # PHP serialises an empty array as [], not {}: clients must cope, so the fake does the same.
        return {name: (section or []) for name, section in sections.items()}

    def _batch_command(self, command: str) -> Any:
        method, _, query = command.partition("?")
        method = method.strip().strip("/").lower().removesuffix(".json")
        if method == "batch":
            raise BitrixError(405, "ERROR_BATCH_METHOD_NOT_ALLOWED", "Method is not allowed for batch usage")
        return self._call(method, parse_php_query(parse_qsl(query, keep_blank_values=True)))

    # -------------------------------------------------------- method table

    def _method_table(self) -> dict[str, Callable[[Mapping[str, Any]], Any]]:
        # A portal's own list; a test removes methods to play an older portal.
        methods: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            "crm.activity.binding.list": self._binding_list,
            "crm.activity.binding.add": self._binding_add,
            "crm.activity.binding.delete": self._binding_delete,
            "crm.activity.binding.move": self._binding_move,
            "crm.activity.get": self._activity_get,
            "crm.activity.list": self._activity_list,
            "crm.activity.add": self._activity_add,
            "crm.timeline.comment.list": self._comment_list,
            "crm.timeline.comment.add": self._comment_add,
            "crm.timeline.bindings.list": self._timeline_bindings_list,
            "crm.timeline.bindings.bind": self._timeline_bind,
            "crm.timeline.bindings.unbind": self._timeline_unbind,
            "crm.duplicate.findbycomm": self._find_by_comm,
            "event.offline.get": self._offline_get,
            "event.offline.clear": self._offline_clear,
            "scope": lambda p: list(self.scopes),
            "method.get": self._method_get,
            "crm.settings.mode.get": lambda p: self.crm_mode,
        }
        for type_id, name in TYPE_NAMES.items():
            methods[f"crm.{name}.get"] = partial(self._entity_get, type_id)
            methods[f"crm.{name}.list"] = partial(self._entity_list, type_id)
            methods[f"crm.{name}.add"] = partial(self._entity_add, type_id)
            methods[f"crm.{name}.update"] = partial(self._entity_update, type_id)
        return methods

    def _method_get(self, params: Mapping[str, Any]) -> dict[str, bool]:
        name = str(_param(params, "name") or "").lower()
        if not name:
            raise BitrixError(400, "ERROR_ARGUMENT", "Method name is required")
        exists = name in self._methods
        return {"isExisting": exists, "isAvailable": exists and name.split(".")[0] in self.scopes + ["scope",
                                                                                                    "method"]}

    def remove_method(self, name: str) -> None:
        """Play a portal that does not know a method (an older version, or another edition)."""
        self._methods.pop(name.lower(), None)

    # -------------------------------------------------------- crm.activity.binding.*

    def _activity_of(self, params: Mapping[str, Any]) -> int:
        activity_id = _required_int(params, "activityId")
        if activity_id not in self.activities:
            raise BitrixError(400, "NOT_FOUND", "Element not found")
        return activity_id

    def _may_change(self, *records: Binding) -> None:
        if any(record in self.unreadable for record in records):
            raise BitrixError(403, "ACCESS_DENIED", "Access denied")

    def _dangling(self, activity_id: int, target: Binding) -> None:
        """The controller never checks the target exists (Controller/Activity/Binding.php): the binding is
        saved all the same, and an activity bound to nothing real is what the service must never cause."""
        if not self.entity_exists(*target):
            self.violations.append(
                f"activity {activity_id} was bound to {_type_label(target[0])} {target[1]}, which does not exist")

    def _binding_list(self, params: Mapping[str, Any]) -> list[dict[str, int]]:
        activity_id = self._activity_of(params)
        return [{"entityTypeId": t, "entityId": i} for t, i in self._binding_order[activity_id]
                if (t, i) not in self.unreadable]  # bindings the user cannot read are silently left out

    def _binding_add(self, params: Mapping[str, Any]) -> bool:
        names = ("activityId", "entityTypeId", "entityId")
        _, type_id, entity_id = (_required_int(params, n) for n in names)  # all present, in order
        activity_id = self._activity_of(params)
        self._may_change((type_id, entity_id))
        current = self._binding_order[activity_id]
        if (type_id, entity_id) in current:
            raise BitrixError(
                400, "ACTIVITY_IS_ALREADY_BOUND", "The activity is already bound to this entity"
            )
        if len(current) >= MAX_BINDINGS:
            # The 100-binding cap is documented, but the controller does not check it: the error code
            # a portal answers is unknown. The fake keeps the documented cap with a guessed code.
            raise BitrixError(
                400, "TOO_MANY_BINDINGS", f"An activity can have at most {MAX_BINDINGS} bindings"
            )
        self._dangling(activity_id, (type_id, entity_id))
        self._set_bindings(activity_id, [*current, (type_id, entity_id)])
        return True

    def _binding_delete(self, params: Mapping[str, Any]) -> bool:
        names = ("activityId", "entityTypeId", "entityId")
        _, type_id, entity_id = (_required_int(params, n) for n in names)  # all present, in order
        activity_id = self._activity_of(params)
        self._may_change((type_id, entity_id))
        current = self._binding_order[activity_id]
        if (type_id, entity_id) not in current:
            raise BitrixError(400, "BINDING_NOT_FOUND", "The activity is not bound to this entity")
        if len(current) == 1:
            raise BitrixError(400, "LAST_BINDING_CANNOT_BE_DELETED", "Cannot delete the only binding")
        self._set_bindings(activity_id, [b for b in current if b != (type_id, entity_id)])
        return True

    def _binding_move(self, params: Mapping[str, Any]) -> bool:
        names = ("activityId", "sourceEntityTypeId", "sourceEntityId", "targetEntityTypeId", "targetEntityId")
        _, source_type, source_id, target_type, target_id = (_required_int(params, n) for n in names)
        # The portal checks the IDs before anything else, even before the activity, and raises this
        # and the type mismatch without an error code (moveAction).
        if source_id == target_id:
            raise BitrixError(400, "", "Source and target entity ID cannot be equal")
        if source_type != target_type:
            raise BitrixError(400, "", "Source and target entity types are not equal")
        activity_id = self._activity_of(params)
        self._may_change((source_type, source_id), (target_type, target_id))
        current = self._binding_order[activity_id]
        if (target_type, target_id) in current:  # checked before the source binding is looked for
            raise BitrixError(400, "ACTIVITY_IS_ALREADY_BOUND", "The activity is already bound to the target")
        if (source_type, source_id) not in current:
            raise BitrixError(400, "BINDING_NOT_FOUND", "The activity is not bound to the source entity")
        self._dangling(activity_id, (target_type, target_id))
        # The target takes the source's place; the owner is recalculated as on every save.
        self._set_bindings(activity_id, [(target_type, target_id) if b == (source_type, source_id) else b
                                         for b in current])
        return True

    # -------------------------------------------------------- crm.activity.*

    def _activity_get(self, params: Mapping[str, Any]) -> dict[str, Any]:
        activity_id = _positive_int(_param(params, "id"))
        if activity_id is None:
            raise BitrixError(400, "", "ID is not defined or invalid.")
        if activity_id not in self.activities:
            raise BitrixError(400, "", "Activity is not found")
        if not self._readable_activity(activity_id):
            raise BitrixError(400, "", "Access denied")
        # Communications load only when a list selects them (restservice.php innerGet).
        return {k: v for k, v in self.activities[activity_id].items() if k != "COMMUNICATIONS"}

    def _readable_activity(self, activity_id: int) -> bool:
        activity = self.activities[activity_id]
        return (int(activity["OWNER_TYPE_ID"]), int(activity["OWNER_ID"])) not in self.unreadable

    def _activity_list(self, params: Mapping[str, Any]) -> Page:
        filters = dict(_filter_of(params))
        wanted = _binding_pairs(filters.pop("BINDINGS", None))
        wanted = set() if self.bindings_filter_ignored else wanted
        candidates = sorted(set().union(*(self._bound.get(b, ()) for b in wanted))) if wanted else self.activities
        rows = [dict(row) for row in map(self.activities.__getitem__, candidates)
                if _matches(row, filters) and self._readable_activity(int(row["ID"]))]
        # COMMUNICATIONS is a multiple field: returned only when named, never for "*" or no select.
        return _selected(_page(rows, params), params, multiple=("COMMUNICATIONS",))

    def _activity_add(self, params: Mapping[str, Any]) -> int:
        fields = _param(params, "fields") or {}
        owner_type, owner_id = (
            _positive_int(_param(fields, "OWNER_TYPE_ID")),
            _positive_int(_param(fields, "OWNER_ID")),
        )
        if owner_type is None or owner_id is None or not self.entity_exists(owner_type, owner_id):
            raise BitrixError(400, "", "OWNER_ID is not defined or invalid.")
        owner = (owner_type, owner_id)
        extra = sorted(_binding_pairs(_param(fields, "BINDINGS")) - {owner})
        comms = [c for c in _items(_param(fields, "COMMUNICATIONS")) if isinstance(c, dict)]
        email = next((c.get("VALUE") for c in comms if c.get("TYPE", "EMAIL") == "EMAIL"), None)
        activity_id = self.add_activity(
            [owner, *extra],
            subject=_param(fields, "SUBJECT") or "Activity",
            type_id=int(_param(fields, "TYPE_ID") or 4),
            provider_id=_param(fields, "PROVIDER_ID") or "CRM_EMAIL",
            direction=int(_param(fields, "DIRECTION") or 1),
            responsible_id=int(_param(fields, "RESPONSIBLE_ID") or self.user_id),
            email=email,
        )
        return activity_id

    # -------------------------------------------------------- crm.lead/contact/company/deal.*

    def _entity_id(self, type_id: int, params: Mapping[str, Any]) -> int:
        entity_id = _positive_int(_param(params, "id"))
        if entity_id is None:
            raise BitrixError(400, "", "ID is not defined or invalid.")
        if entity_id not in self.table(type_id):
            raise BitrixError(400, "", "Not found")  # no code: restservice.php
        if (type_id, entity_id) in self.unreadable:
            raise BitrixError(400, "", "Access denied.")
        return entity_id

    def _entity_get(self, type_id: int, params: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.table(type_id)[self._entity_id(type_id, params)])

    def _entity_list(self, type_id: int, params: Mapping[str, Any]) -> Page:
        filters = _filter_of(params)
        table = self.table(type_id)
        by_lead = self._by_lead.get(type_id)
        lead_id = _norm(filters.get("LEAD_ID"))
        candidates = sorted(by_lead.get(lead_id, ())) if by_lead is not None and isinstance(lead_id, int) else table
        return _selected(_page([dict(table[i]) for i in candidates
                                if _matches(table[i], filters) and (type_id, i) not in self.unreadable], params),
                         params, multiple=("EMAIL", "PHONE"))

    def _entity_add(self, type_id: int, params: Mapping[str, Any]) -> int:
        fields = _param(params, "fields")
        if not isinstance(fields, dict):
            raise BitrixError(400, "", "Parameter 'fields' must be array.")
        if type_id == LEAD:
            status = str(_param(fields, "STATUS_ID") or "NEW")
            fields = {
                "STATUS_ID": status,
                "STATUS_SEMANTIC_ID": _SEMANTICS.get(status, "P"),
                "CONTACT_ID": None,
                "COMPANY_ID": None,
                **fields,
            }
        return self._insert(type_id, fields)

    def _entity_update(self, type_id: int, params: Mapping[str, Any]) -> bool:
        entity_id = self._entity_id(type_id, params)
        fields = _param(params, "fields")
        if not isinstance(fields, dict):
            raise BitrixError(400, "", "Parameter 'fields' must be array.")
        if type_id == LEAD:
            self.update_lead(entity_id, **fields)
        else:
            row = self.table(type_id)[entity_id]
            old_lead_id = row.get("LEAD_ID")
            row.update(self._clean_fields(fields))
            row["DATE_MODIFY"] = _now_iso()
            self._index_lead_id(type_id, entity_id, old_lead_id)
            self.events.append((f"ONCRM{TYPE_NAMES[type_id].upper()}UPDATE", entity_id))
        return True

    # -------------------------------------------------------- crm.timeline.*

    def _comment_list(self, params: Mapping[str, Any]) -> Page:
        filters = {k.upper(): v for k, v in _filter_of(params).items()}
        entity_id = _positive_int(filters.pop("ENTITY_ID", None))
        entity_type = str(filters.pop("ENTITY_TYPE", "")).lower()
        if entity_id is None:
            raise BitrixError(400, "", "ENTITY_ID is not defined or invalid.")
        if entity_type not in TYPE_NAMES.values():
            raise BitrixError(400, "", "ENTITY_TYPE is not defined or invalid.")
        rows = []
        for comment_id, row in self.comments.items():
            # A comment shows in every timeline it is bound to, not only its original one.
            if (entity_type, entity_id) in self.comment_binding_sets[comment_id] and _matches(row, filters):
                rows.append({**row, "ENTITY_TYPE": entity_type, "ENTITY_ID": str(entity_id)})
        return _page(rows, params)

    def _comment_add(self, params: Mapping[str, Any]) -> int:
        fields = _param(params, "fields") or {}
        entity_type, entity_id = self._timeline_target(fields)
        return self.add_timeline_comment(entity_type, entity_id, str(_param(fields, "COMMENT") or ""))

    def _timeline_target(self, fields: Mapping[str, Any]) -> tuple[str, int]:
        entity_id = _positive_int(_param(fields, "ENTITY_ID"))
        if entity_id is None:
            raise BitrixError(400, "", "ENTITY_ID is not defined or invalid.")
        entity_type = str(_param(fields, "ENTITY_TYPE") or "").lower()
        type_ids = {name: type_id for type_id, name in TYPE_NAMES.items()}
        if entity_type not in type_ids:
            raise BitrixError(400, "", "ENTITY_TYPE is not defined or invalid.")
        if not self.entity_exists(type_ids[entity_type], entity_id):
            raise BitrixError(400, "", "ENTITY_ID is not defined or invalid.")
        return entity_type, entity_id

    def _timeline_owner(self, fields: Mapping[str, Any]) -> int:
        owner_id = _positive_int(_param(fields, "OWNER_ID"))
        if owner_id is None or owner_id not in self.comments:
            raise BitrixError(400, "", "OWNER_ID is not defined or invalid.")
        return owner_id

    def _timeline_bindings_list(self, params: Mapping[str, Any]) -> Page:
        owner_id = self._timeline_owner(_filter_of(params))
        rows = [
            {"OWNER_ID": str(owner_id), "ENTITY_ID": str(entity_id), "ENTITY_TYPE": entity_type}
            for entity_type, entity_id in self.comment_bindings(owner_id)
        ]
        return _page(rows, {"order": {"ENTITY_ID": "ASC"}, "start": _param(params, "start")})

    def _timeline_bind(self, params: Mapping[str, Any]) -> bool:
        fields = _param(params, "fields") or {}
        owner_id = self._timeline_owner(fields)
        # Binding twice is not documented as an error; the fake treats it as a no-op.
        self.comment_binding_sets[owner_id].add(self._timeline_target(fields))
        return True

    def _timeline_unbind(self, params: Mapping[str, Any]) -> bool:
        fields = _param(params, "fields") or {}
        owner_id = self._timeline_owner(fields)
        target = self._timeline_target(fields)
        if target not in self.comment_binding_sets[owner_id]:
            raise BitrixError(400, "", "Not found.")
        self.comment_binding_sets[owner_id].discard(target)
        return True

    # -------------------------------------------------------- event.offline.*

    def add_offline_event(self, event: str, entity_id: int) -> None:
        """Queue an offline event (the portal keeps the latest record per object, not every change)."""
        self.offline_events = [e for e in self.offline_events
                               if (e["EVENT_NAME"], e["EVENT_DATA"]["FIELDS"]["ID"]) != (event, str(entity_id))]
        message = self._new_id("offline")
        self.offline_events.append({"ID": str(message), "TIMESTAMP_X": _now_iso(), "EVENT_NAME": event,
                                    "EVENT_DATA": {"FIELDS": {"ID": str(entity_id)}}, "EVENT_ADDITIONAL": False,
                                    "MESSAGE_ID": str(message), "PROCESS_ID": None})

    def _offline_get(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """clear=0 reserves the records under a process id, hidden from other readers until cleared."""
        limit = _positive_int(_param(params, "limit")) or 50
        free = [e for e in self.offline_events if e["PROCESS_ID"] is None][:limit]
        if _truthy(_param(params, "clear") if _param(params, "clear") is not None else 1):
            taken = {id(e) for e in free}
            self.offline_events = [e for e in self.offline_events if id(e) not in taken]
            return {"process_id": None, "events": [{k: v for k, v in e.items() if k != "PROCESS_ID"} for e in free]}
        process_id = f"p{self._new_id('process')}" if free else None
        for event in free:
            event["PROCESS_ID"] = process_id
        return {"process_id": process_id,
                "events": [{k: v for k, v in e.items() if k != "PROCESS_ID"} for e in free]}

    def _offline_clear(self, params: Mapping[str, Any]) -> bool:
        process_id = _param(params, "process_id")
        if not process_id:
            raise BitrixError(400, "", "PROCESS_ID is not defined")
        self.offline_events = [e for e in self.offline_events if e["PROCESS_ID"] != process_id]
        return True

    # -------------------------------------------------------- crm.duplicate.findbycomm

    def _find_by_comm(self, params: Mapping[str, Any]) -> dict[str, list[int]] | list[Any]:
        kind = str(_param(params, "type") or "").upper()
        if kind not in ("EMAIL", "PHONE"):
            raise BitrixError(400, "", "Communication type is not defined or invalid.")
        # The portal silently looks at the first 20 values only (crm restservice.php).
        wanted = {_comm_key(kind, str(v)) for v in _items(_param(params, "values"))[:FINDBYCOMM_LIMIT]}
        requested = str(_param(params, "entity_type") or "").upper()
        found: dict[str, list[int]] = {}
        for type_id in (LEAD, CONTACT, COMPANY):
            name = TYPE_NAMES[type_id].upper()
            if requested and requested != name:
                continue
            ids = [
                entity_id
                for entity_id, row in sorted(self.table(type_id).items())
                if any(_comm_key(kind, f["VALUE"]) in wanted for f in row.get(kind) or [])
            ]
            if ids:
                found[name] = ids
        return found or []  # nothing found is an empty PHP array, i.e. []
