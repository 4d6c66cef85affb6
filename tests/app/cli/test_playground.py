"""The playground: while `b24rebind demo --keep` runs, every command reaches it and answers about it.

The demo runs as a real process on ports of this test's own; each command is a real process too, run where
no rules.yaml is written, as a newcomer runs them after `demo --keep`."""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.cli.main import _parser

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow  # real processes
NOTICE = "b24rebind: using the demo kept running (pid "
SERVICE_ITSELF = {"serve", "worker", "run"}  # the service's own processes: they start one, not reach it


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def playground(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "B24_DATA_DIR": str(tmp_path / "var"),
           "B24_PORT": str(free_port()), "B24_DEMO_PORT": str(free_port())}
    with subprocess.Popen([sys.executable, "-m", "app", "demo", "--keep"], cwd=tmp_path, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as kept:
        try:
            seen = ""
            deadline = time.monotonic() + 120
            while "The demo stays up" not in seen:
                assert time.monotonic() < deadline and kept.poll() is None, seen[-3000:]
                seen += kept.stdout.readline()  # type: ignore[union-attr]
            yield tmp_path, env
        finally:
            if kept.poll() is None:
                kept.terminate()
            kept.wait(timeout=60)


def b24rebind(where: tuple[Path, dict[str, str]], *args: str) -> tuple[str, str]:
    cwd, env = where
    result = subprocess.run([sys.executable, "-m", "app", *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=180)
    assert "Traceback" not in result.stdout + result.stderr, (args, result.stderr)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert result.stdout.strip(), args  # a non-empty answer
    return result.stdout, result.stderr


def commands_listed(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    """Every command and sub-command `b24rebind --help` lists, as "rules explain"."""
    found: set[str] = set()
    for action in parser._actions:  # noqa: SLF001 - argparse has no public way to list sub-commands
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                found.add(f"{prefix}{name}")
                found |= commands_listed(sub, f"{prefix}{name} ")
    return found


def test_every_command_reaches_the_kept_demo(playground: tuple[Path, dict[str, str]]) -> None:
    ran: set[str] = set()

    def run(*args: str) -> str:
        out, err = b24rebind(playground, *args)
        words = [a for a in args if not a.startswith("-")]
        ran.update(" ".join(words[:n]) for n in (1, 2))
        if args[0] != "demo":
            assert err.startswith(NOTICE), (args, err)  # it says which data it uses
        return out

    out = run("demo", "convert", "--activities", "5", "--late", "2", "--repeat")
    assert "Lead 3 (Dmitri Orlov) is converted" in out and "activity 11 (late e-mail #1): contact 2, company 2" in out

    listing = run("jobs", "list", "--entity", "11")
    assert re.search(r"succeeded\s+\w+\s+demo\s+ONCRMACTIVITYADD\s+11\s+re-bound 1 item", listing), listing
    job = run("jobs", "list", "--entity", "11", "--limit", "1", "-q").strip()
    assert re.fullmatch(r"[0-9a-f]{24}", job), job
    assert "activity 11: [lead 3] -> [contact 2, company 2] changed" in run("jobs", "show", job)
    assert re.search(r"succeeded [1-9]", run("jobs", "watch", "--once"))
    stats = run("stats")
    assert "portal demo (demo.b24rebind.local): reachable" in stats and re.search(r"succeeded [1-9]", stats)
    assert "demo activity 11: [lead 3] -> [contact 2, company 2]" in run("audit", "--activity", "11")
    assert "activity 11: [lead 3] -> [contact 2, company 2]" in run("audit", "--job", job)
    assert re.search(r"var/demo/rules\.yaml: OK, 1 rule, 1 portal \(demo\)", run("rules", "check"))
    assert "5 passed, 0 failed" in run("rules", "test", str(ROOT / "examples" / "rules.tests.yaml"))
    doctor = run("doctor")
    assert "portal demo (demo.b24rebind.local)" in doctor and "✗" not in doctor

    undone = run("undo", job)
    assert "activity 11: restored [lead 3]" in undone and f"job {job} is now undone" in undone
    explained = run("rules", "explain", "--activity", "11")
    assert "rule 'converted-lead-history-follows-client' matches" in explained
    assert re.search(r"11\s+lead 3\s+contact 2, company 2", explained), explained
    backfill = run("backfill", "--since", "2020-01-01", "--dry-run")
    assert "4 converted leads since 2020-01-01" in backfill and "dry run: would re-bind 1 activity" in backfill
    assert "reconcile demo: " in run("reconcile")
    assert "queued again: 1 job(s)" in run("jobs", "retry", job)
    second = subprocess.run([sys.executable, "-m", "app", "demo", "--keep"], cwd=playground[0], env=playground[1],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "a demo is kept running already" in second.stderr, second.stderr
    assert "has stopped" in run("demo", "stop")
    assert not (playground[0] / "var" / "demo" / "playground.json").exists()
    after = subprocess.run([sys.executable, "-m", "app", "rules", "check"], cwd=playground[0], env=playground[1],
                           capture_output=True, text=True, timeout=120)
    assert after.returncode == 6 and "rules.yaml: missing" in after.stderr  # back to this directory's own

    listed = commands_listed(_parser())
    missing = {c for c in listed if c.split()[0] not in SERVICE_ITSELF} - ran - {"demo"}  # `demo` is the fixture
    assert not missing, f"commands `b24rebind --help` lists that this test does not run: {sorted(missing)}"
