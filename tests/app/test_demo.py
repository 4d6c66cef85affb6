"""`b24rebind demo` as a newcomer runs it: the real sequence, in words; `--keep` and `demo convert`."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.demo.portal import DEMO_WEBHOOK_CODE
from tests.support.processes import as_from_a_terminal, ended

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # real processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# A port of this run's own, not the default 8099: another suite (or a person's kept demo) may hold that one.
DEMO_PORT = free_port()


def env(tmp_path: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "B24_PORT": "0", "B24_DATA_DIR": str(tmp_path / "var"),
            "B24_DEMO_PORT": str(DEMO_PORT)}


def b24rebind(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=cwd, capture_output=True, text=True,
                          env=env(cwd), timeout=120)


def test_the_demo_plays_what_the_portal_does_and_what_b24rebind_adds(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text("portals:\n  real:\n    domain: real.bitrix24.com\n"
                                         "    rest_url: https://real.bitrix24.com/rest/1/x/\n"
                                         "    application_token: t\nrules: []\n")
    result = b24rebind("demo", cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # The portal's conversion copies, and keeps the lead binding; b24rebind removes it.
    assert "activity 1 (Re: price list): lead 1, contact 1, company 1" in out
    assert out.count("activity 1 (Re: price list): contact 1, company 1") == 1
    assert "activity 4 (late e-mail #1): lead 1\n" in out and "activity 4 (late e-mail #1): contact 1, company 1" in out
    assert "activity 5 (New order): lead 2, deal 1\n" in out
    assert "activity 5 (New order): deal 1, contact 1, company 1" in out
    # The portal echoes every binding write to the service, which ignores them.
    assert "the portal echoed b24rebind's 3 writes (ONCRMACTIVITYUPDATE); b24rebind ignored 3 (echoes" in out, out
    assert "Try `b24rebind demo`" not in out and "(type id, entity id)" not in out
    assert "Traceback" not in result.stderr
    # Its data lives apart from a real installation's (its own bundled Redis in var/demo).
    assert (tmp_path / "var" / "demo").is_dir()


def test_demo_keep_then_demo_convert_plays_another_conversion(tmp_path: Path) -> None:
    # SIGINT as from a terminal: the Ctrl-C that ends the kept demo must not be ignored, whoever runs the tests.
    with subprocess.Popen([sys.executable, "-m", "app", "demo", "--keep"], cwd=tmp_path, env=env(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=as_from_a_terminal) as kept, ended(kept):
        play_on(kept, tmp_path)
    assert kept.returncode == 0


def play_on(kept: subprocess.Popen[str], tmp_path: Path) -> None:
    try:
        seen = ""
        deadline = time.monotonic() + 90
        while "The demo stays up" not in seen:
            assert time.monotonic() < deadline and kept.poll() is None, seen[-3000:]
            seen += kept.stdout.readline()  # type: ignore[union-attr]
        assert f"http://127.0.0.1:{DEMO_PORT}/rest/1/{DEMO_WEBHOOK_CODE}/" in seen

        result = b24rebind("demo", "convert", "--activities", "60", "--late", "2", "--repeat", cwd=tmp_path)

        assert result.returncode == 0, result.stderr
        assert "its 60 activities" in result.stdout and "... and 55 more, the same" in result.stdout
        assert "2 e-mails arrive after the conversion" in result.stdout
        assert "b24rebind gives it to the client the portal already knew" in result.stdout
    finally:
        kept.send_signal(signal.SIGINT)
        kept.wait(timeout=60)


def test_demo_convert_without_a_kept_demo_says_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", DEMO_PORT)) != 0, "stop the demo kept running on this machine"
    result = b24rebind("demo", "convert", cwd=tmp_path)

    assert result.returncode == 4  # the portal is down
    assert "start one with `b24rebind demo --keep`" in result.stderr and "Traceback" not in result.stderr


def test_the_demo_beside_a_running_service_takes_a_port_of_its_own(tmp_path: Path) -> None:
    """README's first two commands: `./scripts/start` holds B24_PORT; `./scripts/start demo` must not fail."""
    port = free_port()
    service_env = {**env(tmp_path), "B24_PORT": str(port)}
    with subprocess.Popen([sys.executable, "-m", "app", "run"], cwd=tmp_path, env=service_env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as service:
        try:
            deadline = time.monotonic() + 60
            while not _listening(port):
                assert time.monotonic() < deadline and service.poll() is None, "the service did not start"
                time.sleep(0.2)

            result = subprocess.run([sys.executable, "-m", "app", "demo"], cwd=tmp_path, capture_output=True,
                                    text=True, env=service_env, timeout=180)

            assert result.returncode == 0, result.stderr[-3000:]
            assert f"Port {port} is taken" in result.stdout and "takes port" in result.stdout
            taken = int(result.stdout.split("takes port ")[1].split()[0])
            assert taken != port and f"dashboard:        http://127.0.0.1:{taken}/" in result.stdout
            assert "activity 1 (Re: price list): contact 1, company 1" in result.stdout
            assert service.poll() is None  # the service was left alone
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=60)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_the_story_says_would_when_the_playgrounds_rules_are_a_dry_run() -> None:
    """`mode: dry_run` in var/demo/rules.yaml: the jobs write nothing, and the story must not say they did."""
    from app.demo.story import what_b24rebind_did
    from app.store.jobs import JobRecord

    record = JobRecord.for_event("demo", "ONCRMLEADUPDATE", 1, "1766047124", "975")
    done = record.model_copy(update={"plan": [{"activity": 1, "dry_run": False}]})
    dry = record.model_copy(update={"plan": [{"activity": 1, "dry_run": True}]})

    assert what_b24rebind_did([done], "removes the lead binding") == "   b24rebind removes the lead binding:"
    assert what_b24rebind_did([dry, None], "brings them to the client").startswith(
        "   b24rebind would bring them to the client (a dry run: nothing written")
