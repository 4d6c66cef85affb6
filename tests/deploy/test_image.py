"""The image, built and run without a Docker engine: what deploy/docker/Dockerfile says, done on this machine.

CI has no Docker engine, so `docker build` is never run. This module reads the Dockerfile and follows it
instead: a temporary directory stands for the container's filesystem (`/opt/venv` is `<tmp>/opt/venv`),
its COPY lines copy the same files from the repository, its RUN steps run (the venv, the non-editable
`pip install .`, compileall), and ENTRYPOINT + CMD and the roles that deploy/compose.yaml and the
Kubernetes manifests run are started from the image's working directory, with the image's ENV plus what
the compose file or the manifests add, and stopped with its STOPSIGNAL. A Dockerfile line this module
does not know how to follow fails the test, so a change to the Dockerfile is a change to this module.

Where it differs from a real build, on purpose:
- the base image's Python is the interpreter running the tests (same major.minor, checked);
- the project's dependencies are linked into the venv from the test environment instead of downloaded,
  so only the build backend (setuptools, in pip's isolated build) comes from the package index;
- processes run as the test's user, not uid 10001, and the ports are free ones (B24_PORT), put into the
  health check commands in place of the exposed 8080.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from dotenv import dotenv_values
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.words import plural
from tests.conftest import TOKEN, event_form

pytestmark = pytest.mark.slow  # real processes: left out of the fast loop (`-m "not slow"`)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
KUBE = DEPLOY / "kubernetes"
# What the README has the operator copy before `docker compose up`: `.env` and `rules.yaml` from these.
OPERATOR_COPIES = {ROOT / ".env": ROOT / ".env.example", ROOT / "rules.yaml": ROOT / "rules.example.yaml"}
DOCKER_STOP_TIMEOUT = 10.0  # `docker stop` without -t: STOPSIGNAL, then SIGKILL 10 s later
PORTAL_DOMAIN = "example.bitrix24.com"  # the domain in rules.example.yaml and the Kubernetes rules file


# ---------------------------------------------------------------- reading the Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int


def read_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or not (line or parts):
            continue
        if not parts:
            start = number
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        parts.append(line)
        keyword, _, value = " ".join(p for p in parts if p).partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
        parts = []
    assert not parts, f"{path}: the last instruction ends with a line continuation"
    return instructions


def command_form(value: str) -> list[str]:
    """ENTRYPOINT, CMD and HEALTHCHECK CMD: the exec form (JSON) as is, the shell form through /bin/sh -c."""
    if value.startswith("["):
        argv = json.loads(value)
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), value
        return argv
    return ["/bin/sh", "-c", value]


def expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m[1] or m[2], ""), value)


def env_pairs(value: str, env: dict[str, str]) -> dict[str, str]:
    """ENV KEY=VALUE ... (or the old ENV KEY VALUE); $VAR is what the variable was before this line."""
    tokens = shlex.split(value)
    if "=" not in tokens[0]:
        return {tokens[0]: expand(value.split(None, 1)[1], env)}
    return {key: expand(val, env) for key, _, val in (token.partition("=") for token in tokens)}


def duration(text: str) -> float:
    """Docker and compose durations: 30s, 1m30s, 500ms."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ---------------------------------------------------------------- following it


def host_path() -> str:
    """The base image's PATH stand-in: this machine's, less the test environment's own bin directory."""
    own = str(Path(sys.prefix) / "bin")
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != own)


