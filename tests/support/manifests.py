"""The deploy files as Kubernetes would receive them: shared by the manifest and Redis HA tests."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` of one overlay: the objects `kubectl apply -k` would send."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is not installed: the manifests cannot be rendered")
        pytest.skip("kubectl is not installed")
    built = subprocess.run([kubectl, "kustomize", str(KUBE / overlay)], capture_output=True, text=True,
                           timeout=120, check=False)
    assert built.returncode == 0, f"kubectl kustomize {overlay}: {built.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(built.stdout) if doc)
