"""README's "Your first ten minutes", run as written in a fresh copy of the repository.

Each ```bash block runs in order (in its own bash, `-euo pipefail`, from the copy's root); each must exit
0, and the ```text block under it lists lines its output must show, in order (`…` stands for anything,
runs of spaces count as one). The copy is the working tree as git sees it (tracked and untracked files,
nothing ignored). Its `.venv` is a small one that reads this run's installed packages and the copy's own
code, marked as installed for `./scripts/start`, so no block installs anything (CI's clean clone does)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # real processes, a minute or two
FENCE = re.compile(r"^ *```(\w+)\n(.*?)^ *```$", re.S | re.M)


def first_ten_minutes() -> list[tuple[str, list[str]]]:
    """The section's shell blocks, each with the lines the text block under it shows."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Your first ten minutes", 1)[1].split("\n## ", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for match in FENCE.finditer(section):
        kind, body = match.group(1), match.group(2)
        lines = [line.strip() for line in body.splitlines() if line.strip()]
        if kind == "bash":
            steps.append(("\n".join(lines), []))
        elif kind == "text" and steps:
            steps[-1][1].extend(lines)
    return steps


def shows(output: str, expected: list[str]) -> str | None:
    """None when the output shows every expected line, in order; else the first line it does not show."""
    flat = [" ".join(line.split()) for line in output.splitlines()]
    at = 0
    for line in expected:
        pattern = re.compile(".*?".join(re.escape(" ".join(part.split())) for part in line.split("…")))
        while at < len(flat) and not pattern.search(flat[at]):
            at += 1
        if at == len(flat):
            return line
        at += 1
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def copy_of_the_working_tree(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def small_venv(copy: Path) -> None:
    """A .venv whose python finds the copy's code first, then this run's installed packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(copy / ".venv")], check=True)
    python = copy / ".venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "b24rebind_readme_test.pth").write_text(f"{copy}\n{sysconfig.get_paths()['purelib']}\n")
    script = copy / ".venv" / "bin" / "b24rebind"
    script.write_text(f"#!{python}\nimport sys\nfrom app.cli.main import main\nsys.exit(main())\n")
    script.chmod(0o755)
    digest = hashlib.sha256((copy / "pyproject.toml").read_bytes()).hexdigest()
    (copy / ".venv" / ".b24rebind-installed").write_text(f"{digest} {copy.resolve()}\n")


@pytest.fixture
def fresh_copy(tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / "b24rebind"
    copy.mkdir()
    copy_of_the_working_tree(copy)
    small_venv(copy)
    try:
        yield copy
    finally:  # a demo a failed block left running, found by the profile it wrote
        profile = copy / "var" / "demo" / "playground.json"
        if profile.exists():
            try:
                os.kill(int(json.loads(profile.read_text())["pid"]), signal.SIGTERM)
            except (OSError, ValueError, KeyError):
                pass


def test_the_first_ten_minutes_run_as_written(fresh_copy: Path) -> None:
    steps = first_ten_minutes()
    assert len(steps) >= 6 and steps[0][0] == "./scripts/start demo", steps
    # Ports of this run's own: the README's 8080 and 8099 may be someone else's here.
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(fresh_copy.parent), "LANG": "C.UTF-8",
           "B24_PORT": str(free_port()), "B24_DEMO_PORT": str(free_port())}
    for number, (block, expected) in enumerate(steps, start=1):
        log = fresh_copy.parent / f"block{number}.log"
        with log.open("w") as out:  # a file, not a pipe: a block may leave the demo running in the background
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=fresh_copy, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, timeout=600)
        output = log.read_text()
        assert result.returncode == 0, f"block {number} exited {result.returncode}:\n{block}\n---\n{output[-3000:]}"
        assert "Traceback" not in output, output
        missing = shows(output, expected)
        assert missing is None, f"block {number} did not show {missing!r}:\n{block}\n---\n{output[-4000:]}"


def test_the_matcher_fails_on_a_line_the_output_lacks() -> None:
    assert shows("a 1\nb  2 x\nc", ["a …", "b 2 …"]) is None
    assert shows("a\nb", ["b", "a"]) == "a"  # in order
    assert shows("a", ["z"]) == "z"