def clean_environ() -> dict[str, str]:
    """This process's environment without what points Python at the test environment or the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}


@dataclass
class Image:
    """A container's filesystem under `root`, and what the final stage says about running it."""

    root: Path
    base_python: str = ""
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = ""
    users: dict[str, str] = field(default_factory=dict)  # uid -> home directory, from useradd
    expose: list[int] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    healthcheck_timeout: float = 30.0
    stopsignal: signal.Signals = signal.SIGTERM
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    venvs: list[str] = field(default_factory=list)
    build_log: list[str] = field(default_factory=list)
    build_seconds: float = 0.0

    def path(self, container_path: str) -> Path:
        assert container_path.startswith("/"), container_path
        return self.root / posixpath.normpath(container_path).lstrip("/")

    def inside(self, value: str) -> str:
        """A value as a process here must see it: /x and every /x in a PATH list moved under root,
        when the image (or a mount) has /x's top directory; other values as they are."""
        def one(part: str) -> str:
            top = part.split("/")[1] if part.startswith("/") else ""
            return str(self.path(part)) if top and (self.root / top).exists() else part
        return os.pathsep.join(one(p) for p in value.split(os.pathsep)) if value.startswith("/") else value

    def run_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a process in the container: the image's ENV, then what its runner adds."""
        uid = self.user.split(":")[0]
        env = {"HOME": self.users.get(uid, "/"), "LANG": "C.UTF-8", **self.env, **(extra or {})}
        return {k: self.inside(v) for k, v in env.items()}

    def which(self, name: str, env: dict[str, str], ours: bool = True) -> str:
        """What a container runtime would execute for argv[0]: a file the Dockerfile made (`ours`), or
        else possibly one of the base image's (/bin/sh), which this machine stands in for."""
        found = shutil.which(name, path=env["PATH"]) if "/" not in name else self.inside(name)
        assert found, f"{name}: no such command in the image"
        assert not ours or Path(found).is_relative_to(self.root), f"{name} is not the image's: {found}"
        return found

    def layer(self, name: str) -> Image:
        """The image as one container sees it: a filesystem of its own, as a container's writable layer,
        sharing only the venvs (which cannot move: their scripts name their Python by its path)."""
        root = self.root.parent / f"container-{name}"
        assert not root.exists(), f"two containers named {name}"
        venvs = [self.path(v) for v in self.venvs]
        shutil.copytree(self.root, root, symlinks=True, ignore=lambda d, names: [
            n for n in names if Path(d, n) in venvs])
        for venv in self.venvs:
            (root / venv.lstrip("/")).symlink_to(self.path(venv), target_is_directory=True)
        return dataclasses.replace(self, root=root)

    # ------------------------------------------------ the build

    def build(self, dockerfile: Path, context: Path) -> None:
        started = time.monotonic()
        stages: list[str] = []
        env: dict[str, str] = {}
        for ins in read_dockerfile(dockerfile):
            where = f"{dockerfile.relative_to(ROOT)}:{ins.line}"
            keyword, value = ins.keyword, ins.value
            if keyword == "FROM":
                base, *alias = re.split(r"\s+as\s+", value, flags=re.IGNORECASE)
                self._check_base(base, where)
                stages.append(alias[0] if alias else str(len(stages)))
                env, self.workdir = {"PATH": host_path()}, "/"
                self.entrypoint, self.cmd, self.healthcheck, self.expose, self.user = [], [], [], [], ""
            elif keyword == "ENV":
                env.update(env_pairs(value, env))
            elif keyword == "WORKDIR":
                self.workdir = posixpath.normpath(posixpath.join(self.workdir, expand(value, env)))
                self.path(self.workdir).mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                self._copy(shlex.split(value), context, stages, where)
            elif keyword == "RUN":
                assert not value.startswith("["), f"{where}: RUN in exec form is new to this test"
                for step in value.split("&&"):
                    self._run(shlex.split(step), env, where)
            elif keyword == "USER":
                self.user = value
            elif keyword == "EXPOSE":
                self.expose = [int(port.split("/")[0]) for port in value.split()]
            elif keyword == "HEALTHCHECK":
                match = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(.+)", value)
                assert match, f"{where}: a HEALTHCHECK this test cannot read: {value}"
                options = dict(o.lstrip("-").split("=", 1) for o in match[1].split())
                self.healthcheck = command_form(match[2])
                self.healthcheck_timeout = duration(options.get("timeout", "30s"))
            elif keyword == "STOPSIGNAL":
                self.stopsignal = signal.Signals(int(value)) if value.isdigit() else signal.Signals[
                    value if value.startswith("SIG") else "SIG" + value]
            elif keyword == "ENTRYPOINT":
                self.entrypoint, self.cmd = command_form(value), []
            elif keyword == "CMD":
                self.cmd = command_form(value)
            elif keyword not in ("ARG", "LABEL"):
                pytest.fail(f"{where}: {keyword} is new to tests/deploy/test_image.py; teach it what it does")
        self.env = env
        self.build_seconds = time.monotonic() - started

    def _check_base(self, base: str, where: str) -> None:
        match = re.fullmatch(r"python:(\d+)\.(\d+)[\w.-]*", base)
        assert match, f"{where}: this test stands in for a python:X.Y base image, not for {base}"
        wanted = (int(match[1]), int(match[2]))
        assert sys.version_info[:2] == wanted, (
            f"{where}: the image runs Python {wanted[0]}.{wanted[1]}, the tests {sys.version.split()[0]}; "
            "build the test environment with the image's Python")
        self.base_python = sys.executable

    def _copy(self, args: list[str], context: Path, stages: list[str], where: str) -> None:
        options = [a for a in args if a.startswith("--")]
        *sources, dest = [a for a in args if not a.startswith("--")]
        target = posixpath.normpath(posixpath.join(self.workdir, dest))
        from_stage = next((o.split("=", 1)[1] for o in options if o.startswith("--from=")), None)
        if from_stage is not None:
            assert from_stage in stages, f"{where}: COPY --from={from_stage}: no such stage"
            for source in sources:  # every stage shares one filesystem here
                if posixpath.normpath(source) != target:
                    shutil.copytree(self.path(source), self.path(target), symlinks=True, dirs_exist_ok=True)
            return
        for source in sources:
            path = context / source
            assert path.exists(), f"{where}: COPY {source}: not in the build context"
            if path.is_dir():
                shutil.copytree(path, self.path(target), dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                into_dir = dest.endswith("/") or len(sources) > 1
                destination = self.path(target) / path.name if into_dir else self.path(target)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, destination)

    def _run(self, argv: list[str], env: dict[str, str], where: str) -> None:
        if argv[0] in ("useradd", "chown"):
            # Users and owners need root and the image's /etc/passwd; processes here run as the test's user.
            if argv[0] == "useradd":
                uid = argv[argv.index("--uid") + 1] if "--uid" in argv else ""
                self.users[uid] = f"/home/{argv[-1]}"
            return
        if argv[:3] == ["python", "-m", "venv"] and len(argv) == 4:
            command = [self.base_python, "-m", "venv", str(self.path(argv[3]))]
            self.venvs.append(argv[3])
        elif argv[0] == "mkdir" or argv[0].startswith("/"):
            command = [a if not a.startswith("/") else str(self.path(a)) for a in argv]
            assert Path(command[0]).exists() or argv[0] == "mkdir", f"{where}: {argv[0]} is not in the image"
            if Path(argv[0]).name.startswith("pip") and "install" in argv:
                command.append("--verbose")  # pip hides what the build backend says (its warnings) otherwise
        else:
            pytest.fail(f"{where}: `{shlex.join(argv)}` is new to tests/deploy/test_image.py; teach it")
        build_env = {**clean_environ(), **{k: self.inside(v) for k, v in env.items()}}
        done = subprocess.run(command, cwd=self.path(self.workdir), env=build_env, capture_output=True,
                              text=True, timeout=300, check=False)
        self.build_log.append(f"$ {shlex.join(argv)}\n{done.stdout}{done.stderr}")
        assert done.returncode == 0, f"{where}: `{shlex.join(argv)}` failed:\n{done.stdout}\n{done.stderr}"
        if argv[:3] == ["python", "-m", "venv"]:
            link_dependencies(self.path(argv[3]), self.path(self.workdir) / "pyproject.toml")


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def link_dependencies(venv: Path, pyproject: Path) -> None:
    """Make the project's dependencies, and theirs, installed in `venv`, from the test environment.

    `pip install .` then finds them satisfied instead of downloading them, and installs only the project.
    The venv gets exactly the dependencies pyproject.toml names (with their own), not the test tools:
    an import of something undeclared fails in the image, and here too.
    """
    if not pyproject.exists():
        return  # a venv made before the project is copied: pip will see what it sees
    site = site_packages(venv)
    present = {canonicalize_name(d.metadata["Name"]) for d in metadata.distributions(path=[str(site)])}
    paths = sysconfig.get_paths()
    available: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions(path=sorted({paths["purelib"], paths["platlib"]})):
        available.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
    wanted = [Requirement(r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    pending = [(canonicalize_name(r.name), frozenset(r.extras)) for r in wanted
               if r.marker is None or r.marker.evaluate({"extra": ""})]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, extras = pending.pop()
        if (name, extras) in seen or name not in available:
            continue  # not in the test environment: pip downloads it, as the real build would
        seen.add((name, extras))
        dist = available[name]
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {"", *extras}):
                pending.append((canonicalize_name(sub.name), frozenset(sub.extras)))
        if name in present:
            continue
        assert dist.files, f"{name} has no RECORD: cannot tell its files"
        base = Path(str(dist.locate_file("")))
        for top in sorted({f.parts[0] for f in dist.files} - {"..", "__pycache__"}):
            link = site / top
            if not (link.exists() or link.is_symlink()):
                link.symlink_to(base / top)


# ---------------------------------------------------------------- running it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_port(argv: list[str], exposed: int, port: int) -> list[str]:
    """A health check command with the exposed port replaced by the one the test's process listens on."""
    assert any(f"127.0.0.1:{exposed}/" in a for a in argv), f"{argv} does not check port {exposed}"
    return [a.replace(f"127.0.0.1:{exposed}/", f"127.0.0.1:{port}/") for a in argv]


class Container:
    """One process started as the image's runtime would start it, its output in a log file."""

    def __init__(self, image: Image, name: str, command: list[str] | None, env: dict[str, str],
                 files: dict[str, str] | None = None) -> None:
        self.name = name
        self.image = image = image.layer(name)
        for path, content in (files or {}).items():  # mounted files and volumes (a path ending in /)
            if path.endswith("/"):
                image.path(path).mkdir(parents=True, exist_ok=True)
            else:
                image.path(path).parent.mkdir(parents=True, exist_ok=True)
                image.path(path).write_text(content)
        self.created = tree(image.root)
        self.env = image.run_env(env)
        argv = image.entrypoint + (image.cmd if command is None else command)  # compose/k8s replace CMD only
        self.argv = [image.which(argv[0], self.env), *argv[1:]]
        self.log = image.root.parent / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Container:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.argv, cwd=self.image.path(self.image.workdir), env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exited(self) -> str:
        return f"{self.name} exited ({self.process and self.process.returncode}):\n{self.output()}"

    async def wait_for_log(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.output())):
            assert self.running(), self.exited()
            assert time.monotonic() < deadline, f"{self.name} never logged /{pattern}/:\n{self.output()}"
            await asyncio.sleep(0.05)
        return match

    async def wait_until_serving(self, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.running(), self.exited()
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as answer:
                        if answer.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, f"{self.name} does not answer on {port}:\n{self.output()}"
                await asyncio.sleep(0.1)

    async def exec(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """A command run inside this container (a health check): same environment and directory."""
        command = [self.image.which(argv[0], self.env, ours=False), *argv[1:]]
        return await asyncio.to_thread(subprocess.run, command, cwd=self.image.path(self.image.workdir),
                                       env=self.env, capture_output=True, text=True, timeout=timeout,
                                       check=False)

    async def stop(self, grace: float) -> int:
        """The image's STOPSIGNAL, as `docker stop` and the kubelet send it; the exit code within `grace`."""
        assert self.process is not None and self.running(), f"{self.name} is not running:\n{self.output()}"
        self.process.send_signal(self.image.stopsignal)
        try:
            return await asyncio.to_thread(self.process.wait, grace)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} was still running {grace} s after {self.image.stopsignal.name}:\n"
                        f"{self.output()}")

    def written_outside(self, writable: list[str]) -> list[str]:
        """What it wrote to its filesystem outside the given directories (its writable volumes)."""
        allowed = [w.strip("/") for w in writable]
        return sorted(p for p in tree(self.image.root) - self.created
                      if not any(p == w or p.startswith(w + "/") for w in allowed))

    def left_nothing_running(self) -> bool:
        """Nothing of its process group (the bundled Redis, say) outlived it."""
        assert self.process is not None
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return True
        return False

    def kill(self) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)

    def remove(self) -> None:
        """`docker rm -f`: the process group killed (if still there) and the container's filesystem gone."""
        self.kill()
        shutil.rmtree(self.image.root, ignore_errors=True)
        self.log.unlink(missing_ok=True)


