"""Faults of the real processes: ``immich-trt serve`` with its bundled Triton, provoked
for real (signals to the real server and the real Triton), real models and images.

- SIGTERM: the server stops accepting, finishes the requests in flight, stops Triton
  and exits 0.
- Triton hung (SIGSTOP): requests fail after the per-call timeout with a retryable 503
  and ``Retry-After``; once Triton runs again (SIGCONT) requests succeed.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from conftest import NO_DATA_REASON, SHARED_DATA, requires_data
from immich_trt.contract import build_form, clip_visual_entries, ocr_entries
from immich_trt.tools.testing import LiveServer


def children(pid: int) -> dict[int, str]:
    """Direct child processes of ``pid``: ``{pid: command name}`` from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        if ppid == pid:
            found[int(stat.parent.name)] = name
    return found


def triton_pid(server: LiveServer) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid, name in children(server.process.pid).items():
            if name.startswith("tritonserver"):
                return pid
        time.sleep(0.2)
    raise AssertionError("no tritonserver child process")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[1][0] != "Z"


@pytest.fixture(scope="module")
def preview() -> bytes:
    if not SHARED_DATA.is_dir():
        pytest.skip(NO_DATA_REASON)
    with Image.open(SHARED_DATA / "photos" / "book-beside-flowers.jpg") as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@requires_data
async def test_sigterm_drains_in_flight_requests_stops_triton_and_exits_0(model_cache: Path, tmp_path: Path, preview) -> None:
    server = LiveServer(model_cache, tmp_path).start()
    try:
        pid = triton_pid(server)
        async with aiohttp.ClientSession() as session:
            # warm the OCR models so the requests below are in inference when SIGTERM comes
            async with session.post(f"{server.url}/predict", data=build_form(ocr_entries(), preview)) as r:
                assert r.status == 200

            finished: list[float] = []

            async def one() -> tuple[int, dict]:
                async with session.post(f"{server.url}/predict", data=build_form(ocr_entries(), preview)) as r:
                    body = await r.json()
                    finished.append(time.monotonic())
                    return r.status, body

            in_flight = [asyncio.create_task(one()) for _ in range(6)]
            await asyncio.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            results = await asyncio.gather(*in_flight, return_exceptions=True)
            assert all(not isinstance(r, BaseException) for r in results), results
            assert [status for status, _ in results] == [200] * 6
            assert all(body["ocr"]["text"] for _, body in results)
            assert sum(t > signalled for t in finished) >= 2  # really in flight when the signal came
            # no new connections once it is stopping
            await asyncio.sleep(0.5)
            with pytest.raises(aiohttp.ClientConnectionError):
                async with session.get(f"{server.url}/ping") as r:
                    await r.read()
        code = await asyncio.to_thread(server.process.wait, 60)
        assert code == 0, server.log_path.read_text()[-2000:]
        assert not alive(pid)  # Triton stopped with the server
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "Traceback" not in log


@requires_data
async def test_a_hung_triton_answers_503_retry_after_then_recovers(model_cache: Path, tmp_path: Path, preview) -> None:
    env = {"IMMICH_TRT_INFER_TIMEOUT_S": "2"}
    with LiveServer(model_cache, tmp_path, env=env) as server:
        pid = triton_pid(server)
        entries = clip_visual_entries()
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.url}/predict", data=build_form(entries, preview)) as r:
                assert r.status == 200
                expected = (await r.json())["clip"]
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                async with session.post(f"{server.url}/predict", data=build_form(entries, preview)) as r:
                    assert r.status == 503
                    assert r.headers["Retry-After"] == "1"
                    assert await r.json() == {"detail": "Inference backend unavailable, retry later"}
                assert time.monotonic() - started < 10
                async with session.get(f"{server.url}/ping") as r:
                    assert r.status == 200  # the server itself stays responsive
            finally:
                os.kill(pid, signal.SIGCONT)
            deadline = time.monotonic() + 30
            while True:
                async with session.post(f"{server.url}/predict", data=build_form(entries, preview)) as r:
                    if r.status == 200:
                        assert (await r.json())["clip"] == expected
                        break
                    assert r.status == 503
                assert time.monotonic() < deadline, "no recovery after SIGCONT"
                await asyncio.sleep(0.2)
