"""What a real portal does to a caller besides answering: the request limit (a leaky bucket, answered
with 503 QUERY_LIMIT_EXCEEDED), the per-method operating-time limit (429 OPERATION_TIME_LIMIT), and the
failures a test injects: errors and HTML pages (`fail_next`, `html_next`, `fail_randomly`), answers lost
after the work is done, stalls, and a person changing the CRM just before a request (`before_request`).
Access rights are part of the CRM's state (`CrmState.set_access_denied`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from app.fakeportal.protocol import BitrixError

_SYSTEM_ERRORS = {
    "INTERNAL_SERVER_ERROR": "Internal server error",
    "QUERY_LIMIT_EXCEEDED": "Too many requests",
    "ERROR_UNEXPECTED_ANSWER": "Server returned an unexpected response",
    "OPERATION_TIME_LIMIT": "Method is blocked due to operation time limit.",
}


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


class Faults:
    """The limits and injected failures of one portal; `FakePortal` consults them on every request."""

    def __init__(self, per_second: float | None = 2.0, burst: int = 50,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._before_requests: deque[tuple[str, Callable[[], None]]] = deque()
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
        self._random_failures = 0.0
        self._random = random.Random(0)
        self.refused_for_rate = 0  # QUERY_LIMIT_EXCEEDED answers given
        self.blocked_for_time = 0  # OPERATION_TIME_LIMIT answers given
        self._bucket: LeakyBucket | None = None
        self.set_rate_limit(per_second, burst)

    # -------------------------------------------------------- consulted on every request, in this order

    async def _stall(self) -> None:
        """Wait out the next injected stall, if any; closing the portal ends it early."""
        if self._stalls:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self._stalls.popleft())

    def _before_serving(self, request: str) -> None:
        """Run the next `before_request` action if this request (method and params) mentions its text."""
        if self._before_requests and self._before_requests[0][0] in request:
            self._before_requests.popleft()[1]()

    def _refusal(self) -> web.Response | None:
        """The answer that replaces this request's, if any: an injected fault, a random 500, or the
        request limit's 503 QUERY_LIMIT_EXCEEDED (a refused request still counts as made)."""
        if self._faults:
            return self._fault_response(self._faults.popleft())
        if self._random_failures and self._random.random() < self._random_failures:
            return self._fault_response(_Fault(500, "INTERNAL_SERVER_ERROR", "Internal server error"))
        if self._bucket is not None and not self._bucket.try_take():
            self.refused_for_rate += 1
            return self._fault_response(_Fault(503, "QUERY_LIMIT_EXCEEDED", "Too many requests"))
        return None

    def _answer_lost(self, request: str) -> bool:
        """The portal did the work, but the caller never learns it: as when a proxy times out."""
        if self._lost_answers and self._lost_answers[0] in request:
            self._lost_answers.popleft()
            return True
        return False

    # -------------------------------------------------------- set by tests

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

    @property
    def stalls_left(self) -> int:
        """Stalls not yet taken by a request: a test waits on it to know a request is stalled now."""
        return len(self._stalls)

    def html_next(self, n: int, status: int = 502) -> None:
        """Answer the next `n` requests with an HTML page, as a proxy in front of the portal would."""
        self._faults.extend(_Fault(status, "", "", html=True) for _ in range(n))

    def set_rate_limit(self, per_second: float | None, burst: int = 50) -> None:
        self._bucket = None if per_second is None else LeakyBucket(per_second, burst, self.clock)

    def set_operating_limit(self, limit: float | None, cost_per_call: float = 1.0, window: float = 600.0,
                            charge_batch: bool = False) -> None:
        """Each call of a method costs `cost_per_call` seconds; over `limit` within `window` it is blocked.

        With `charge_batch`, as recent portals may: a batch's commands are charged to the method
        `batch` itself, every sub-result carries that one batch-wide figure, and past the limit the
        whole `batch` answers 429 OPERATION_TIME_LIMIT."""
        self.operating_limit, self.operating_cost, self.operating_window = limit, cost_per_call, window
        self.charge_batch = charge_batch

    def _charge_operating_time(self, method: str) -> None:
        """Block `method` past its limit (429 OPERATION_TIME_LIMIT), else charge it one call's cost."""
        charged_to = "batch" if self._charging else method  # some portals charge a batch's time to `batch`
        if not self._charging and self.operating_limit is not None and self.operating(method) >= self.operating_limit:
            self.blocked_for_time += 1
            raise BitrixError(429, "OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit.")
        if self.operating_cost:
            self._operating.setdefault(charged_to, deque()).append((time.time(), self.operating_cost))
            self._operating_sums[charged_to] = self._operating_sums.get(charged_to, 0.0) + self.operating_cost

    def operating(self, method: str) -> float:
        """Server time `method` used within the window, as the `time.operating` of its answers reports."""
        calls = self._operating.get(method, deque())
        while calls and calls[0][0] < time.time() - self.operating_window:
            self._operating_sums[method] -= calls.popleft()[1]
        return max(0.0, self._operating_sums.get(method, 0.0)) if calls else 0.0

    def operating_reset_at(self, method: str) -> float:
        calls = self._operating.get(method)
        return (calls[0][0] if calls else time.time()) + self.operating_window

    @staticmethod
    def _fault_response(fault: _Fault) -> web.Response:
        if fault.html:
            page = f"<html><head><title>{fault.status}</title></head><body><h1>Bad Gateway</h1></body></html>"
            return web.Response(status=fault.status, text=page, content_type="text/html")
        return web.json_response(
            {"error": fault.error, "error_description": fault.description}, status=fault.status
        )
