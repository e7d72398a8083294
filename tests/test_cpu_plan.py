"""The in-process runtime's use of the cores (immich_trt/runtime/cpu.py) and the runtime
choice (immich_trt/runtime/select.py): the core budget's order and accounting, the plan
from the settings, wide and narrow sessions on the real PP-OCRv5 models (same answers,
narrow only when calls overlap, never more inference threads than cores)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from immich_trt.config import Settings
from immich_trt.runtime import cpu_plan, make_runtime
from immich_trt.runtime.base import ModelSpec
from immich_trt.runtime.cpu import CoreBudget, CpuPlan, usable_cores
from immich_trt.runtime.onnxruntime import OnnxRuntime
from immich_trt.runtime.select import choose_runtime, nvidia_gpus, tensorrt_engines


@pytest.fixture(scope="module")
def ocr_files(ocr_cache: Path) -> dict[str, Path]:
    """The real PP-OCRv5 mobile detector and recognizer (the offline cache of conftest)."""
    root = ocr_cache / "ocr" / "PP-OCRv5_mobile"
    return {"det": root / "detection" / "model.onnx", "rec": root / "recognition" / "model.onnx"}


# ------------------------------------------------------------------ the core budget


async def test_budget_grants_in_arrival_order_and_a_wide_call_is_not_overtaken() -> None:
    budget = CoreBudget(2)
    order: list[str] = []

    async def call(name: str, n: int, hold: asyncio.Event) -> None:
        taken = await budget.acquire(n)
        order.append(name)
        await hold.wait()
        budget.release(taken)

    first, wide, narrow = asyncio.Event(), asyncio.Event(), asyncio.Event()
    t1 = asyncio.create_task(call("narrow-1", 1, first))
    await asyncio.sleep(0)
    t2 = asyncio.create_task(call("wide", 2, wide))  # needs both cores: waits for narrow-1
    await asyncio.sleep(0)
    t3 = asyncio.create_task(call("narrow-2", 1, narrow))  # a core is free, but the wide call came first
    await asyncio.sleep(0.01)
    assert order == ["narrow-1"] and budget.free == 1 and budget.waiting == 2 and budget.contended
    first.set()
    await asyncio.sleep(0.01)
    assert order == ["narrow-1", "wide"] and budget.free == 0
    wide.set()
    await asyncio.sleep(0.01)
    assert order == ["narrow-1", "wide", "narrow-2"]
    narrow.set()
    await asyncio.gather(t1, t2, t3)
    assert budget.free == 2 and not budget.contended and budget.peak_held == 2


async def test_budget_clamps_requests_and_returns_the_cores_of_a_cancelled_waiter() -> None:
    budget = CoreBudget(2)
    assert await budget.acquire(8) == 2  # more than the machine: all of it
    waiter = asyncio.create_task(budget.acquire(1))
    await asyncio.sleep(0.01)
    assert budget.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.waiting == 0
    budget.release(2)
    assert budget.free == 2 and await budget.acquire(0) == 1  # at least one core
    budget.release(1)
    with pytest.raises(ValueError):
        CoreBudget(0)


async def test_budget_cancelled_after_the_grant_gives_the_cores_back() -> None:
    budget = CoreBudget(1)
    await budget.acquire(1)
    waiter = asyncio.create_task(budget.acquire(1))
    await asyncio.sleep(0.01)
    budget.release(1)  # granted to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.free == 1 and not budget.contended


# ------------------------------------------------------------------------- the plan


def test_plan_from_settings() -> None:
    plan = cpu_plan(Settings())
    assert plan is not None and plan.cores == usable_cores() and plan.wide_threads == plan.cores
    assert plan.narrow_max_bytes == 64 * 2**20 and not plan.spinning  # off by default (bench/NOTES.md)
    assert cpu_plan(Settings(cpu_scheduler="upstream")) is None
    capped = cpu_plan(Settings(model_intra_op_threads=64))
    assert capped is not None and capped.wide_threads == capped.cores  # never more threads than cores
    small = CpuPlan(cores=2, wide_threads=2, narrow_max_bytes=10)
    assert small.has_narrow(10) and not small.has_narrow(11)
    assert not CpuPlan(cores=1, wide_threads=1, narrow_max_bytes=10).has_narrow(1)  # one core: nothing to overlap
    assert not CpuPlan(cores=2, wide_threads=2, narrow_max_bytes=0).has_narrow(1)
    assert "at most 2 inference calls at once" in small.describe()
    # wide sessions spin within a call only where calls mostly run alone
    assert small.spin_within_call(has_narrow=True, latency_bound=False)
    assert small.spin_within_call(has_narrow=False, latency_bound=True)
    assert not small.spin_within_call(has_narrow=False, latency_bound=False)
    assert not CpuPlan(cores=1, wide_threads=1, narrow_max_bytes=10).spin_within_call(True, True)


def test_settings_parse_the_scheduler_and_refuse_bad_values() -> None:
    s = Settings.from_env({"IMMICH_TRT_CPU_SCHEDULER": "Upstream", "IMMICH_TRT_CPU_NARROW_MAX_MB": "0"})
    assert s.cpu_scheduler == "upstream" and s.cpu_narrow_max_mb == 0
    assert Settings.from_env({}).runtime == "auto"
    for env in ({"IMMICH_TRT_CPU_SCHEDULER": "fast"}, {"IMMICH_TRT_CPU_NARROW_MAX_MB": "-1"}):
        with pytest.raises(ValueError):
            Settings.from_env(env)


# ---------------------------------------------------------------- choosing a runtime


def test_runtime_choice(tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    auto = Settings(engines_dir=engines)
    assert choose_runtime(auto, gpus=0).name == "onnxruntime"
    assert "no NVIDIA GPU" in choose_runtime(auto, gpus=0).reason
    gpu_only = choose_runtime(auto, gpus=1)
    assert gpu_only.name == "onnxruntime" and "build-engines --target tensorrt" in gpu_only.reason
    (engines / "clip__x__visual" / "1").mkdir(parents=True)
    (engines / "clip__x__visual" / "1" / "model.plan").write_bytes(b"engine")
    assert tensorrt_engines(engines) == 1
    assert choose_runtime(auto, gpus=1).name == "triton"
    assert choose_runtime(replace(auto, triton_url="127.0.0.1:8001"), gpus=0).name == "triton"
    assert choose_runtime(replace(auto, preprocess="gpu"), gpus=0).name == "triton"
    assert choose_runtime(replace(auto, runtime="triton"), gpus=0).reason == "IMMICH_TRT_RUNTIME=triton"
    assert choose_runtime(replace(auto, runtime="onnxruntime"), gpus=1).name == "onnxruntime"


def test_gpu_detection_reads_the_driver_files(tmp_path: Path) -> None:
    dev, proc = tmp_path / "dev", tmp_path / "gpus"
    dev.mkdir()
    assert nvidia_gpus(dev, proc) == 0
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (dev / name).touch()
    assert nvidia_gpus(dev, proc) == 2
    (proc / "0000:01:00.0").mkdir(parents=True)
    assert nvidia_gpus(dev, proc) == 1  # the driver's list wins over device files


def test_make_runtime_logs_its_choice(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.INFO, logger="immich_trt.runtime")
    runtime = make_runtime(Settings(runtime="onnxruntime", engines_dir=tmp_path))
    assert isinstance(runtime, OnnxRuntime) and runtime.plan is not None
    assert "Runtime: in-process ONNX Runtime (IMMICH_TRT_RUNTIME=onnxruntime)" in caplog.text
    assert "intra-op threads (spinning off)" in caplog.text
    asyncio.run(runtime.stop())


# ------------------------------------------------- wide and narrow sessions, real models


def _rec_batch(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (6, 3, 48, 320)).astype(np.float32)


async def test_narrow_sessions_answer_as_the_wide_one_and_never_oversubscribe(ocr_files: dict[str, Path]) -> None:
    ocr = ocr_files
    plan = CpuPlan(cores=2, wide_threads=2, narrow_max_bytes=64 * 2**20)
    runtime = OnnxRuntime(arena=False, plan=plan)
    upstream = OnnxRuntime(arena=False, intra_op=2)  # immich-ml's setup: the reference
    specs = [ModelSpec("rec", ocr["rec"]), ModelSpec("det", ocr["det"])]
    try:
        for spec in specs:
            await runtime.load(spec)
            await upstream.load(spec)
        batches = [_rec_batch(i) for i in range(8)]
        alone = await runtime.infer("rec", {"x": batches[0]})
        assert runtime.calls == {"wide": 1}  # a call that arrives alone runs on every core
        together = await asyncio.gather(*(runtime.infer("rec", {"x": b}) for b in batches))
        assert runtime.calls["narrow"] >= 6  # overlapping calls take one core each
        assert runtime.budget is not None and runtime.budget.peak_held == 2 and runtime.budget.free == 2
        reference = [await upstream.infer("rec", {"x": b}) for b in batches]
        for got, want in zip(together, reference):
            for name in want:
                assert np.array_equal(got[name], want[name])  # bit for bit, whatever the session
        assert all(np.array_equal(alone[n], reference[0][n]) for n in alone)

        image = np.random.default_rng(9).uniform(-1, 1, (1, 3, 640, 960)).astype(np.float32)
        det = await asyncio.gather(*(runtime.infer("det", {"x": image}) for _ in range(3)))
        want = await upstream.infer("det", {"x": image})
        assert all(np.array_equal(d[n], want[n]) for d in det for n in want)
    finally:
        await runtime.stop()
        await upstream.stop()


async def test_large_models_keep_one_session(ocr_files: dict[str, Path]) -> None:
    ocr = ocr_files
    plan = CpuPlan(cores=2, wide_threads=2, narrow_max_bytes=1024)  # every real model is "large" here
    runtime = OnnxRuntime(arena=False, plan=plan)
    try:
        await runtime.load(ModelSpec("rec", ocr["rec"]))
        await asyncio.gather(*(runtime.infer("rec", {"x": _rec_batch(i)}) for i in range(4)))
        assert runtime.calls == {"wide": 4}  # no second copy of a large model
        assert runtime.budget is not None and runtime.budget.peak_held == 2 and runtime.budget.free == 2  # 2 at once
    finally:
        await runtime.stop()


async def test_a_failed_call_gives_its_cores_back(ocr_files: dict[str, Path]) -> None:
    ocr = ocr_files
    runtime = OnnxRuntime(arena=False, plan=CpuPlan(cores=2, wide_threads=2, narrow_max_bytes=64 * 2**20))
    try:
        await runtime.load(ModelSpec("rec", ocr["rec"]))
        from immich_trt.runtime.base import InferenceError

        with pytest.raises(InferenceError, match="onnxruntime failed on 'rec'"):
            await runtime.infer("rec", {"x": np.zeros((1, 3, 48), np.float32)})  # wrong rank
        assert runtime.budget is not None and runtime.budget.free == 2
        out = await runtime.infer("rec", {"x": _rec_batch(0)})
        assert out and runtime.budget.free == 2
    finally:
        await runtime.stop()


def test_malloc_arenas_are_capped_on_glibc() -> None:
    import platform

    from immich_trt.runtime.allocator import limit_malloc_arenas

    assert Settings().malloc_arenas == 2 and Settings.from_env({"IMMICH_TRT_MALLOC_ARENAS": "0"}).malloc_arenas == 0
    assert limit_malloc_arenas(0) is False  # glibc's default kept
    if platform.libc_ver()[0] == "glibc":
        assert limit_malloc_arenas(2) is True
