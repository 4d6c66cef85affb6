"""Fuzzing the intake: whatever arrives, never a 5xx, never a job without the right token, no leak."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import tracemalloc
from collections.abc import Iterator
from ipaddress import ip_network
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import pytest
import redis as sync_redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from app.portal_config import PortalConfig
from app.logs import QuietBadRequests
from app.rules.model import RuleSet
from app.settings import Settings
from app.store.amnesia import AFTER_FORGETTING
from app.web import create_app
from tests.conftest import DEFAULT_RULES, DOMAIN, TOKEN, event_form, post_event, rules_with

FORM = "application/x-www-form-urlencoded"
CONTENT_TYPES = [
    FORM,
    "application/json",
    "text/plain",
    "multipart/form-data; boundary=x",
    "",
    "application/x-www-form-urlencoded; charset=latin-1",
    "application/json; charset=utf-16",
    "application/xml",
    "APPLICATION/JSON",
]


class Intake:
    """The web app on its own event loop, so hypothesis can drive it from a plain test function."""

    def __init__(self, settings: Settings, rules: RuleSet) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = TestClient(TestServer(create_app(settings, rules)), loop=self.loop)
        self.run(self.client.start_server())

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def post(
        self, body: bytes, content_type: str | None, headers: dict[str, str] | None = None
    ) -> tuple[int, str]:
        async def send() -> tuple[int, str]:
            sent = {**({"Content-Type": content_type} if content_type is not None else {}), **(headers or {})}
            # The session itself: TestClient.post keeps every response until the client closes.
            async with self.client.session.post(
                self.client.make_url("/bitrix/events"), data=body, headers=sent
            ) as response:
                return response.status, await response.text()

        return self.run(send())  # type: ignore[no-any-return]

    def close(self) -> None:
        self.run(self.client.close())
        self.loop.close()


@pytest.fixture(scope="module")
def intake(redis_url: str, tmp_path_factory: pytest.TempPathFactory, request: Any) -> Iterator[Intake]:
    tmp = tmp_path_factory.mktemp("fuzz")
    config = PortalConfig(
        name="acme", domain=DOMAIN, rest_url="http://127.0.0.1:9/rest/1/code/", application_token=TOKEN
    )
    with sync_redis.Redis.from_url(redis_url) as db:
        db.flushdb()
    app = Intake(
        Settings(_env_file=None, redis_url=redis_url, data_dir=tmp, rules=tmp / "rules.yaml"),
        rules_with(DEFAULT_RULES, config),
    )
    yield app
    app.close()


def queued(redis_url: str) -> int:
    # Not the sweep the long-lived app queues when another test's flush makes Redis forget under it.
    with sync_redis.Redis.from_url(redis_url) as db:
        events = [m for m in db.zrange("arq:queue", 0, -1) if not m.startswith(AFTER_FORGETTING.encode())]
        return len(events) + int(db.dbsize() and len(db.keys("b24:job:*")))


def nested_key(depth: int) -> str:
    return "data" + "[x]" * depth


forged_tokens = st.one_of(
    st.text(max_size=80),
    st.just(TOKEN + "x"),
    st.just(TOKEN.upper()),
    st.just(TOKEN[:-1]),
    st.just(""),
    st.just(TOKEN + "\x00"),
    st.just(TOKEN[::-1]),
)
field_values = st.one_of(
    st.text(max_size=50), st.integers().map(str), st.just("9" * 40), st.just("x" * 30_000)
)


@st.composite
def bodies(draw: Any) -> tuple[bytes, str | None]:
    kind = draw(st.sampled_from(["bytes", "form", "event", "json", "deep_json", "deep_form", "many_fields"]))
    content_type = draw(st.sampled_from(CONTENT_TYPES + [None]))
    if kind == "bytes":
        return draw(st.binary(max_size=2000)), content_type
    if kind == "form":
        pairs = draw(st.lists(st.tuples(st.text(max_size=30), field_values), max_size=20))
        return urlencode(pairs).encode(), FORM
    if kind == "event":  # a well-formed event with a forged token and fuzzed fields
        extra = draw(
            st.dictionaries(
                st.sampled_from(
                    [
                        "data[FIELDS][ID]",
                        "ts",
                        "auth[domain]",
                        "auth[member_id]",
                        "event_handler_id",
                        "data[FIELDS]",
                    ]
                ),
                field_values,
                max_size=4,
            )
        )
        return event_form("ONCRMACTIVITYADD", 5, token=draw(forged_tokens), **extra).encode(), FORM
    if kind == "json":
        value = draw(
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                lambda inner: (
                    st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
                ),
                max_leaves=30,
            )
        )
        body = (
            value
            if not isinstance(value, dict)
            else {**value, "auth": {"domain": DOMAIN, "application_token": draw(forged_tokens)}}
        )
        return json.dumps(body).encode(), "application/json"
    if kind == "deep_json":
        depth = draw(st.integers(100, 5000))
        return ("[" * depth + "]" * depth).encode() if draw(st.booleans()) else (
            '{"a":' * depth + "1" + "}" * depth
        ).encode(), "application/json"
    if kind == "deep_form":
        depth = draw(st.integers(100, 1500))
        return f"{quote(nested_key(depth))}=1&auth[application_token]={quote(TOKEN + 'x')}".encode(), FORM
    count = draw(st.integers(150, 5000))
    return "&".join(f"f{i}=1" for i in range(count)).encode(), FORM


@hypothesis_settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies())
def test_no_body_gets_a_5xx_or_a_job_without_the_token(
    intake: Intake, redis_url: str, body: tuple[bytes, str | None]
) -> None:
    before = queued(redis_url)
    status, text = intake.post(*body)

    assert status < 500, (status, text[:300])
    assert "job_id" not in text
    assert queued(redis_url) == before


@hypothesis_settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.text(min_size=1, max_size=40), value=st.text(max_size=200))
def test_odd_headers_never_give_a_5xx(intake: Intake, name: str, value: str) -> None:
    try:
        status, _ = intake.post(
            event_form("ONCRMACTIVITYADD", 5, token="forged").encode(), FORM, {name: value}
        )
    except ValueError:
        return  # the client refuses to send a header that is not valid HTTP
    assert status < 500


async def test_an_address_outside_the_allow_list_is_refused(
    aiohttp_client: Any, settings: Settings, rules: RuleSet, redis: Any
) -> None:
    outside = await aiohttp_client(
        create_app(settings.model_copy(update={"allowed_sources": [ip_network("10.0.0.0/8")]}), rules)
    )
    inside = await aiohttp_client(
        create_app(settings.model_copy(update={"allowed_sources": [ip_network("127.0.0.0/8")]}), rules)
    )

    assert (await post_event(outside, "ONCRMACTIVITYADD", 5))[0] == 403
    assert await redis.zcard("arq:queue") == 0
    assert (await post_event(inside, "ONCRMACTIVITYADD", 5))[0] == 200


async def test_the_served_app_refuses_oversized_and_too_many_headers(settings: Settings, rules: RuleSet,
                                                                    redis: Any, caplog: Any) -> None:
    """Through the runner `b24rebind serve` uses, not the test client: the limits are the server's."""
    from app.service import web_runner

    runner = web_runner(settings, rules)
    server_log = logging.getLogger("aiohttp.server")  # a fresh throttle: earlier tests may have used its 10 s
    server_log.filters[:] = [f for f in server_log.filters if not isinstance(f, QuietBadRequests)]
    QuietBadRequests.install()
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    async def status_of(headers: str) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n".encode())
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        writer.close()
        return status

    try:
        assert await status_of("") == 200
        assert await status_of(f"X-Long: {'a' * 5000}\r\n") in (400, 431)
        assert await status_of("".join(f"X-H{i}: 1\r\n" for i in range(70))) in (400, 431)
        assert await status_of("".join(f"X-H{i}: 1\r\n" for i in range(40))) == 200
    finally:
        await runner.cleanup()
    assert not [r for r in caplog.records if "Failed to create request handler" in r.getMessage()]
    # aiohttp's own line for each: one line without a traceback, at most one every 10 s
    malformed = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(malformed) == 1 and malformed[0].exc_info is None, [r.getMessage() for r in malformed]
    assert malformed[0].getMessage().startswith("refused a malformed request from 127.0.0.1")


