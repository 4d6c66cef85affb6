"""Real worker processes for the chaos tests: started as an operator would, killed as a crash would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from app.fakeportal.portal import FakePortal
from tests.conftest import DEFAULT_RULES, DOMAIN, TOKEN

ROOT = Path(__file__).resolve().parents[2]


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


class WorkerProcess:
    """`python -m workers` in its own process group, its log in a file."""

    def __init__(self, redis_url: str, rules: Path, data_dir: Path, name: str = "worker", **env: str) -> None:
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

    def start(self) -> WorkerProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers"],
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

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not leave within the grace period."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.kill()