def tree(root: Path) -> set[str]:
    """Every file and directory under root, not following links (the venv's links to the dependencies)."""
    found = set()
    for directory, dirs, files in os.walk(root):
        found.update(os.path.relpath(os.path.join(directory, name), root) for name in dirs + files)
    return found



# ---------------------------------------------------------------- the image, once for the module


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    # A short path: the bundled Redis listens on a unix socket under /data, and those have a length limit.
    root = Path(tempfile.mkdtemp(prefix="b24img-"))
    built = Image(root / "fs")
    built.root.mkdir()
    try:
        built.build(DOCKERFILE, context=ROOT)
        yield built
    finally:
        shutil.rmtree(root, ignore_errors=True)


def installed_venv(image: Image) -> Path:
    assert image.venvs, "the Dockerfile makes no venv"
    return image.path(image.venvs[-1])


# ---------------------------------------------------------------- the build


def test_the_build_installs_the_project_into_the_venv_not_the_checkout(image: Image) -> None:
    venv = installed_venv(image)
    env = image.run_env()
    script = ("import app, workers, importlib.metadata as m; print(app.__file__); print(workers.__file__); "
              "print(m.distribution('b24rebind').read_text('direct_url.json') or '')")
    where = subprocess.run([image.which("python", env), "-c", script], cwd=image.path(image.workdir), env=env,
                           capture_output=True, text=True, check=True)
    app_file, workers_file, direct_url = where.stdout.splitlines()[:3]
    site = site_packages(venv)
    assert Path(app_file).is_relative_to(site) and Path(workers_file).is_relative_to(site), where.stdout
    assert not Path(app_file).resolve().is_relative_to(ROOT)
    assert '"editable": true' not in direct_url, direct_url
    assert image.which(image.entrypoint[0], env) == str(venv / "bin" / image.entrypoint[0])
    checked = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "check"], env=clean_environ(),
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, f"the installed dependencies do not fit pyproject.toml:\n{checked.stdout}"


