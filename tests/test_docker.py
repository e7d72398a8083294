"""The deployment files under docker/: what can be checked without a Docker engine.

The compose file is parsed as Compose does (YAML merge keys resolved) and checked for
what Immich and the issue need; the Dockerfiles for a non-root user and the /ping
health check; the shell scripts for syntax (``bash -n``) and, for gpu-versions.sh, for
its behaviour on this machine (no Triton installation: a clear error).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from conftest import REPO

DOCKER = REPO / "docker"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def test_compose_runs_immich_against_us_with_opensearch() -> None:
    services = compose()["services"]
    assert {"immich-server", "database", "redis", "opensearch", "ml-gpu", "ml-cpu"} <= set(services)
    server = services["immich-server"]
    assert server["environment"]["IMMICH_MACHINE_LEARNING_URL"] == "http://immich-machine-learning:3003"
    for name, profile, dockerfile in (("ml-gpu", "gpu", "docker/Dockerfile.gpu"), ("ml-cpu", "cpu", "docker/Dockerfile.cpu")):
        ml = services[name]
        assert ml["profiles"] == [profile]
        assert (REPO / dockerfile).is_file() and ml["build"]["dockerfile"] == dockerfile
        assert ml["networks"]["default"]["aliases"] == ["immich-machine-learning"]
        assert "http://localhost:3003/ping" in " ".join(ml["healthcheck"]["test"])
        assert "model-cache:/cache" in ml["volumes"]  # the volume name Immich's own compose uses
        assert ml["environment"]["OPENSEARCH_URL"] == "http://opensearch:9200"
        assert ml["depends_on"]["opensearch"]["condition"] == "service_healthy"
        assert ml["shm_size"] == "1gb"  # python backend + shared-memory tensors
    gpu = services["ml-gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "MACHINE_LEARNING_DEVICE_IDS" in gpu["environment"]
    assert set(compose()["volumes"]) >= {"model-cache", "engines", "sidecar-data", "opensearch-data"}


def test_images_run_as_non_root_with_a_ping_health_check() -> None:
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DOCKER / name).read_text()
        users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
        assert users and users[-1] not in ("root", "0"), name
        assert "http://localhost:3003/ping" in text, name
        assert "useradd" in text, name
    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    assert re.search(r"^FROM nvcr.io/nvidia/tritonserver:\$\{TRITON_VERSION\}-py3", gpu, re.MULTILINE)
    assert "IMMICH_TRT_TRITON_SERVER=/opt/tritonserver" in gpu and "IMMICH_TRT_PREPROCESS=gpu" in gpu


def test_shell_scripts_parse() -> None:
    for script in ("entrypoint-gpu.sh", "gpu-versions.sh"):
        done = subprocess.run(["bash", "-n", str(DOCKER / script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_entrypoint_builds_then_serves() -> None:
    text = (DOCKER / "entrypoint-gpu.sh").read_text()
    build, serve = text.index("immich-trt build-engines --target tensorrt"), text.index("exec immich-trt serve")
    assert build < serve


def test_gpu_versions_without_a_triton_installation_is_a_clear_error() -> None:
    if Path("/opt/tritonserver").exists():
        return  # inside NVIDIA's image: nothing to refuse
    done = subprocess.run(["bash", str(DOCKER / "gpu-versions.sh"), "dali"], capture_output=True, text=True)
    assert done.returncode == 1
    assert "DALI_VERSION" in done.stderr
    done = subprocess.run(["bash", str(DOCKER / "gpu-versions.sh"), "nonsense"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr
