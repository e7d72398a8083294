"""The Triton runtime against the real Triton server of the nvidia-pytriton wheel."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from immich_trt.models.base import ModelContext
from immich_trt.models.ocr import TextDetector, TextRecognizer
from immich_trt.runtime.base import InferenceError, ModelSpec
from immich_trt.runtime.launcher import triton_log_level
from immich_trt.runtime.onnxruntime import OnnxRuntime
from immich_trt.runtime.triton import TritonRuntime
from immich_trt.tools.engines import build_repository
from immich_trt.tools.testing import offline_settings


@pytest.fixture(scope="module")
def settings(ocr_cache: Path, tmp_path_factory):
    return offline_settings(ocr_cache, engines_dir=tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def specs(settings) -> dict[str, ModelSpec]:
    ctx = ModelContext(settings=settings)
    det, rec = TextDetector("PP-OCRv5_mobile", ctx), TextRecognizer("PP-OCRv5_mobile", ctx)
    return {"det": det.specs()[0], "rec": rec.specs()[0]}


@pytest.fixture(scope="module")
async def triton(settings, specs):
    runtime = TritonRuntime(settings)
    await runtime.start()
    yield runtime
    await runtime.stop()


@pytest.fixture(scope="module")
async def reference(settings, specs):
    runtime = OnnxRuntime(*settings.ort_threads)
    for spec in specs.values():
        await runtime.load(spec)
    yield runtime
    await runtime.stop()


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """Triton's own ModelConfig schema: configs compare as messages, not as text."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_cpu_repository_config_golden(settings, specs, tmp_path: Path) -> None:
    written = build_repository(settings, tmp_path)
    assert written == ["ocr__PP-OCRv5_mobile__detection", "ocr__PP-OCRv5_mobile__recognition"]
    det = (tmp_path / "ocr__PP-OCRv5_mobile__detection" / "config.pbtxt").read_text()
    # the detector is served as a uint8-input copy next to its config
    onnx_path = (tmp_path / "ocr__PP-OCRv5_mobile__detection" / "1" / "model.onnx").resolve()
    assert parse_config(det) == parse_config(
        'name: "ocr__PP-OCRv5_mobile__detection"\n'
        'backend: "python"\n'
        "max_batch_size: 4\n"
        "input [\n"
        '  { name: "image_u8" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }\n'
        "]\n"
        "output [\n"
        '  { name: "fetch_name_0" data_type: TYPE_FP32 dims: [ 1, -1, -1 ] }\n'
        "]\n"
        "dynamic_batching { max_queue_delay_microseconds: 0 }\n"
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
        f'parameters: {{ key: "onnx_path" value: {{ string_value: "{onnx_path}" }} }}\n'
        'parameters: { key: "inter_op_num_threads" value: { string_value: "1" } }\n'
        'parameters: { key: "intra_op_num_threads" value: { string_value: "2" } }\n'
        # arena off (as Immich's CPU image) and no spinning: the defaults measured in bench/NOTES.md
        'parameters: { key: "arena" value: { string_value: "false" } }\n'
        'parameters: { key: "allow_spinning" value: { string_value: "false" } }\n'
    )
    rec = parse_config((tmp_path / "ocr__PP-OCRv5_mobile__recognition" / "config.pbtxt").read_text())
    assert rec.max_batch_size == 8
    x = parse_config('input [ { name: "x" data_type: TYPE_FP32 dims: [ 3, 48, -1 ] } ]').input
    assert list(rec.input) == list(x)
    # the recognizer is served with its CTC reduction (argmax and max per step)
    assert list(rec.output) == list(
        parse_config(
            'output [ { name: "ctc_index" data_type: TYPE_INT64 dims: [ -1 ] }, '
            '{ name: "ctc_prob" data_type: TYPE_FP32 dims: [ -1 ] } ]'
        ).output
    )
    reduced = tmp_path / "ocr__PP-OCRv5_mobile__recognition" / "1" / "model.onnx"
    assert rec.parameters["onnx_path"].string_value == str(reduced.resolve())
    model_py = (tmp_path / "ocr__PP-OCRv5_mobile__recognition" / "1" / "model.py").read_text()
    assert "@SITE_PACKAGES@" not in model_py and "make_session" in model_py


