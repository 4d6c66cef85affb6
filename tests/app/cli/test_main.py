"""The `b24rebind` command as a user runs it: its rules check, and its errors at startup."""
from __future__ import annotations

import socket
from pathlib import Path

from tests.support.processes import ROOT, b24rebind


def test_rules_check_accepts_the_example_with_its_variables_set(tmp_path: Path) -> None:
    result = b24rebind("rules", "check", str(ROOT / "rules.example.yaml"), cwd=tmp_path,
                       env={"B24_WEBHOOK_URL": "https://example.bitrix24.com/rest/1/x/", "B24_APPLICATION_TOKEN": "t"})

    assert result.returncode == 0, result.stderr
    assert "OK, 3 rules, 1 portal (main)" in result.stdout


def test_rules_check_reads_variables_from_dot_env(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("B24_WEBHOOK_URL=https://example.bitrix24.com/rest/1/x/\n"
                                   "B24_APPLICATION_TOKEN=t\n")
    (tmp_path / "rules.yaml").write_text((ROOT / "rules.example.yaml").read_text())

    result = b24rebind("rules", "check", cwd=tmp_path)

    assert result.returncode == 0, result.stderr


def test_rules_check_names_the_line_and_exits_1(tmp_path: Path) -> None:
    broken = tmp_path / "rules.yaml"
    broken.write_text("rules:\n  - name: x\n    on: [ONCRMACTIVITYADD]\n    do:\n      - bnid: [lead.contact]\n")

    result = b24rebind("rules", "check", str(broken), cwd=tmp_path)

    assert result.returncode == 1
    assert f"{broken}:5:9: unknown key 'bnid' in rule 'x'; did you mean 'bind'?" in result.stderr


def test_rules_check_says_a_missing_rules_file_is_missing(tmp_path: Path) -> None:
    result = b24rebind("rules", "check", cwd=tmp_path)

    assert result.returncode == 6, result.stderr
    assert result.stderr.startswith("b24rebind: rules.yaml: missing.") and "OK" not in result.stdout
    assert "cp rules.example.yaml rules.yaml" in result.stderr and "b24rebind demo --keep" in result.stderr


def test_the_service_refuses_to_start_on_an_invalid_rules_file(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text("rules: [\n")

    result = b24rebind("serve", cwd=tmp_path, env={"REDIS_URL": "redis://127.0.0.1:1/0"})

    assert result.returncode == 1
    assert "rules.yaml:2:1: not valid YAML" in result.stderr


def test_the_service_says_so_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = b24rebind("run", cwd=tmp_path, env={"B24_PORT": str(port), "B24_DATA_DIR": str(tmp_path)})

    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "B24_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_describes_the_tool_and_every_flag_has_help_text() -> None:
    import argparse

    from app.cli.main import _parser

    def flags(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, str]]:
        found = []
        for action in parser._actions:  # argparse keeps no public list of a parser's arguments
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += flags(sub, f"{path} {name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                found.append((path, action.dest))
                if not action.help:
                    found.append((path, f"{action.dest}: NO HELP"))
        return found

    assert [f for f in flags(_parser(), "b24rebind") if f[1].endswith("NO HELP")] == []
    help_text = _parser().format_help()
    assert "keeps Bitrix24 CRM activities bound to the right client" in help_text
    assert "3 Redis unreachable" in help_text


def test_version(tmp_path: Path) -> None:
    result = b24rebind("--version", cwd=tmp_path)

    assert result.returncode == 0 and result.stdout.startswith("b24rebind ")
