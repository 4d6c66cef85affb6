"""An in-memory Bitrix24 portal served over real HTTP, for the test suite and the `demo` mode.

`FakePortal` answers the inbound-webhook URL form ``/rest/{user_id}/{code}/{method}[.json]`` and the
application (OAuth) form ``/rest/{method}?auth=...`` with the same envelopes, HTTP statuses and error codes
as the cloud portal (the official docs: GitHub ``bitrix24/b24restdocs``, ``error-codes.md``), runs
``batch``, and consults its limits and injected faults (`app.fakeportal.faults`) on every request.
The CRM it serves is `app.fakeportal.state`; the methods over it, `app.fakeportal.methods`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from json import JSONDecodeError
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from aiohttp import web

from app.fakeportal.faults import Faults
from app.fakeportal.methods import RestMethods
from app.fakeportal.pages import add_record_pages
from app.fakeportal.protocol import BitrixError, Page, param, parse_php_query, time_info, truthy

MAX_BATCH = 50
# A batch's answer, section by section in the portal's order: each keyed by the command's name.
BATCH_SECTIONS = ("result", "result_error", "result_total", "result_next", "result_time")


class RequestRecord(NamedTuple):
    """One HTTP request that passed authentication; ``n_commands`` is the batch size (1 otherwise)."""

    method: str
    n_commands: int


class FakePortal(RestMethods, Faults):
    """A Bitrix24 portal with an inbound webhook, in memory, behind a real aiohttp server."""

    def __init__(
        self,
        webhook_code: str = "demo0secret0code",
        user_id: int = 1,
        per_second: float | None = 2.0,
        burst: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        RestMethods.__init__(self, user_id)
        Faults.__init__(self, per_second, burst, clock)
        self.webhook_code = webhook_code
        self.requests: list[RequestRecord] = []
        self.access_tokens: dict[str, float] = {}  # application mode: token -> expiry
        self.refresh_tokens: set[str] = set()
        self.oauth_client: tuple[str, str] | None = None
        self.oauth_refreshes = 0
        self.application_token = ""
        self.counted_lists: Counter[str] = Counter()
        self.method_calls: Counter[str] = Counter()  # every method run, inside a batch or not
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.extra_routes: list[tuple[str, str, Any]] = []  # the demo's control routes

    # -------------------------------------------------------- server lifecycle

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/rest/{user_id}/{code}/{method}", self._handle)
        app.router.add_route("*", "/rest/{method}", self._handle_app)
        app.router.add_get("/oauth/token/", self._oauth_token)
        add_record_pages(app.router, self)  # what the dashboard's links to a record open
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
        await self.stop_echoes()
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

    # -------------------------------------------------------- requests served

    @property
    def request_count(self) -> int:
        return len(self.requests)

    def reset_counters(self) -> None:
        self.requests.clear()

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
        await self._stall()
        started = time.time()
        method = request.match_info["method"].lower().removesuffix(".json")
        try:
            params = await self._read_params(request)
            params.pop("auth", None)
        except BitrixError as exc:
            self.requests.append(RequestRecord(method, 1))
            return self._error(exc)
        self._before_serving(f"{method} {params}")
        commands = param(params, "cmd")
        batch_size = (len(commands) if isinstance(commands, (dict, list)) else 0) if method == "batch" else 1
        self.requests.append(RequestRecord(method, batch_size))
        refusal = self._refusal()
        if refusal is not None:
            return refusal
        self.auth_type = "webhook" if "code" in request.match_info else "oauth"
        try:
            result = self._batch(params) if method == "batch" else self._call(method, params)
        except BitrixError as exc:
            return self._error(exc)
        if self._answer_lost(f"{method} {params}"):
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
    def _envelope(result: Any, started: float) -> dict[str, Any]:
        if isinstance(result, Page):
            body: dict[str, Any] = {"result": result.rows}
            if result.next is not None:
                body["next"] = result.next
            if result.total is not None:
                body["total"] = result.total
        else:
            body = {"result": result}
        body["time"] = time_info(started, time.time())
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
        if method.endswith(".list") and str(param(params, "start")) != "-1":
            self.counted_lists[method] += 1  # without start=-1 a list runs a COUNT query
        self._charge_operating_time(method)
        return handler(params)

    # -------------------------------------------------------- batch

    def _batch(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Run sub-calls in order; one HTTP request, HTTP 200 even when sub-calls fail."""
        commands = _commands_of(param(params, "cmd"))
        halt = truthy(param(params, "halt"))
        charged = self.charge_batch and self.operating_limit is not None
        if charged and self.operating("batch") >= self.operating_limit:  # type: ignore[operator]
            self.blocked_for_time += 1
            raise BitrixError(429, "OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit.")
        sections: dict[str, dict[str, Any]] = {name: {} for name in BATCH_SECTIONS}
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
            _file_result(sections, key, result)
            inner = "batch" if charged else _method_of(str(command))
            sections["result_time"][key] = time_info(started, time.time(), self.operating(inner),
                                                      self.operating_reset_at(inner))
        self._charging = False
        if charged:  # one batch-wide figure on every command
            for timing in sections["result_time"].values():
                timing.update(operating=round(self.operating("batch"), 3))
        # PHP serialises an empty array as [], not {}: clients must cope, so the fake does the same.
        return {name: (section or []) for name, section in sections.items()}

    def _batch_command(self, command: str) -> Any:
        method, query = _method_of(command), command.partition("?")[2]
        if method == "batch":
            raise BitrixError(405, "ERROR_BATCH_METHOD_NOT_ALLOWED", "Method is not allowed for batch usage")
        return self._call(method, parse_php_query(parse_qsl(query, keep_blank_values=True)))


