"""deploy/prometheus/alerts.yaml: Prometheus accepts it, each alert fires on its story (promtool's unit
tests in alerts.test.yaml), and it names only metrics the service exports."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs it (Debian package prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus ships it)")
    return found


def run_promtool(*args: str) -> str:
    done = subprocess.run([promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_prometheus_accepts_the_rules() -> None:
    assert "SUCCESS: 8 rules found" in run_promtool("check", "rules", "alerts.yaml")


def test_each_alert_fires_on_its_story_and_not_beside_it() -> None:
    tested = {case["alertname"] for test in yaml.safe_load((PROMETHEUS / "alerts.test.yaml").read_text())["tests"]
              for case in test["alert_rule_test"]}
    defined = {rule["alert"] for group in yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())["groups"]
               for rule in group["rules"]}
    assert tested == defined, defined - tested  # every alert has a story

    assert "SUCCESS" in run_promtool("test", "rules", "alerts.test.yaml")


async def test_the_alerts_use_only_metrics_the_service_exports(client: Any) -> None:
    exposed = await (await client.get("/metrics")).text()
    rules = [rule for group in yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())["groups"]
             for rule in group["rules"]]
    names = {re.sub(r"_(count|bucket|sum)$", "", name)
             for rule in rules for name in re.findall(r"b24rebind_\w+", rule["expr"])}

    assert names and all(f"# TYPE {name} " in exposed for name in names), \
        {name for name in names if f"# TYPE {name} " not in exposed}
