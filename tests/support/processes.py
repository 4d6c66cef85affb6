"""Real processes for tests: started as an operator would, killed as a crash would, and always ended
by the test that started them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from app.fakeportal import FakePortal
from tests.conftest import DEFAULT_RULES, DOMAIN, TOKEN

ROOT = Path(__file__).resolve().parents[2]


def as_from_a_terminal() -> None:
    """A child's SIGINT as a terminal's Ctrl-C delivers it (pass as `preexec_fn`). Whoever runs the
    tests may ignore SIGINT (a background job of a non-interactive shell does, so does nohup); a child
    inherits that, and a Ctrl-C the test sends would be ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def ended(process: subprocess.Popen[Any]) -> Iterator[subprocess.Popen[Any]]:
    """The process, killed and reaped when the block leaves, however it leaves."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@asynccontextmanager
async def ended_async(process: asyncio.subprocess.Process) -> AsyncIterator[asyncio.subprocess.Process]:
    """An asyncio subprocess, killed and reaped when the block leaves, however it leaves."""
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.wait(), timeout=30)


def b24rebind(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`b24rebind ARGS` in a subprocess with a bare environment (killed after 60 s)."""
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **(env or {})}, timeout=60)


def write_rules(path: Path, portal: FakePortal, per_second: float = 1000, burst: int = 1000) -> Path:
    """A rules file for the fake portal, with the rate limit the workers should keep to."""
    path.write_text(f"""
portals:
  acme:
    domain: {DOMAIN}
    rest_url: {portal.rest_url}
    application_token: {TOKEN}
    rate_limit: {{per_second: {per_second}, burst: {burst}}}
{DEFAULT_RULES}""")
    return path


class ServiceProcess:
    """`python -m app <command>` (serve, worker, run) in its own process group, its log in a file."""

    def __init__(self, command: str, redis_url: str, rules: Path, data_dir: Path, name: str, **env: str) -> None:
        self.command = command
        self.log = data_dir / f"{name}.log"
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "B24_RULES": str(rules),
            "B24_DATA_DIR": str(data_dir),
            "LOG_LEVEL": os.environ.get("B24_TEST_WORKER_LOG", "INFO"),
            "B24_RECONCILE_INTERVAL": "0",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app", self.command],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)
            self.process.wait(timeout=60)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not leave within the grace period; the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.terminate()
        try:
            return self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


class WorkerProcess(ServiceProcess):
    """`python -m app worker` (what `python -m workers` runs)."""

    def __init__(self, redis_url: str, rules: Path, data_dir: Path, name: str = "worker", **env: str) -> None:
        super().__init__("worker", redis_url, rules, data_dir, name, **env)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