def test_the_package_holds_every_file_of_the_packages_the_build_copies(image: Image) -> None:
    """Every file of the copied packages is installed: a data file that package-data leaves out is not."""
    source = image.path("/src")
    packages = [p for p in sorted(source.iterdir()) if (p / "__init__.py").is_file()]
    assert {p.name for p in packages} >= {"app", "workers"}
    site = site_packages(installed_venv(image))
    missing = []
    for package in packages:
        for path in sorted(package.rglob("*")):
            relative = path.relative_to(source)
            if path.is_file() and "__pycache__" not in relative.parts and not (site / relative).is_file():
                missing.append(str(relative))
    assert not missing, f"in the source but not in the installed package: {missing}"


def test_the_web_process_listens_on_the_exposed_port_by_default(image: Image) -> None:
    env = image.run_env()
    script = "from app.settings import Settings; s = Settings(); print(s.host, s.port)"
    port = subprocess.run([image.which("python", env), "-c", script], cwd=image.path(image.workdir), env=env,
                          capture_output=True, text=True, check=True)
    host, number = port.stdout.split()
    assert int(number) in image.expose and host == "0.0.0.0", port.stdout


# ---------------------------------------------------------------- the image as it is: ENTRYPOINT + CMD, `run`


@pytest.mark.parametrize("command", [None, ["run"]], ids=["CMD", "run"])
async def test_the_image_as_is_serves_with_the_bundled_redis(image: Image, command: list[str] | None) -> None:
    """`docker run IMAGE` and `docker run IMAGE run`: no REDIS_URL, so the bundled Redis under B24_DATA_DIR,
    and no rules file, so the built-in rules (package data)."""
    port = free_port()
    web = Container(image, "image-" + (command or image.cmd)[0], command, {"B24_PORT": str(port)})
    try:
        web.start()
        await web.wait_until_serving(port)
        health = await web.exec(with_port(image.healthcheck, image.expose[0], port),
                                image.healthcheck_timeout)
        assert health.returncode == 0, f"HEALTHCHECK failed: {health.stderr}\n{web.output()}"
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.get("/readyz") as answer:
                ready = await answer.json()
                assert answer.status == 200, ready
            # The dashboard's page and assets are package data too.
            for path in ("/", "/dashboard/app.js", "/dashboard/style.css"):
                async with http.get(path) as answer:
                    assert answer.status == 200, (path, answer.status)
        built_in = yaml.safe_load((ROOT / "app" / "rules" / "default.yaml").read_text())["rules"]
        assert ready["rules"].startswith(plural(len(built_in), "rule") + ","), ready
        data = web.image.path(image.env["B24_DATA_DIR"])
        assert (data / "redis.sock").exists(), sorted(p.name for p in data.iterdir())
        assert any(p.name.startswith("appendonly") for p in data.iterdir()), "no AOF in B24_DATA_DIR"
        assert await web.stop(DOCKER_STOP_TIMEOUT) == 0, web.output()
        assert web.left_nothing_running(), "the bundled Redis outlived the service"
    finally:
        web.remove()