def test_memory_stays_flat_over_thousands_of_bad_requests(intake: Intake) -> None:
    requests = [(event_form("ONCRMACTIVITYADD", n, token=f"forged{n}").encode(), FORM) for n in range(40)] + [
        (b"\xff" * 500, FORM),
        (b"{" * 3000, "application/json"),
        (b"x" * 70_000, FORM),
        (f"{quote(nested_key(1000))}=1".encode(), FORM),
        (b"a=1", "text/plain"),
    ]

    def burst(n: int) -> None:
        for i in range(n):
            status, _ = intake.post(*requests[i % len(requests)])
            assert status < 500

    logging.disable(logging.WARNING)  # pytest keeps every captured record: that is not the service's memory
    try:
        burst(300)  # warm-up: caches, pools, interned strings
        tracemalloc.start()
        burst(500)
        gc.collect()
        start, _ = tracemalloc.get_traced_memory()
        burst(3000)
        gc.collect()
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        logging.disable(logging.NOTSET)
    print(f"memory: {(end - start) / 1e3:+.0f} kB over 3000 requests")
    assert end - start < 1_000_000, f"grew {(end - start) / 1e6:.1f} MB over 3000 requests"


def json_event(event: str = "ONCRMACTIVITYADD") -> dict[str, Any]:
    """An event as JSON, the same fields a portal's form post has."""
    return {"event": event, "event_handler_id": "975", "data": {"FIELDS": {"ID": "5"}}, "ts": "1766047124",
            "auth": {"domain": DOMAIN, "client_endpoint": f"https://{DOMAIN}/rest/",
                     "server_endpoint": "https://oauth.bitrix.info/rest/", "member_id": "d897063e1ce7c5eb9f04b9751eef",
                     "application_token": TOKEN, "access_token": "a", "refresh_token": "r"}}


