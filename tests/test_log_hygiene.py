"""No face data and no API key ever reach the logs, at the most verbose log level.

A live server (bundled Triton, test-pack face models) with ``IMMICH_TRT_API_KEY`` and
``IMMICH_LOG_LEVEL=verbose`` answers face requests on ``/predict``, ingests faces
through the sidecar, names a person, searches faces, and refuses a wrong key; its whole
log (server and Triton) is then searched for the key, the wrong key, every embedding
value it returned and the person's name.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

from immich_trt.contract import build_form, face_entries
from immich_trt.tools.testing import LiveServer
from immich_trt.tools.testpack import bright_square_image

KEY = "k3y-that-must-never-be-logged-7f1c2a"
WRONG_KEY = "wrong-key-that-must-never-be-logged-93be"
NAME = "Ada Lovelace-Byron"


def faces_png(squares: list[tuple[int, int]]) -> bytes:
    rgb = bright_square_image(640, 640, [(x, y, 32) for x, y in squares], value=255)[:, :, ::-1]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG")
    return buffer.getvalue()


def embedding_fragments(embedding: list[float]) -> list[str]:
    """Text forms of the first values, as a log line could carry them."""
    fragments = []
    for value in embedding[:8]:
        if abs(value) > 1e-3:
            fragments += [json.dumps(value), f"{value:.6f}", f"{np.float32(value)}"]
    return fragments


async def test_logs_carry_no_api_key_and_no_face_data(model_cache: Path, tmp_path: Path) -> None:
    env = {"IMMICH_TRT_API_KEY": KEY, "IMMICH_LOG_LEVEL": "verbose", "IMMICH_TRT_RECORD": "1"}
    auth = {"Authorization": f"Bearer {KEY}"}
    embeddings: list[list[float]] = []
    with LiveServer(model_cache, tmp_path, env=env) as server:
        async with aiohttp.ClientSession() as session:
            image = faces_png([(100, 100), (400, 300)])
            async with session.post(f"{server.url}/predict", data=build_form(face_entries(), image)) as r:
                assert r.status == 200
                for face in (await r.json())["facial-recognition"]:
                    embeddings.append(json.loads(face["embedding"]))
            for i, squares in enumerate(([(50, 60)], [(300, 200)], [(500, 500)], [(120, 400)])):
                form = aiohttp.FormData()
                form.add_field("image", faces_png(squares), filename=f"face{i}.png")
                async with session.post(f"{server.url}/v1/ingest", data=form, headers=auth) as r:
                    assert r.status == 200, await r.text()
            async with session.post(f"{server.url}/v1/faces/cluster", json={}, headers=auth) as r:
                assert r.status == 200, await r.text()
            async with session.get(f"{server.url}/v1/persons", headers=auth) as r:
                persons = (await r.json())["items"]
            assert persons
            async with session.post(
                f"{server.url}/v1/persons/{persons[0]['id']}/name", json={"name": NAME}, headers=auth
            ) as r:
                assert r.status == 200, await r.text()
            form = aiohttp.FormData()
            form.add_field("image", image, filename="query.png")
            async with session.post(f"{server.url}/v1/search/face", data=form, headers=auth) as r:
                assert r.status == 200, await r.text()
                assert NAME in await r.text()  # the name is answered to the client, never logged
            async with session.get(f"{server.url}/v1/persons", headers={"Authorization": f"Bearer {WRONG_KEY}"}) as r:
                assert r.status == 401
            async with session.get(f"{server.url}/v1/persons?key={WRONG_KEY}") as r:
                assert r.status == 401
    log = server.log_path.read_text(errors="replace")
    assert "DEBUG" in log or "debug" in log.lower()  # the most verbose level really was on
    assert KEY not in log
    assert WRONG_KEY not in log
    assert "Bearer" not in log
    assert NAME not in log
    assert embeddings
    for embedding in embeddings:
        for fragment in embedding_fragments(embedding):
            assert fragment not in log, fragment