async def test_triton_matches_in_process_onnxruntime(triton, reference, specs) -> None:
    rng = np.random.default_rng(1)
    det_input = rng.uniform(0, 2, (1, 3, 96, 160)).astype(np.float32)
    rec_input = rng.uniform(-1, 1, (11, 3, 48, 320)).astype(np.float32)  # > max_batch_size 8: split
    for spec in specs.values():
        await triton.load(spec)
    for name, x in ((specs["det"].name, det_input), (specs["rec"].name, rec_input)):
        got = await triton.infer(name, {"x": x})
        want = await reference.infer(name, {"x": x})
        assert list(got) == list(want) == ["fetch_name_0"]
        assert got["fetch_name_0"].shape == want["fetch_name_0"].shape
        np.testing.assert_array_equal(got["fetch_name_0"], want["fetch_name_0"])


async def test_corrupt_model_fails_to_load_and_the_server_survives(triton, settings, tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(Exception):
        await triton.load(ModelSpec("ocr__broken__detection", bad))
    assert await triton.ready()
    with pytest.raises(InferenceError, match="unknown model|not found|Request for unknown model"):
        await triton.infer("ocr__never_loaded__detection", {"x": np.zeros((1, 3, 32, 32), np.float32)})


async def test_external_triton_url_over_http(triton, specs, settings) -> None:
    """A server given by TRITON_URL is used as is (here: the launched one, over HTTP)."""
    external = TritonRuntime(
        dataclasses.replace(settings, triton_url=f"http://{triton.launcher.http_url}", triton_protocol="http")
    )
    await external.start()
    try:
        assert external.launcher is None
        await external.load(specs["det"])
        out = await external.infer(specs["det"].name, {"x": np.zeros((1, 3, 64, 64), np.float32)})
        assert out["fetch_name_0"].shape == (1, 1, 64, 64)
    finally:
        await external.stop()


async def test_killed_triton_is_restarted_and_models_reloaded(settings, specs) -> None:
    runtime = TritonRuntime(settings)
    await runtime.start()
    try:
        await runtime.load(specs["det"])
        x = np.zeros((1, 3, 64, 64), np.float32)
        before = await runtime.infer(specs["det"].name, {"x": x})
        os.killpg(runtime.launcher.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                after = await runtime.infer(specs["det"].name, {"x": x})
                break
            except Exception:
                import asyncio

                await asyncio.sleep(0.2)
        else:
            pytest.fail("Triton did not come back")
        assert runtime.launcher.restarts == 1
        np.testing.assert_array_equal(before["fetch_name_0"], after["fetch_name_0"])
    finally:
        await runtime.stop()
    assert runtime.launcher is None


@pytest.mark.parametrize("protocol,shm", [("grpc", True), ("grpc", False), ("http", True), ("http", False)])
async def test_calls_during_a_triton_restart_wait_and_are_answered(settings, specs, caplog, protocol, shm) -> None:
    """Calls made right after the SIGKILL of the launched server (no retry by the caller)
    wait for the restart and the reload and return the same outputs; one WARNING for the
    outage, no traceback. Over gRPC and HTTP, tensors in shared memory or on the wire."""
    import asyncio
    import logging

    runtime = TritonRuntime(
        dataclasses.replace(settings, infer_timeout_s=60.0, triton_protocol=protocol, triton_shm=shm)
    )
    await runtime.start()
    try:
        await runtime.load(specs["det"])
        x = np.zeros((1, 3, 64, 64), np.float32)
        before = await runtime.infer(specs["det"].name, {"x": x})
        with caplog.at_level(logging.INFO, logger="immich_trt"):
            os.killpg(runtime.launcher.process.pid, signal.SIGKILL)
            started = time.monotonic()
            results = await asyncio.gather(*(runtime.infer(specs["det"].name, {"x": x}) for _ in range(4)))
            waited = time.monotonic() - started
        assert runtime.launcher.restarts == 1
        for after in results:
            np.testing.assert_array_equal(before["fetch_name_0"], after["fetch_name_0"])
        assert waited < 60
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "immich_trt.runtime.triton"]
        assert len(warnings) == 1 and "requests wait up to 60 s" in warnings[0].getMessage()
        assert not [r for r in caplog.records if r.exc_info], "no traceback for an expected outage"
        assert any("Triton is back after" in r.getMessage() for r in caplog.records)
    finally:
        await runtime.stop()


async def test_an_external_triton_that_goes_away_and_comes_back(settings, specs, tmp_path: Path, caplog) -> None:
    """TRITON_URL: the server is restarted by someone else and comes back without our
    model; a call made during the outage waits, and the model is loaded again."""
    import logging

    from immich_trt.runtime.launcher import TritonLauncher
    from immich_trt.runtime.repository import write_model

    repository = tmp_path / "repository"
    write_model(repository, specs["det"], settings)
    (tmp_path / "work").mkdir()
    other = TritonLauncher(repository, tmp_path / "work")  # restarts itself, reloads nothing
    await other.start()
    runtime = TritonRuntime(
        dataclasses.replace(settings, triton_url=other.grpc_url, engines_dir=repository, infer_timeout_s=60.0)
    )
    await runtime.start()
    try:
        assert runtime.launcher is None
        await runtime.load(specs["det"])
        x = np.zeros((1, 3, 64, 64), np.float32)
        before = await runtime.infer(specs["det"].name, {"x": x})
        with caplog.at_level(logging.INFO, logger="immich_trt"):
            os.killpg(other.process.pid, signal.SIGKILL)
            after = await runtime.infer(specs["det"].name, {"x": x})
        assert other.restarts == 1
        np.testing.assert_array_equal(before["fetch_name_0"], after["fetch_name_0"])
        messages = [r.getMessage() for r in caplog.records]
        assert any("Triton is unavailable" in m for m in messages)
        assert any("no longer has 'ocr__PP-OCRv5_mobile__detection'" in m for m in messages)
        assert not [r for r in caplog.records if r.exc_info and r.name.startswith("immich_trt.runtime")]
    finally:
        await runtime.stop()
        await other.stop()


async def test_a_call_failing_against_a_live_server_is_not_retried_forever(triton) -> None:
    """An operation that keeps failing as 'unavailable' while Triton answers its liveness
    check ends after MAX_OUTAGES_PER_CALL waits, quickly, with its error."""
    from immich_trt.runtime.base import RuntimeUnavailableError
    from immich_trt.runtime.triton import MAX_OUTAGES_PER_CALL

    attempts = 0

    async def failing():
        nonlocal attempts
        attempts += 1
        raise RuntimeUnavailableError("connection reset")

    started = time.monotonic()
    with pytest.raises(RuntimeUnavailableError, match="connection reset"):
        await triton._wait_through_outage(failing)
    assert attempts == MAX_OUTAGES_PER_CALL + 1
    assert time.monotonic() - started < 30


async def test_the_rss_guard_restarts_triton_and_calls_keep_being_answered(settings, specs, monkeypatch, caplog) -> None:
    """IMMICH_TRT_TRITON_MAX_RSS_MB: over the bound the launched server is stopped
    gracefully and started again; calls made meanwhile are answered, none fails."""
    import asyncio
    import logging

    from immich_trt.runtime import launcher as launcher_module

    monkeypatch.setattr(launcher_module, "RSS_CHECK_S", 0.5)
    runtime = TritonRuntime(dataclasses.replace(settings, triton_max_rss_mb=1, infer_timeout_s=60.0))
    await runtime.start()
    # the setting reaches the launcher; the guard is held off (no await since start()
    # returned) until the first server's pid is known, or a slow load could see the
    # restart finish before it
    assert runtime.launcher.max_rss_mb == 1
    runtime.launcher.max_rss_mb = 0
    try:
        await runtime.load(specs["det"])
        x = np.zeros((1, 3, 64, 64), np.float32)
        before = await runtime.infer(specs["det"].name, {"x": x})
        first = runtime.launcher.process.pid
        assert runtime.launcher.recycles == 0
        runtime.launcher.max_rss_mb = 1
        answered = 0
        with caplog.at_level(logging.INFO, logger="immich_trt"):
            deadline = time.monotonic() + 60
            while runtime.launcher.recycles == 0 or runtime.launcher.restarting:
                assert time.monotonic() < deadline, "the RSS guard did not restart Triton"
                out = await runtime.infer(specs["det"].name, {"x": x})  # never raises
                np.testing.assert_array_equal(before["fetch_name_0"], out["fetch_name_0"])
                answered += 1
                await asyncio.sleep(0.05)
            runtime.launcher.max_rss_mb = 0  # one restart is enough for the test
            out = await runtime.infer(specs["det"].name, {"x": x})
        np.testing.assert_array_equal(before["fetch_name_0"], out["fetch_name_0"])
        assert runtime.launcher.process.pid != first and runtime.launcher.restarts == 0
        assert answered > 0
        assert any("IMMICH_TRT_TRITON_MAX_RSS_MB=1" in r.getMessage() for r in caplog.records)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("immich_trt.runtime")]
    finally:
        await runtime.stop()


