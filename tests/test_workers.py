"""MACHINE_LEARNING_WORKERS: several processes behind one port sharing one Triton
(``immich_trt.server.workers``), tested on a live ``immich-trt serve`` in GPU mode over the
stand-in repository (the GPU image's set-up: a full Triton launched over a prebuilt
repository), plus the rules of when several processes are possible."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from immich_trt.config import NO_OP_VARIABLES, Settings
from immich_trt.contract import clip_visual_entries, face_entries
from immich_trt.server.workers import WORKER_ENV, WorkerRole, merge_metrics, process_count
from immich_trt.server.workers import wait_for_workers as workers_listening
from immich_trt.tools.testing import LiveServer, offline_settings
from immich_trt.web.metrics import Metrics

WORKERS = 3  # the primary and two workers


async def wait_for_workers(server: LiveServer, count: int) -> dict[int, WorkerRole]:
    assert server.process is not None
    try:
        return await workers_listening(server.process.pid, count)
    except TimeoutError:
        raise AssertionError(f"{count} workers did not come up; see {server.log_path}") from None


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return 0.0


@pytest.fixture(scope="module")
def server(model_cache: Path, tmp_path_factory):
    """``immich-trt serve`` with three processes, the launched full Triton over the
    stand-in GPU repository."""
    from immich_trt.tools.gpu.ensemble import write_standin_repository
    from immich_trt.tools.testing import triton_installation_from_wheel

    work = tmp_path_factory.mktemp("workers")
    repository = work / "engines"
    write_standin_repository(offline_settings(model_cache, engines_dir=repository), repository)
    env = {
        "IMMICH_TRT_PREPROCESS": "gpu",
        "IMMICH_TRT_TRITON_SERVER": str(triton_installation_from_wheel(work / "tritonserver")),
        "IMMICH_TRT_ENGINES_DIR": str(repository),
        "MACHINE_LEARNING_WORKERS": str(WORKERS),
        "MACHINE_LEARNING_MODEL_TTL": "300",
    }
    with LiveServer(model_cache, work, env) as live:
        yield live


def photo() -> bytes:
    """A 640x480 JPEG with three bright squares on a dark ground (faces to the stand-in detector)."""
    canvas = Image.new("RGB", (640, 480), (20, 24, 28))
    for x in (80, 260, 440):
        canvas.paste((235, 230, 220), (x, 180, x + 120, 300))
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


async def predict(session: aiohttp.ClientSession, url: str, entries: dict, image: bytes) -> bytes:
    form = aiohttp.FormData()
    form.add_field("entries", json.dumps(entries))
    form.add_field("image", image, filename="blob", content_type="application/octet-stream")
    async with session.post(f"{url}/predict", data=form) as response:
        assert response.status == 200, await response.text()
        return await response.read()


async def test_every_process_answers_on_the_one_port_and_metrics_are_their_sum(server: LiveServer) -> None:
    """Connections spread over the three processes; every answer is the same; the
    public /metrics counts every request once, whichever process took it."""
    workers = await wait_for_workers(server, WORKERS - 1)
    image = photo()
    requests = 48
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/metrics") as r:
            before = sample(await r.text(), "immich_trt_predict_seconds_count")
        # a new connection per request: the kernel picks the process per connection
        fresh = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=fresh) as spread:
            for entries in (clip_visual_entries(), face_entries()):
                answers = await asyncio.gather(*(predict(spread, server.url, entries, image) for _ in range(requests // 2)))
                assert len(set(answers)) == 1, "every process gives the same answer"
        own = {}
        for pid, role in workers.items():
            async with session.get(f"http://127.0.0.1:{role.own_port}/metrics") as r:
                own[pid] = sample(await r.text(), "immich_trt_predict_seconds_count")
        async with session.get(f"{server.url}/metrics") as r:
            merged = await r.text()
    assert sample(merged, "immich_trt_predict_seconds_count") - before == requests
    assert all(count > 0 for count in own.values()), f"a worker took no connection: {own}"
    assert sum(own.values()) < before + requests, "the primary took none"


async def test_sidecar_and_page_requests_reach_the_primary_through_any_process(server: LiveServer) -> None:
    """/v1 and /ui exist in the primary only: a worker passes them on, status and body
    unchanged (the same store answers); its own figures count them as "/{tail}"."""
    workers = await wait_for_workers(server, WORKERS - 1)
    fresh = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=fresh) as session:
        bodies = set()
        for _ in range(24):
            async with session.get(f"{server.url}/v1/status") as r:
                assert r.status == 200
                bodies.add((await r.json())["runtime"]["name"])
            async with session.get(f"{server.url}/ui") as r:
                assert r.status == 200 and "text/html" in r.headers["Content-Type"]
                assert "default-src 'none'" in r.headers["Content-Security-Policy"]
            async with session.get(f"{server.url}/v1/assets/does-not-exist") as r:
                assert r.status == 404
            async with session.post(f"{server.url}/v1/search/ocr", json={"query": "sign", "limit": 3}) as r:
                assert r.status == 200 and await r.json() == {"total": 0, "items": []}  # the body arrived
            async with session.post(f"{server.url}/v1/search/ocr", json={"query": ""}) as r:
                assert r.status == 400  # the primary's own refusal, passed back
            async with session.get(f"{server.url}/v1/faces/unassigned?limit=0") as r:
                assert r.status == 400 and "limit" in (await r.text())  # the query string arrived
        passed = 0
        for role in workers.values():
            async with session.get(f"http://127.0.0.1:{role.own_port}/metrics") as r:
                passed += sample(await r.text(), "immich_trt_http_requests_total", route="/{tail}", status="200")
    assert bodies == {"triton"}
    assert passed > 0, "no request went through a worker"


def environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in items if b"=" in item)


def registered_regions(triton_url: str) -> list[str]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_url)
    try:
        return list(client.get_system_shared_memory_status(as_json=True).get("regions", {}))
    finally:
        client.close()


async def test_a_worker_that_dies_is_started_again_and_its_shared_memory_forgotten(server: LiveServer) -> None:
    """Workers pass tensors through shared memory like the primary, under prefixes of
    their own; SIGKILL one: its regions are unregistered from Triton and unlinked, and a
    new process takes its place (and its port) under a new prefix."""
    workers = await wait_for_workers(server, WORKERS - 1)
    pid, role = next(iter(workers.items()))
    env = environ(pid)
    prefix, triton_url = env["IMMICH_TRT_TRITON_SHM_PREFIX"], env["TRITON_URL"]
    assert prefix.endswith(f"w{role.index}s0_")
    # the first test sent requests through every worker
    assert list(Path("/dev/shm").glob(f"{prefix}*")), "the worker used no shared memory"
    assert any(name.startswith(prefix) for name in registered_regions(triton_url))
    os.kill(pid, signal.SIGKILL)
    again = await wait_for_workers(server, WORKERS - 1)
    assert pid not in again and role in again.values()
    assert f"Worker {role.index} (pid {pid}) exited with code -9" in server.log_path.read_text()
    assert not list(Path("/dev/shm").glob(f"{prefix}*"))
    assert not [name for name in registered_regions(triton_url) if name.startswith(prefix)]
    new = next(p for p, r in again.items() if r == role)
    assert environ(new)["IMMICH_TRT_TRITON_SHM_PREFIX"].endswith(f"w{role.index}s1_")
    fresh = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=fresh) as session:
        answers = await asyncio.gather(*(predict(session, server.url, clip_visual_entries(), photo()) for _ in range(12)))
    assert len(set(answers)) == 1


def test_stopping_the_server_stops_its_workers(model_cache: Path, tmp_path: Path, server: LiveServer) -> None:
    """SIGTERM to the primary: its workers exit too (and the module's server still runs)."""
    keep = ("IMMICH_TRT_PREPROCESS", "IMMICH_TRT_TRITON_SERVER", "IMMICH_TRT_ENGINES_DIR", "MACHINE_LEARNING_WORKERS",
            "MACHINE_LEARNING_MODEL_TTL")
    second = LiveServer(model_cache, tmp_path, {k: server.env[k] for k in keep})
    with second:
        workers = asyncio.run(wait_for_workers(second, WORKERS - 1))
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    log = (tmp_path / "server.log").read_text()
    assert "MACHINE_LEARNING_MODEL_TTL=300 has no effect with several processes" in log
    assert "MACHINE_LEARNING_WORKERS is accepted" not in log


# --------------------------------------------------------------------- the rules


def test_workers_are_parsed_and_no_longer_a_no_op() -> None:
    assert Settings.from_env({}).workers == 1
    assert Settings.from_env({"machine_learning_workers": "4"}).workers == 4
    with pytest.raises(ValueError, match="MACHINE_LEARNING_WORKERS"):
        Settings.from_env({"MACHINE_LEARNING_WORKERS": "0"})
    assert "MACHINE_LEARNING_WORKERS" not in NO_OP_VARIABLES


def test_several_processes_only_share_a_prebuilt_triton() -> None:
    base = dataclasses.replace(Settings(), workers=4)
    assert process_count(dataclasses.replace(base, workers=1), "triton") == (1, None)
    count, why = process_count(base, "onnxruntime")
    assert count == 1 and "in-process runtime" in why
    count, why = process_count(base, "triton")
    assert count == 1 and "IMMICH_TRT_PREPROCESS=gpu" in why
    assert process_count(dataclasses.replace(base, preprocess="gpu"), "triton") == (4, None)
    assert process_count(dataclasses.replace(base, triton_url="127.0.0.1:8001"), "triton") == (4, None)
    with pytest.raises(ValueError, match="IMMICH_TRT_RECORD"):
        process_count(dataclasses.replace(base, preprocess="gpu", record=True), "triton")


def test_worker_role_round_trips_and_rejects_garbage() -> None:
    role = WorkerRole(2, 40001, 40002)
    assert WorkerRole.from_env({WORKER_ENV: role.env_value()}) == role
    assert WorkerRole.from_env({}) is None
    with pytest.raises(ValueError, match=WORKER_ENV):
        WorkerRole.from_env({WORKER_ENV: "one:two"})


def test_merged_metrics_sum_counters_and_histograms_and_keep_shared_gauges() -> None:
    a, b = Metrics(), Metrics()
    for metrics, n in ((a, 3), (b, 5)):
        for _ in range(n):
            metrics.requests.labels("/predict", "200").inc()
            metrics.request_latency.observe(0.01)
        metrics.in_flight.set(n)
        metrics.models_loaded.set(4)
    b.errors.labels("500", "undecodable_image").inc()
    text = merge_metrics([a.render()[0].decode(), b.render()[0].decode()]).decode()
    assert sample(text, "immich_trt_http_requests_total", route="/predict", status="200") == 8
    assert sample(text, "immich_trt_predict_seconds_count") == 8
    assert sample(text, "immich_trt_predict_seconds_bucket", le="0.025") == 8
    assert sample(text, "immich_trt_errors_total", status="500", reason="undecodable_image") == 1
    assert sample(text, "immich_trt_predict_in_flight") == 8
    assert sample(text, "immich_trt_models_loaded") == 4
    created = [s for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "immich_trt_predict_seconds_created"]  # fmt: skip
    assert len(created) == 1 and created[0].value == min(
        sample(m.render()[0].decode(), "immich_trt_predict_seconds_created") for m in (a, b)
    )


async def test_a_worker_applies_the_access_rule_itself_and_says_when_the_primary_is_gone(
    aiohttp_client, model_cache: Path, caplog
) -> None:
    """The primary sees passed requests come from loopback, so the worker applies the
    rule to its own client first: with a key, /v1 without it is refused by the worker;
    with it (and /ui, open) the request is passed on: a 502 with one log line when the
    primary does not answer."""
    from immich_trt.application import create_app
    from immich_trt.runtime.launcher import free_port
    from immich_trt.server.workers import install_worker

    settings = offline_settings(model_cache, triton_url=f"127.0.0.1:{free_port()}", runtime="triton", sidecar=False,
                                api_key="s3cret", model_ttl=0)  # fmt: skip
    role = WorkerRole(1, free_port(), free_port())  # nobody listens on the primary's port
    app = create_app(settings)
    install_worker(app, role, settings)
    client = await aiohttp_client(app)
    async with client.get("/v1/status") as r:
        assert r.status == 401
    with caplog.at_level("ERROR", logger="immich_trt.server"):
        async with client.get("/v1/status", headers={"Authorization": "Bearer s3cret"}) as r:
            assert r.status == 502
            assert (await r.json())["detail"] == "the primary process did not answer"
        async with client.get("/ui") as r:
            assert r.status == 502
    assert any("could not reach the primary" in r.getMessage() for r in caplog.records)
    async with client.get("/ping") as r:  # its own routes do not need the primary
        assert r.status == 200 and await r.text() == "pong"
