"""Hostile values for every setting: each is answered in one line, `setting NAME: what is wrong; what to
write`, and no command prints a traceback. The settings are found by introspection, so a new one is
covered without touching this file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli.main import main
from app.settings import Settings, variable_name
from app.store import namespace

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ["", " ", "-1", "0", "abc", "a b", "1e309", "nan", "inf", "99999999999999999999", "*", "/", "[", "{}",
           "/etc/passwd", "http://x:1", "localhost:6379", "redis://h:abc/0", "\t", "x" * 5000, "☃"]
ENVIRONMENT_NAMES = sorted(variable_name(field) for field in Settings.model_fields)


def run_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str,
                   *command: str) -> tuple[int, str]:
    before = namespace.prefixed("")
    with monkeypatch.context() as patch:
        patch.setenv(name, value)
        try:
            code = main(list(command))  # an exception escaping here is the traceback a user would see
        finally:
            namespace.use_prefix(before)  # main sets this process's key prefix: the tests after need theirs
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("name", ENVIRONMENT_NAMES)
def test_every_hostile_value_of_a_setting_is_one_line_or_accepted(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        redis_url: str) -> None:
    monkeypatch.chdir(tmp_path)  # no .env, no rules.yaml
    for other in ENVIRONMENT_NAMES:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv("B24_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("REDIS_URL", redis_url)  # the suite's own Redis: `stats` reads it, and writes nothing
    monkeypatch.setenv("B24_KEY_PREFIX", "hostile-settings")
    refused = []
    for value in HOSTILE:
        code, output = run_in_process(monkeypatch, capsys, name, value, "rules", "check")

        assert "Traceback" not in output, (name, value, output)
        if code == 2:  # refused at load: one line naming the setting, what is wrong and what to write
            lines = output.strip().splitlines()
            assert len(lines) == 1, (name, value, output)
            assert lines[0].startswith(f"b24rebind: setting {name}: ") and "; " in lines[0], (name, value, output)
            assert len(lines[0]) < 400, lines[0]
            refused.append(value)
        else:  # accepted: the command ran and ended as it does without the setting (rules.yaml is missing)
            assert code in (0, 1, 6) and output.startswith(("b24rebind: ", "rules.yaml")), (name, value, code, output)
            # and a command that reads Redis, the data directory and the rules with it says what it must
            code, output = run_in_process(monkeypatch, capsys, name, value, "stats")
            assert "Traceback" not in output and output.strip(), (name, value, output)
            assert code == 0 or len(output.strip().splitlines()) == 1, (name, value, code, output)
    assert refused, f"{name}: no hostile value was refused"


@pytest.mark.parametrize("value", ["localhost:6379", "http://127.0.0.1:6379/0", "redis://127.0.0.1:port/0",
                                   "redis://127.0.0.1:6379/zero", "unix://", "redis+sentinel://s1:26379"])
def test_a_malformed_redis_url_is_one_line_from_run_and_stats(value: str, tmp_path: Path) -> None:
    for command in (["run"], ["stats"]):
        result = subprocess.run([sys.executable, "-m", "app", *command], cwd=tmp_path, capture_output=True,
                                text=True, timeout=60,
                                env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "REDIS_URL": value,
                                     "B24_DATA_DIR": str(tmp_path / "var"), "B24_PORT": "0"})

        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("b24rebind: setting REDIS_URL: ") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("value", ["redis://127.0.0.1:6379/0", "rediss://user:secret@redis.example.com:6380/1",
                                   "unix:///run/redis/redis.sock", "redis://:secret@/0",
                                   "redis+sentinel://s1:26379,s2:26380/mymaster",
                                   "redis+sentinel://:secret@s1:26379/mymaster/2", "redis://[::1]:6379/0"])
def test_the_redis_url_forms_the_service_connects_with_are_accepted(value: str, monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_URL", value)

    assert Settings().redis_url == value


def test_a_refused_redis_url_never_repeats_its_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = run_in_process(monkeypatch, capsys, "REDIS_URL", "http://user:hunter2@redis:6379", "stats")

    assert code == 2 and "hunter2" not in output


def test_a_data_directory_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = subprocess.run([sys.executable, "-m", "app", "stats"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT),
                                             "B24_DATA_DIR": str(tmp_path / "file" / "var")})

    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("b24rebind: cannot use ") and result.stderr.count("\n") == 1


def test_the_shipped_env_example_loads_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cp .env.example .env` is the first step of connecting a portal: its empty lines mean "unset"."""
    example = Path(__file__).resolve().parents[1] / ".env.example"
    for line in example.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            monkeypatch.delenv(line.split("=", 1)[0].strip(), raising=False)

    settings = Settings(_env_file=example)  # type: ignore[call-arg]

    assert settings.spool_dir is None and settings.redis_url is None and settings.alert_webhook is None