def test_triton_log_levels() -> None:
    import logging

    assert triton_log_level('E1121 06:16:08.446369 11308 model_lifecycle.cc:642] "failed to load"') == logging.ERROR
    assert triton_log_level('W1121 06:16:08.4 1 metrics.cc:1] "x"') == logging.WARNING
    assert triton_log_level('E1121 06:16:08.446369 11308 server.cc:241] "CudaDriverHelper has not been initialized."') == logging.DEBUG
    assert triton_log_level("Error: Failed to initialize NVML") == logging.DEBUG


async def test_a_hung_triton_times_out_and_recovers(settings, specs) -> None:
    """SIGSTOP the real server: the call fails after the configured timeout instead of
    hanging; after SIGCONT the same runtime answers again."""
    import asyncio

    from immich_trt.runtime.base import RuntimeUnavailableError

    runtime = TritonRuntime(dataclasses.replace(settings, infer_timeout_s=1.0))
    await runtime.start()
    try:
        await runtime.load(specs["det"])
        x = np.zeros((1, 3, 64, 64), np.float32)
        await runtime.infer(specs["det"].name, {"x": x})
        os.killpg(runtime.launcher.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(RuntimeUnavailableError, match="did not answer"):
                await runtime.infer(specs["det"].name, {"x": x})
            assert time.monotonic() - started < 5
        finally:
            os.killpg(runtime.launcher.process.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while True:  # the 1 s timeout may still catch the backlog on a busy machine
            try:
                out = await runtime.infer(specs["det"].name, {"x": x})
                break
            except RuntimeUnavailableError:
                assert time.monotonic() < deadline, "no recovery after SIGCONT"
                await asyncio.sleep(0.2)
        assert out["fetch_name_0"].shape == (1, 1, 64, 64)
    finally:
        await runtime.stop()


async def test_a_full_triton_installation_is_launched_from_its_root(settings, specs, tmp_path: Path) -> None:
    """IMMICH_TRT_TRITON_SERVER: a root with ``bin/tritonserver``, ``lib/`` and
    ``backends/`` (the layout of /opt/tritonserver in NVIDIA's image), laid out here from
    the wheel's own files, is launched with its backend directory as it is."""
    from immich_trt.runtime.launcher import TritonInstallation
    from immich_trt.tools.testing import triton_installation_from_wheel

    root = triton_installation_from_wheel(tmp_path / "tritonserver")
    runtime = TritonRuntime(dataclasses.replace(settings, triton_server=root, engines_dir=tmp_path / "engines"))
    await runtime.start()
    try:
        assert runtime.launcher is not None and runtime.launcher.server_root == root
        await runtime.load(specs["det"])
        out = await runtime.infer(specs["det"].name, {"x": np.zeros((1, 3, 64, 64), np.float32)})
        assert out["fetch_name_0"].shape == (1, 1, 64, 64)
    finally:
        await runtime.stop()
    with pytest.raises(Exception, match="no Triton server"):
        TritonInstallation.at(tmp_path / "nowhere")
