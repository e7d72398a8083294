"""System shared memory between the server and the launched Triton (IMMICH_TRT_TRITON_SHM),
against the real Triton server of the nvidia-pytriton wheel."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from immich_trt.config import Settings
from immich_trt.models.base import ModelContext
from immich_trt.models.ocr import TextDetector, TextRecognizer
from immich_trt.runtime.base import ModelSpec
from immich_trt.runtime.triton import TritonRuntime
from immich_trt.tools.testing import offline_settings


@pytest.fixture(scope="module")
def settings(ocr_cache: Path, tmp_path_factory) -> Settings:
    return offline_settings(ocr_cache, engines_dir=tmp_path_factory.mktemp("engines"), triton_shm=True)


@pytest.fixture(scope="module")
def specs(settings) -> dict[str, ModelSpec]:
    ctx = ModelContext(settings=settings, runtime=None)  # type: ignore[arg-type]
    det, rec = TextDetector("PP-OCRv5_mobile", ctx), TextRecognizer("PP-OCRv5_mobile", ctx)
    return {"det": det.specs()[0], "rec": rec.specs()[0]}


@pytest.fixture(scope="module")
async def triton(settings, specs):
    runtime = TritonRuntime(settings)
    await runtime.start()
    for spec in specs.values():
        await runtime.load(spec)
    yield runtime
    await runtime.stop()


def _regions(prefix: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"{prefix}client_*"))


def test_setting_from_env() -> None:
    assert Settings.from_env({}).triton_shm is Settings().triton_shm
    assert Settings.from_env({"IMMICH_TRT_TRITON_SHM": "true"}).triton_shm is True
    assert Settings.from_env({"IMMICH_TRT_TRITON_SHM": "0"}).triton_shm is False


async def test_shared_memory_results_identical_to_the_wire(triton, specs) -> None:
    assert triton._shm is not None
    rng = np.random.default_rng(3)
    det, rec = specs["det"].name, specs["rec"].name
    calls = [
        (det, {"x": rng.uniform(0, 2, (1, 3, 96, 160)).astype(np.float32)}, None),
        (det, {"x": rng.uniform(0, 2, (1, 3, 96, 160)).astype(np.float32)}, None),  # outputs by shape now
        (det, {"x": rng.uniform(0, 2, (2, 3, 128, 64)).astype(np.float32)}, None),  # by the H x W rule
        (det, {"x": rng.uniform(0, 2, (1, 3, 736, 544)).astype(np.float32)}, None),  # grows a region
        (rec, {"x": rng.uniform(-1, 1, (11, 3, 48, 320)).astype(np.float32)}, None),  # split at 8
        (rec, {"x": rng.uniform(-1, 1, (11, 3, 48, 320)).astype(np.float32)}, ["fetch_name_0"]),
        (rec, {"x": rng.uniform(-1, 1, (3, 3, 48, 200)).astype(np.float32)}, ["fetch_name_0"]),
    ]
    for name, inputs, outputs in calls:
        got = await triton.infer(name, inputs, outputs)
        want = await triton._infer_wire(name, inputs, outputs) if inputs["x"].shape[0] <= 8 else None
        if want is None:  # the wire path does not split batches itself
            parts = [await triton._infer_wire(name, {"x": inputs["x"][i : i + 8]}, outputs) for i in (0, 8)]
            want = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        assert list(got) == list(want) == ["fetch_name_0"]
        assert got["fetch_name_0"].dtype == want["fetch_name_0"].dtype
        np.testing.assert_array_equal(got["fetch_name_0"], want["fetch_name_0"])
    # detection outputs are sized from the inputs (H x W); recognition's by shapes seen
    assert triton._shm_models[det].rule is True
    assert triton._shm_models[rec].rule is False
    assert triton._shm_models[rec].output_shapes({"x": np.zeros((8, 3, 48, 320), np.float32)}, ["fetch_name_0"])
    assert triton._shm_models[rec].output_shapes({"x": np.zeros((5, 3, 48, 96), np.float32)}, ["fetch_name_0"]) is None
    # regions are reused, not one per call
    assert 1 <= len(_regions(triton._shm.prefix)) <= 3


async def test_concurrent_calls_use_separate_regions(triton, specs) -> None:
    rng = np.random.default_rng(4)
    det = specs["det"].name
    inputs = [{"x": rng.uniform(0, 2, (1, 3, 32 * (i + 2), 96)).astype(np.float32)} for i in range(6)]
    got = await asyncio.gather(*(triton.infer(det, x) for x in inputs))
    for x, out in zip(inputs, got):
        want = await triton._infer_wire(det, x, None)
        np.testing.assert_array_equal(out["fetch_name_0"], want["fetch_name_0"])


async def test_a_full_dev_shm_sends_the_call_over_the_wire(triton, specs, monkeypatch, caplog) -> None:
    """A region that cannot be reserved (``posix_fallocate`` failing with ENOSPC, as on a
    full /dev/shm) is never written into (that would be SIGBUS): the call goes over the
    wire with identical outputs and the half-made region is removed."""
    import errno
    import logging

    import immich_trt.runtime.triton as triton_module

    det = specs["det"].name
    x = np.random.default_rng(6).uniform(0, 2, (1, 3, 2048, 2048)).astype(np.float32)  # larger than any free region
    before = set(_regions(triton._shm.prefix))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(triton_module.os, "posix_fallocate", full)
    with caplog.at_level(logging.WARNING):
        got = await triton.infer(det, {"x": x})
    monkeypatch.undo()
    want = await triton._infer_wire(det, {"x": x}, None)
    np.testing.assert_array_equal(got["fetch_name_0"], want["fetch_name_0"])
    assert "goes over the wire" in caplog.text
    assert set(_regions(triton._shm.prefix)) <= before  # nothing new left in /dev/shm


async def test_too_small_derived_output_falls_back_to_the_wire(triton, specs) -> None:
    rec = specs["rec"].name
    x = np.random.default_rng(5).uniform(-1, 1, (2, 3, 48, 160)).astype(np.float32)
    info = await triton._shm_model(rec)
    info.memo[info._key({"x": x})] = {"fetch_name_0": (2, 1, 18385)}  # wrong: too small
    got = await triton.infer(rec, {"x": x}, ["fetch_name_0"])
    want = await triton._infer_wire(rec, {"x": x}, ["fetch_name_0"])
    np.testing.assert_array_equal(got["fetch_name_0"], want["fetch_name_0"])
    assert info._key({"x": x}) not in info.memo or info.memo[info._key({"x": x})] == {"fetch_name_0": want["fetch_name_0"].shape}


async def test_regions_survive_a_killed_triton_and_are_removed_on_stop(settings, specs) -> None:
    runtime = TritonRuntime(settings)
    await runtime.start()
    prefix = runtime.launcher.shm_prefix
    try:
        await runtime.load(specs["det"])
        x = np.random.default_rng(6).uniform(0, 2, (1, 3, 64, 96)).astype(np.float32)
        before = await runtime.infer(specs["det"].name, {"x": x})
        before = await runtime.infer(specs["det"].name, {"x": x})  # outputs through shm too
        assert _regions(prefix)
        os.killpg(runtime.launcher.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                after = await runtime.infer(specs["det"].name, {"x": x})
                if runtime.launcher.restarts == 1:
                    break
            except Exception:
                pass
            await asyncio.sleep(0.2)
        else:
            pytest.fail("Triton did not come back")
        np.testing.assert_array_equal(before["fetch_name_0"], after["fetch_name_0"])
        # after the restart the calls go through regions the new server knows
        for _ in range(3):
            again = await runtime.infer(specs["det"].name, {"x": x})
            np.testing.assert_array_equal(before["fetch_name_0"], again["fetch_name_0"])
        status = await runtime._client.get_system_shared_memory_status(as_json=True)
        registered = {r["name"] for r in status.get("regions", {}).values()} if isinstance(status.get("regions"), dict) else {
            r["name"] for r in status.get("regions", [])
        }
        assert registered and all(name.startswith(prefix) for name in registered)
        assert set(registered) <= set(_regions(prefix))
    finally:
        await runtime.stop()
    assert _regions(prefix) == []
    from tritonclient.utils import shared_memory

    assert not [k for k in shared_memory.mapped_shared_memory_regions() if k.startswith("/" + prefix)]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_another_local_client_uses_a_prefix_of_its_own_and_can_be_forgotten(triton, specs, protocol) -> None:
    """A second process's runtime (a worker: TRITON_URL plus IMMICH_TRT_TRITON_SHM_PREFIX)
    passes its tensors through regions of its own prefix, with the same answers;
    ``forget_shared_memory`` (over either protocol) unregisters and unlinks them."""
    import dataclasses

    prefix = f"{triton.shm_prefix}w9s0_"
    url = triton.launcher.grpc_url if protocol == "grpc" else triton.launcher.http_url
    other = TritonRuntime(dataclasses.replace(triton.settings, triton_url=url, triton_protocol=protocol,
                                              triton_shm_prefix=prefix))  # fmt: skip
    await other.start()
    try:
        assert other._shm is not None and other.shm_prefix is None  # it launched nothing
        await other.load(specs["det"])
        x = np.random.default_rng(5).uniform(0, 1, (1, 3, 64, 96)).astype(np.float32)
        ours, theirs = await triton.infer(specs["det"].name, {"x": x}), await other.infer(specs["det"].name, {"x": x})
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name])
        assert _regions(prefix)
        forgetter = TritonRuntime(dataclasses.replace(triton.settings, triton_url=url, triton_protocol=protocol))
        await forgetter.start()
        try:
            assert await forgetter.forget_shared_memory(prefix) >= 1
            assert await forgetter.forget_shared_memory(prefix) == 0
        finally:
            await forgetter.stop()
        assert not _regions(prefix)
        status = await triton._client.get_system_shared_memory_status(as_json=True)
        assert not [name for name in status.get("regions", {}) if name.startswith(prefix)]
        assert [name for name in status.get("regions", {}) if name.startswith(f"{triton.shm_prefix}client_")]
    finally:
        await other.stop()