# ---------------------------------------------------------------- the roles as deploy/ runs them


@dataclass
class Role:
    """One container of a deployment: its command, what its runner adds to the environment, its files."""

    name: str
    command: list[str]
    env: dict[str, str]
    files: dict[str, str]  # container path -> content (mounted config)
    grace: float  # seconds between the stop signal and SIGKILL
    writable: list[str] | None = None  # with a read-only root filesystem: the only places it may write
    health: list[list[str]] = field(default_factory=list)  # commands run in the container; 0 is healthy
    http_probes: list[str] = field(default_factory=list)  # paths that must answer 200


@dataclass
class Deployment:
    web: Role
    worker: Role


def compose_deployment(image: Image, redis_url: str, portal: FakePortal) -> Deployment:
    """deploy/compose.yaml's web and worker, with the `.env` and `rules.yaml` the README has one copy."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]

    def role(name: str) -> Role:
        service = services[name]
        assert service["build"]["dockerfile"] == str(DOCKERFILE.relative_to(ROOT))
        env: dict[str, str] = {}
        for env_file in service.get("env_file", []):
            path = (DEPLOY / env_file).resolve()
            values = dotenv_values(OPERATOR_COPIES.get(path, path))
            env.update({k: v or "" for k, v in values.items()})
        # "fill in B24_WEBHOOK_URL and B24_APPLICATION_TOKEN"
        env.update({"B24_WEBHOOK_URL": portal.rest_url, "B24_APPLICATION_TOKEN": TOKEN})
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        env.update({k: str(v) for k, v in environment.items()})
        assert env["REDIS_URL"].startswith("redis://redis:"), "compose's REDIS_URL is the redis service"
        env["REDIS_URL"] = redis_url
        files = {}
        for volume in service.get("volumes", []):
            source, target, *_ = volume.split(":")
            if source.startswith("."):  # a bind mount of a file from the repository
                path = (DEPLOY / source).resolve()
                files[target] = OPERATOR_COPIES.get(path, path).read_text()
        health = []
        check = service.get("healthcheck", {})
        if check.get("disable"):
            pass
        elif check.get("test"):
            test = check["test"]
            health.append(test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", test[1]])
        elif image.healthcheck:
            health.append(image.healthcheck)
        return Role(name, service.get("command") or image.cmd, env, files,
                    duration(service.get("stop_grace_period", "10s")), health=health)

    web, worker = role("web"), role("worker")
    assert web.health, "compose turned the web role's health check off"
    assert not worker.health, "the image's HEALTHCHECK asks port 8080, where a worker does not listen"
    container_port = int(str(services["web"]["ports"][0]).split(":")[-1])
    assert container_port in image.expose
    web.health.append(image.healthcheck)  # the image's own, which compose's replaces: it must pass as well
    return Deployment(web, worker)


def kubernetes_deployment(image: Image, redis_url: str, portal: FakePortal) -> Deployment:
    """The base Kustomization's web and worker Deployments, with its ConfigMaps and Secret."""
    from tests.deploy.test_manifests import kube_objects, load_all

    objects = kube_objects()
    kustomization = load_all(KUBE / "base" / "kustomization.yaml")[0]
    generated: dict[str, dict[str, str]] = {}
    for generator in kustomization.get("configMapGenerator", []):
        data = dict(literal.split("=", 1) for literal in generator.get("literals", []))
        for name in generator.get("files", []):
            key, _, file = name.rpartition("=")
            data[key or Path(file).name] = (KUBE / "base" / file).read_text()
        generated[generator["name"]] = data
    secrets = {o["metadata"]["name"]: {k: str(v) for k, v in o["stringData"].items()}
               for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] in ("b24rebind",)}
    secrets["b24rebind"].update({"REDIS_URL": redis_url, "B24_WEBHOOK_URL": portal.rest_url,
                                 "B24_APPLICATION_TOKEN": TOKEN})

    def role(name: str) -> Role:
        workload = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name)
        pod = workload["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == "b24rebind"
        assert str(pod["securityContext"]["runAsUser"]) == image.user.split(":")[0], "not the image's USER"
        command = container.get("args") or image.cmd
        assert "command" not in container, "a Kubernetes `command` replaces the image's ENTRYPOINT"
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(generated[source["configMapRef"]["name"]])
            else:
                env.update(secrets[source["secretRef"]["name"]])
        env.update({e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e})
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        files: dict[str, str] = {}
        writable = []
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                for key, content in generated[volume["configMap"]["name"]].items():
                    files[posixpath.join(mount["mountPath"], key)] = content
            else:
                files[mount["mountPath"].rstrip("/") + "/"] = ""  # an empty volume
            if not mount.get("readOnly"):
                writable.append(mount["mountPath"])
        read_only = container.get("securityContext", {}).get("readOnlyRootFilesystem", False)
        probes = [container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")
                  if p in container]
        return Role(name, command, env, files, float(pod.get("terminationGracePeriodSeconds", 30)),
                    writable=writable if read_only else None, http_probes=probes)

    web, worker = role("b24rebind-web"), role("b24rebind-worker")
    assert web.http_probes and not worker.http_probes
    assert int(web.env["B24_PORT"]) in image.expose
    return Deployment(web, worker)


DEPLOYMENTS = {"compose": compose_deployment, "kubernetes": kubernetes_deployment}


async def wait_for_job(http: aiohttp.ClientSession, job_id: str, headers: dict[str, str],
                       worker: Container, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(f"/api/jobs/{job_id}", headers=headers) as answer:
            assert answer.status == 200, await answer.text()
            job = await answer.json()
        if job["state"] in ("succeeded", "skipped", "failed", "dead"):
            return job
        assert worker.running(), f"the worker exited:\n{worker.output()}"
        assert time.monotonic() < deadline, f"job {job_id} is still {job['state']}:\n{worker.output()}"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("flavour", sorted(DEPLOYMENTS))
async def test_the_deployed_roles_start_work_and_stop_cleanly(
    image: Image, flavour: str, redis: Any, redis_url: str, portal: FakePortal
) -> None:
    """Web and worker as compose / Kubernetes run them: healthy, an event becomes a job the worker does,
    both leave on the stop signal with exit code 0 within their grace period, and with a read-only root
    filesystem they write only to their volumes."""
    deployment = DEPLOYMENTS[flavour](image, redis_url, portal)
    port = free_port()
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(3)]
    made = portal.convert_lead(lead)
    web = Container(image, f"{flavour}-web", deployment.web.command,
                    {**deployment.web.env, "B24_PORT": str(port)}, deployment.web.files)
    worker = Container(image, f"{flavour}-worker", deployment.worker.command, deployment.worker.env,
                       deployment.worker.files)
    try:
        web.start()
        worker.start()
        await web.wait_until_serving(port)
        listening = await web.wait_for_log(r"listening on http://(\S+):\d+")
        assert listening[1] in ("0.0.0.0", "::", "[::]"), (
            f"the web role listens on {listening[1]} only: a published port or a Service cannot reach it")
        await worker.wait_for_log(r"Starting worker for \d+ functions")

        for check in deployment.web.health:
            health = await web.exec(with_port(check, image.expose[0], port), image.healthcheck_timeout)
            assert health.returncode == 0, f"{check} failed: {health.stderr}\n{web.output()}"
        api_token = deployment.web.env.get("B24_API_TOKEN")
        headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            for path in deployment.web.http_probes:
                async with http.get(path) as probe:
                    assert probe.status == 200, (path, await probe.text())
            body = event_form("ONCRMLEADUPDATE", lead, domain=PORTAL_DOMAIN, token=TOKEN)
            async with http.post("/bitrix/events", data=body,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"}) as answer:
                accepted = await answer.json()
                assert answer.status == 200 and "job_id" in accepted, accepted
            job = await wait_for_job(http, accepted["job_id"], headers, worker)
        assert job["state"] == "succeeded", json.dumps(job, indent=1)
        moved = [(CONTACT, made["contact"]), (COMPANY, made["company"])]
        assert all(portal.bindings(a) == moved for a in activities), [portal.bindings(a) for a in activities]

        codes = await asyncio.gather(web.stop(deployment.web.grace), worker.stop(deployment.worker.grace))
        assert codes == [0, 0], f"exit codes {codes}:\n{web.output()}\n{worker.output()}"
        for container, role in ((web, deployment.web), (worker, deployment.worker)):
            if role.writable is not None:
                outside = container.written_outside(role.writable)
                assert not outside, (f"{role.name} wrote to its read-only root filesystem, outside its "
                                     f"volumes {role.writable}: {outside}")
    finally:
        web.remove()
        worker.remove()