def _method_of(command: str) -> str:
    """A batch command's method: `crm.lead.get?ID=1` and `/crm.lead.get.json?ID=1` name the same one."""
    return command.partition("?")[0].strip().strip("/").lower().removesuffix(".json")


def _file_result(sections: dict[str, dict[str, Any]], key: str, result: Any) -> None:
    """A sub-call's answer in the batch's sections: a page's rows, total and next apart, as the portal files them."""
    if isinstance(result, Page):
        sections["result"][key] = result.rows
        if result.total is not None:
            sections["result_total"][key] = result.total
        if result.next is not None:
            sections["result_next"][key] = result.next
    else:
        sections["result"][key] = result


def _commands_of(cmd: Any) -> dict[str, Any]:
    """`cmd` as keyed commands: a list's are keyed by position, anything else is no command."""
    if isinstance(cmd, list):
        return {str(i): c for i, c in enumerate(cmd)}
    return cmd if isinstance(cmd, dict) else {}


class FakePortalHost:
    """Many portals from one process on one port, each with its own CRM, request budget and faults:
    an installation's view of an agency's clients. Portal `name` answers under ``/{name}/rest/...``
    (its `rest_url`), as if each were its own host."""

    def __init__(self) -> None:
        self.portals: dict[str, FakePortal] = {}
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        # Set to a list to keep every request as (name it came under, monotonic time, body): a test tells
        # which process sent what by giving each process its own name for one portal (`alias`).
        self.served: list[tuple[str, float, bytes]] | None = None

    def add(self, name: str, **options: Any) -> FakePortal:
        """A new portal (FakePortal's options: webhook_code, per_second, burst...); before or after start."""
        portal = self.portals[name] = FakePortal(**options)
        if self.base_url:
            portal.base_url = f"{self.base_url}/{name}"
        return portal

    def alias(self, name: str, portal: FakePortal) -> None:
        """One more name for a portal already here (its `rest_url_of(name)`), as a second address of one host."""
        self.portals[name] = portal

    def rest_url_of(self, name: str) -> str:
        portal = self.portals[name]
        return f"{self.base_url}/{name}/rest/{portal.user_id}/{portal.webhook_code}/"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application()
        app.router.add_route("*", "/{portal}/rest/{user_id}/{code}/{method}", self._route)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.base_url = f"http://{host}:{self._runner.addresses[0][1]}"
        for name, portal in self.portals.items():
            portal.base_url = f"{self.base_url}/{name}"

    async def _route(self, request: web.Request) -> web.StreamResponse:
        portal = self.portals.get(request.match_info["portal"])
        if portal is None:  # an unknown host: the real cloud answers a portal that does not exist so
            return web.json_response({"error": "NOT_FOUND", "error_description": "Portal not found"}, status=404)
        if self.served is not None:
            self.served.append((request.match_info["portal"], time.monotonic(), await request.read()))
        return await portal._handle(request)

    async def close(self) -> None:
        for portal in self.portals.values():
            portal._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