def paths(value: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, inner in value.items():
        if isinstance(inner, dict):
            yield from paths(inner, (*prefix, key))
        else:
            yield (*prefix, key)


EVENT_FIELDS = list(paths(json_event()))
FORM_FIELDS = [key for key, _ in parse_qsl(event_form("ONCRMACTIVITYADD", 5))]


@pytest.mark.parametrize("event", ["ONCRMACTIVITYADD", "ONAPPINSTALL"])
@pytest.mark.parametrize("where", ["value", "key"])
@pytest.mark.parametrize("field", EVENT_FIELDS, ids=".".join)
async def test_a_lone_surrogate_in_any_json_field_is_a_400(client: Any, redis: Any, field: tuple[str, ...],
                                                          where: str, event: str, caplog: Any) -> None:
    body = json_event(event)
    holder = body
    for key in field[:-1]:
        holder = holder[key]
    if where == "value":
        holder[field[-1]] = "x\ud800"
    else:
        holder[field[-1] + "\udfff"] = holder.pop(field[-1])

    response = await client.post("/bitrix/events", data=json.dumps(body), headers={"Content-Type": "application/json"})

    assert response.status == 400, await response.text()
    assert "lone surrogate" in (await response.json())["error"]
    assert await redis.zcard("arq:queue") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("encoded", ["%ED%A0%80", "%ud800", "\\ud800"])
@pytest.mark.parametrize("field", FORM_FIELDS)
async def test_a_surrogate_in_any_form_field_never_gets_a_5xx(client: Any, redis: Any, field: str,
                                                              encoded: str, caplog: Any) -> None:
    pairs = parse_qsl(event_form("ONCRMACTIVITYADD", 5))
    body = "&".join(f"{quote(k)}={quote(v) + (encoded if k == field else '')}" for k, v in pairs)

    response = await client.post("/bitrix/events", data=body.encode(), headers={"Content-Type": FORM})

    # Percent-escapes of a surrogate's bytes are not UTF-8: the form's decoding replaces them, and the
    # field is then refused as its content warrants (or, where any text goes, accepted).
    assert response.status < 500, await response.text()
    if field == "auth[application_token]":
        assert response.status == 401  # the token with anything added is not the token
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("entity", ["0", "00", "-1"])
async def test_an_id_that_is_not_positive_is_a_400(client: Any, redis: Any, entity: str) -> None:
    response = await client.post("/bitrix/events", data=event_form("ONCRMACTIVITYADD", 5).replace(
        "data%5BFIELDS%5D%5BID%5D=5", f"data%5BFIELDS%5D%5BID%5D={entity}"), headers={"Content-Type": FORM})

    assert response.status == 400
    assert "positive whole number" in (await response.json())["error"]
    assert await redis.zcard("arq:queue") == 0


@pytest.mark.slow
async def test_a_connection_that_never_finishes_its_headers_is_closed(settings: Settings, rules: RuleSet,
                                                                       redis: Any) -> None:
    """Slowloris: the served app closes a connection whose request never completes (the keep-alive
    timeout, 15 s, also bounds the wait for a request's headers); it does not hold a slot for ever."""
    from app.service import web_runner

    runner = web_runner(settings, rules)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        writer.write(b"POST /bitrix/events HTTP/1.1\r\nHost: t\r\nX-Slow: ")  # and then nothing more
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), timeout=60) == b""  # closed by the server
        writer.close()
    finally:
        await runner.cleanup()
