"""The deployment files under docker/: what can be checked without a Docker engine.

The compose file is parsed as Compose does (YAML merge keys resolved) and checked for
what Immich and the issue need; the Dockerfiles for a non-root user and the /ping
health check; the shell scripts for syntax (``bash -n``) and, for gpu-versions.sh, for
its behaviour on this machine (no Triton installation: a clear error).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from conftest import REPO

DOCKER = REPO / "docker"
BASH = shutil.which("bash") or "/bin/bash"


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
        done = subprocess.run([BASH, "-n", str(DOCKER / script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_entrypoint_builds_then_serves() -> None:
    text = (DOCKER / "entrypoint-gpu.sh").read_text()
    build, serve = text.index("immich-trt build-engines --target tensorrt"), text.index("exec immich-trt serve")
    assert build < serve


def test_gpu_versions_without_a_triton_installation_is_a_clear_error(tmp_path: Path) -> None:
    env = {"PATH": _path_without_dpkg(tmp_path), "GPU_VERSIONS_ROOT": str(tmp_path / "empty")}
    done = subprocess.run([BASH, str(DOCKER / "gpu-versions.sh"), "dali"], capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert "no DALI under" in done.stderr and "backends/dali/wheel/dali" in done.stderr
    done = subprocess.run([BASH, str(DOCKER / "gpu-versions.sh"), "tensorrt"], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "TENSORRT_VERSION" in done.stderr
    done = subprocess.run([BASH, str(DOCKER / "gpu-versions.sh"), "nonsense"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "usage" in done.stderr


#: ``pip index versions tensorrt-cu12`` / ``tensorrt-cu13`` (PyPI, 2026-12-06): 3-part
#: versions up to 10.7, 4-part from 10.8, cu13 wheels from 10.13.3.9.
TENSORRT_CU12 = (
    "11.4.0.106 11.3.0.99 11.2.1.2 11.1.0.106 11.0.0.114 10.16.1.11 10.16.0.72 10.15.1.29 10.14.1.48.post1 "
    "10.14.1.48 10.13.3.9.post1 10.13.3.9 10.13.2.6 10.13.0.35 10.12.0.36 10.11.0.33 10.10.0.31 10.9.0.34 "
    "10.8.0.43 10.7.0.post1 10.7.0 10.6.0.post2 10.6.0.post1 10.6.0 10.5.0 10.4.0 10.3.0 10.2.0.post1 10.2.0 "
    "10.1.0 10.0.1"
).split()
TENSORRT_CU13 = "11.4.0.106 11.3.0.99 11.2.1.2 11.1.0.106 11.0.0.114 10.16.1.11 10.16.0.72 10.15.1.29 10.14.1.48.post1 10.14.1.48 10.13.3.9.post1 10.13.3.9".split()  # noqa: E501


def _path_without_dpkg(tmp_path: Path, dpkg_version: str | None = None) -> str:
    """A PATH with bash's basic tools and, when given, a ``dpkg-query`` that reports
    ``dpkg_version`` for libnvinfer (the host's own dpkg knows no TensorRT)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("ls", "sed", "head", "cut", "sort", "tail", "python3", "cat", "id"):
        found = shutil.which(tool)
        if found and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    fake = bin_dir / "dpkg-query"
    fake.unlink(missing_ok=True)
    if dpkg_version is not None:
        fake.write_text(f"#!/bin/sh\necho '{dpkg_version}'\n")
        fake.chmod(0o755)
    return str(bin_dir)


def _gpu_versions(tmp_path: Path, what: str, dpkg_version: str | None = None, **env: str) -> str:
    environment = {"PATH": _path_without_dpkg(tmp_path, dpkg_version), "GPU_VERSIONS_ROOT": str(tmp_path), **env}
    done = subprocess.run([BASH, str(DOCKER / "gpu-versions.sh"), what], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_tensorrt_requirement_names_wheels_that_exist(tmp_path: Path) -> None:
    """The image's libnvinfer version (dpkg's X.Y.Z.B-..., or a library file's X.Y.Z)
    becomes ``tensorrt-cuNN==X.Y.Z.*``, which matches PyPI's wheels of that release
    whether they have 3 or 4 parts; the full versions the image gives do not exist."""
    from packaging.specifiers import SpecifierSet

    cases = [("10.3.0.26-1+cuda12.5", "12.5.1", "10.3.0"), ("10.7.0.23-1+cuda12.6", "12.6.3", "10.7.0"),
             ("10.8.0.43-1+cuda12.8", "12.8.0.038", "10.8.0.43"), ("10.13.3.9-1+cuda13.0", "13.0.1", "10.13.3.9"),
             ("11.0.0.114-1+cuda13.0", "13.0.2", "11.0.0.114")]  # fmt: skip
    for dpkg, cuda, wheel in cases:
        library = _gpu_versions(tmp_path, "tensorrt", dpkg)
        assert library == dpkg.split("-")[0]
        requirement = _gpu_versions(tmp_path, "tensorrt-pip", dpkg, CUDA_VERSION=cuda)
        package, _, spec = requirement.partition("==")
        assert package == f"tensorrt-cu{cuda.split('.')[0]}"
        available = TENSORRT_CU12 if package.endswith("12") else TENSORRT_CU13
        matched = [v for v in available if v in SpecifierSet(f"=={spec}")]
        assert wheel in matched and {v.split(".")[:3] == library.split(".")[:3] for v in matched} == {True}, matched
        if wheel != library:
            assert library not in available  # the previous derivation's version does not exist
    # without dpkg's record, the library file's name (3 parts)
    lib = tmp_path / "usr" / "lib" / "x86_64-linux-gnu"
    lib.mkdir(parents=True)
    for name in ("libnvinfer.so.10", "libnvinfer.so.10.8.0", "libnvinfer.so.10.10.0"):
        (lib / name).write_bytes(b"")
    assert _gpu_versions(tmp_path, "tensorrt") == "10.10.0"
    assert _gpu_versions(tmp_path, "tensorrt-pip", CUDA_VERSION="12.9.1") == "tensorrt-cu12==10.10.0.*"


def test_dali_is_the_one_the_backend_unpacks(tmp_path: Path) -> None:
    """dali_backend installs its DALI wheel under backends/dali/wheel/dali (the RPATH of
    libtriton_dali.so), the folder the image puts on PYTHONPATH; one level up is not it."""
    backend = tmp_path / "opt" / "tritonserver" / "backends" / "dali"
    shallow = backend / "wheel" / "nvidia_dali_cuda120-1.0.0.dist-info"
    shallow.mkdir(parents=True)
    (shallow / "METADATA").write_text("Name: nvidia-dali-cuda120\nVersion: 1.0.0\n")
    env = {"PATH": _path_without_dpkg(tmp_path), "GPU_VERSIONS_ROOT": str(tmp_path)}
    done = subprocess.run([BASH, str(DOCKER / "gpu-versions.sh"), "dali"], capture_output=True, text=True, env=env)
    assert done.returncode == 1
    meta = backend / "wheel" / "dali" / "nvidia_dali_cuda120-1.49.0.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: nvidia-dali-cuda120\nVersion: 1.49.0\n")
    assert _gpu_versions(tmp_path, "dali") == "1.49.0"


def test_gpu_image_chains_nvidia_entrypoint_and_uses_the_images_dali() -> None:
    text = (DOCKER / "Dockerfile.gpu").read_text()
    assert 'ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "entrypoint-gpu.sh"]' in text
    assert "nvidia-dali" not in text.split("ENTRYPOINT")[0].split("# ")[-1]  # no pip DALI
    assert not re.search(r"pip install[^\n]*nvidia-dali", text)
    assert "gpu-versions.sh check" in text and "gpu-versions.sh tensorrt-pip" in text
    version = re.search(r"^ARG TRITON_VERSION=(\d+)\.(\d+)", text, re.MULTILINE)
    assert version and (int(version[1]), int(version[2])) >= (25, 5)  # execution_context_allocation_strategy
    start = re.search(r"--start-period=(\d+)m", text)
    assert start and int(start[1]) >= 60
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in text
    assert compose()["services"]["ml-gpu"]["healthcheck"]["start_period"] == "120m"


def test_entrypoint_refuses_folders_it_cannot_write(tmp_path: Path) -> None:
    """A root-owned bind mount: one line saying what to run, before anything starts."""
    import os

    unwritable = Path("/proc/sys") if os.geteuid() == 0 else tmp_path / "ro"
    if os.geteuid() != 0:
        unwritable.mkdir()
        unwritable.chmod(0o555)
    env = {**os.environ, "MACHINE_LEARNING_CACHE_FOLDER": str(unwritable), "IMMICH_TRT_ENGINES_DIR": str(tmp_path),
           "IMMICH_TRT_DATA_DIR": str(tmp_path), "PATH": _path_without_dpkg(tmp_path)}  # fmt: skip
    done = subprocess.run([BASH, str(DOCKER / "entrypoint-gpu.sh")], capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert f"{unwritable} is not writable" in done.stderr and "chown -R" in done.stderr
