"""Fixtures that start real parts: Redis, the fake portal over HTTP, the web app and a worker."""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp.test_utils import TestClient
from arq import Worker
from arq.connections import ArqRedis
from pydantic import SecretStr

from app.bitrix.client import RetryPolicy
from app.portal_config import PortalConfig
from app.fakeportal import FakePortal
from app.rebind.echo import ChangeLog
from app.rules.facts import Binding
from app.rules.loader import parse_rules
from app.rules.model import RuleSet
from app.settings import Settings
from app.store.bundled_redis import BundledRedis
from app.store.queue import LIVE_QUEUE, connect
from app.web import create_app
from workers.context import CONTEXT
from workers.main import build_worker, shutdown

DOMAIN = "acme.bitrix24.com"
TOKEN = "t0ken-of-the-outbound-webhook"
WEBHOOK_CODE = "s3cretwebhookcode"
API_TOKEN = "test-api-token"

SLOW_TIMEOUT = 900  # seconds: the longest chaos scenario (a long Redis outage, then every job to finish) in a loaded run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A `slow` test (real processes, outages) gets SLOW_TIMEOUT unless it names its own."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """Randomness a failure can replay: B24_TEST_SEED=<seed> runs the same choices again. The seed is
    printed with a failing test's report."""
    seed = int(os.environ.get("B24_TEST_SEED") or random.SystemRandom().randrange(2**32))
    request.node.add_report_section("setup", "seed", f"B24_TEST_SEED={seed} replays this test's random choices")
    return random.Random(seed)


# The rules the service uses when no rules file exists.
DEFAULT_RULES = resources.files("app.rules").joinpath("default.yaml").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A redis-server of this test run's own, on a private unix socket: tests may flush it freely, and two
    suites on one machine never meet. TEST_REDIS_URL names another (a database nothing else uses)."""
    if "TEST_REDIS_URL" in os.environ:
        yield os.environ["TEST_REDIS_URL"]
        return
    directory = Path(tempfile.mkdtemp(prefix="b24test"))  # short: unix socket paths have a length limit
    server = BundledRedis(directory / "redis")
    yield server.start()
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def private_redis() -> Iterator[BundledRedis]:
    """A Redis of the test's own, which it may stop and start (a short path: unix sockets have a length limit)."""
    directory = Path(tempfile.mkdtemp(prefix="b24redis"))
    server = BundledRedis(directory / "redis")
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await connect(redis_url)
    await pool.flushdb()
    yield pool
    await pool.aclose()


@pytest.fixture
async def portal() -> AsyncIterator[FakePortal]:
    fake = FakePortal(webhook_code=WEBHOOK_CODE, per_second=None)
    await fake.start()
    yield fake
    await fake.close()
    # A real portal lets a binding to a missing record through; the service must never make one.
    assert fake.check_invariants() == [], "the service left a dangling binding"


@pytest.fixture
def portal_config(portal: FakePortal) -> PortalConfig:
    return PortalConfig(name="acme", domain=DOMAIN, rest_url=portal.rest_url, application_token=TOKEN,
                        rate_limit={"per_second": 1000, "burst": 1000})


def rules_with(text: str, portal_config: PortalConfig) -> RuleSet:
    rules = parse_rules(text, "rules.yaml", {})
    return rules.model_copy(update={"portals": {"acme": portal_config}})


@pytest.fixture
def rules(portal_config: PortalConfig) -> RuleSet:
    return rules_with(DEFAULT_RULES, portal_config)


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings(_env_file=None, redis_url=redis_url, data_dir=tmp_path, rules=tmp_path / "rules.yaml")


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings, rules: RuleSet, redis: ArqRedis) -> TestClient:
    return await aiohttp_client(create_app(settings, rules))


@pytest.fixture
async def admin(aiohttp_client: Any, settings: Settings, rules: RuleSet, redis: ArqRedis) -> TestClient:
    """The web app with an API token set, and a client that sends it: retry and replay need one."""
    guarded = settings.model_copy(update={"api_token": SecretStr(API_TOKEN)})
    return await aiohttp_client(create_app(guarded, rules), headers={"Authorization": f"Bearer {API_TOKEN}"})


@pytest.fixture
async def make_worker(settings: Settings, rules: RuleSet, redis: ArqRedis) -> AsyncIterator[Any]:
    """Workers that drain the queue and stop (burst mode), with fast retries."""
    made: list[Worker] = []

    def make(rules: RuleSet = rules, queue_name: str = LIVE_QUEUE, max_jobs: int = 10, **ctx: Any) -> Worker:
        ctx = {"retry_policy": RetryPolicy(attempts=3, base=0.01, cap=0.05),
               "retry_delays": (0.05, 0.1, 0.2, 0.3, 0.5), **ctx}
        worker = build_worker(settings, rules, redis, burst=True, poll_delay=0.01, handle_signals=False, ctx=ctx,
                              queue_name=queue_name, max_jobs=max_jobs)
        made.append(worker)
        return worker

    yield make
    # The workers share the test's Redis pool, so only their own resources are closed here.
    for worker in made:
        if CONTEXT in worker.ctx:
            await shutdown(worker.ctx)


@pytest.fixture
def worker(make_worker: Any) -> Worker:
    return make_worker()


def event_form(event: str, entity_id: int, *, ts: int = 1766047124, token: str = TOKEN,
               domain: str = DOMAIN, **extra: str) -> str:
    """An event body exactly as a portal's outbound webhook posts it."""
    return urlencode({"event": event, "event_handler_id": "975", "data[FIELDS][ID]": str(entity_id),
                      "ts": str(ts), "auth[domain]": domain,
                      "auth[client_endpoint]": f"https://{domain}/rest/",
                      "auth[server_endpoint]": "https://oauth.bitrix.info/rest/",
                      "auth[member_id]": "d897063e1ce7c5eb9f04b9751eef5915",
                      "auth[application_token]": token, **extra})


async def post_event(client: TestClient, event: str, entity_id: int, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    response = await client.post("/bitrix/events", data=event_form(event, entity_id, **kwargs),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    return response.status, await response.json()


async def record_changes(redis: Any, changes: ChangeLog, activity_id: int, after: tuple[Binding, ...] = (),
                         times: int = 1) -> None:
    """What a job's last pipeline records for an activity it changed (workers/tasks.py, _save_attempt)."""
    async with redis.pipeline(transaction=False) as pipe:
        for _ in range(times):
            changes.stage_record(pipe, activity_id, after)
        await pipe.execute()


async def post_install(client: Any, auth: dict[str, str], domain: str = DOMAIN) -> Any:
    """ONAPPINSTALL as the portal posts it when the application is installed."""
    body = {"event": "ONAPPINSTALL", "data[VERSION]": "1", "data[ACTIVE]": "Y", "ts": "1",
            **{f"auth[{key}]": value for key, value in {**auth, "domain": domain}.items()}}
    return await client.post("/bitrix/events", data=urlencode(body),
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
