"""The sidecar's /v1 API in-process: ingestion with the real models (PP-OCRv5, test
pack), real SQLite, and the HTTP layer's validation, auth and OpenAPI document."""

from __future__ import annotations

import dataclasses
import io
import json
import sqlite3
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from imohash import hashfile
from PIL import Image

from conftest import GOLDEN, SHARED_DATA, requires_data
from immich_trt.application import create_app
from immich_trt.sidecar.routes import ROUTES, openapi_document
from immich_trt.tools.testing import offline_settings
from immich_trt.tools.testpack import bright_square_image


def encode(array_rgb: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array_rgb).save(out, format=fmt, **kw)
    return out.getvalue()


def faces_image(squares: list[tuple[int, int]], value: int = 255, size: int = 640) -> bytes:
    """A black image with 32 px squares of grey ``value``: the test pack's faces."""
    return encode(bright_square_image(size, size, [(x, y, 32) for x, y in squares], value=value)[:, :, ::-1].copy())


def ingest_form(image: bytes, **fields) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("image", image, filename="blob", content_type="application/octet-stream")
    for name, value in fields.items():
        form.add_field(name, value if isinstance(value, str) else json.dumps(value))
    return form


@pytest.fixture
def settings(model_cache: Path, tmp_path: Path):
    return offline_settings(
        model_cache, runtime="onnxruntime", model_ttl=0, engines_dir=tmp_path / "engines", data_dir=tmp_path / "data"
    )


@pytest.fixture
async def client(aiohttp_client, settings):
    return await aiohttp_client(create_app(settings))


async def ok(response) -> dict:
    body = await response.read()
    assert response.status == 200, body[:500]
    return json.loads(body)


def db(settings) -> sqlite3.Connection:
    return sqlite3.connect(settings.data_dir / "sidecar.db")


# ----------------------------------------------------------------------------- ingest


@requires_data
async def test_ingest_runs_every_task_once_and_is_idempotent(client, settings) -> None:
    path = SHARED_DATA / "ocr" / "ch_en_num.jpg"
    data = path.read_bytes()
    first = await ok(await client.post("/v1/ingest", data=ingest_form(data, assetId="a-1", filename=path.name)))
    assert first["created"] is True
    assert first["ran"] == ["clip", "faces", "ocr"] and first["skipped"] == []
    assert first["imohash"] == hashfile(str(path), hexdigest=True)
    golden = json.loads((GOLDEN / "immich_ml_3.1.0_ocr.json").read_text())
    texts = json.loads(golden["responses"]["ocr"]["ocr/ch_en_num.jpg"]["body"])["ocr"]["text"]
    assert first["ocrLines"] == len(texts) == 14

    counts = lambda: [db(settings).execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # noqa: E731
                      for t in ("assets", "faces", "ocr_lines", "asset_tasks")]
    before = counts()
    again = await ok(await client.post("/v1/ingest", data=ingest_form(data, assetId="a-1")))
    assert again == {**first, "created": False, "ran": [], "skipped": ["clip", "faces", "ocr"], "ocrLines": 0,
                     "clip": False, "faces": 0}
    assert counts() == before

    asset = await ok(await client.get("/v1/assets/a-1"))
    assert asset["refs"] == ["a-1"] and asset["filenames"] == ["ch_en_num.jpg"]
    assert [line["text"] for line in asset["ocr"]] == texts  # Immich's exact answer, stored
    assert asset["tasks"] == {"clip": ["ViT-B-32__openai"], "faces": ["buffalo_l"], "ocr": ["PP-OCRv5_mobile"]}
    by_hash = await ok(await client.get(f"/v1/assets/{first['imohash']}"))
    assert by_hash["id"] == asset["id"]


async def test_every_asset_id_the_api_answers_is_accepted_where_it_takes_one(client) -> None:
    """``"assetId": N`` of /v1/ingest and of search results, the imohash, and a file path
    sent percent-encoded, as it is, or without its leading slash all name the asset."""
    path = "/photos/2024 trip/IMG 0001.png"
    first = await ok(await client.post("/v1/ingest", data=ingest_form(faces_image([(50, 50)]), assetId=path)))
    second = await ok(await client.post("/v1/ingest", data=ingest_form(faces_image([(300, 300)]), assetId="42")))
    asset_id = first["assetId"]
    for ref in (str(asset_id), path, path.replace(" ", "%20").replace("/", "%2F"), path[1:],
                first["imohash"], f"imohash:{first['imohash']}"):
        response = await client.get(f"/v1/assets/{ref}")
        body = await response.read()
        assert response.status == 200, (ref, body[:200])
        assert json.loads(body)["id"] == asset_id, ref
    # a caller's ref made of digits names its own asset, before an asset id of the same digits
    assert (await ok(await client.get("/v1/assets/42")))["id"] == second["assetId"]
    assert (await client.get("/v1/assets/999999")).status == 404
    assert (await client.get("/v1/assets//photos/nope.png")).status == 404
    search = await ok(await client.post("/v1/search/text", json={"query": "squares", "k": 10}))
    assert {hit["assetId"] for hit in search["results"]} == {first["assetId"], second["assetId"]}
    for hit in search["results"]:
        assert (await ok(await client.get(f"/v1/assets/{hit['assetId']}")))["id"] == hit["assetId"]


async def test_status_lists_the_loaded_test_pack_models(client) -> None:
    """The test pack's CLIP and face models are placeholders: /v1/status says so once
    they are loaded; PP-OCRv5 (real weights) is not listed."""
    assert (await ok(await client.get("/v1/status")))["testPack"] == []
    await ok(await client.post("/v1/ingest", data=ingest_form(faces_image([(100, 100)]))))
    assert (await ok(await client.get("/v1/status")))["testPack"] == ["ViT-B-32__openai", "buffalo_l"]


async def test_ingest_generated_faces_then_cluster_search_and_thumbnail(client) -> None:
    # the same face (white square) in three images, a fourth image without faces
    images = [faces_image([(96, 96)]), faces_image([(320, 160)]), faces_image([(160, 448), (448, 448)]),
              faces_image([])]
    results = [await ok(await client.post("/v1/ingest", data=ingest_form(img, ocr=False))) for img in images]
    assert [r["faces"] for r in results] == [1, 1, 2, 0]

    stats = await ok(await client.post("/v1/faces/cluster", json={}))
    assert stats["newPersons"] == 1 and stats["assigned"] == 4
    listing = await ok(await client.get("/v1/persons"))
    assert listing["total"] == 1 and listing["items"][0]["faceCount"] == 4
    person = listing["items"][0]

    thumb = await client.get(f"/v1/persons/{person['id']}/thumbnail")
    assert thumb.status == 200 and thumb.content_type == "image/jpeg"
    assert Image.open(io.BytesIO(await thumb.read())).size[0] <= 160

    named = await ok(await client.post(f"/v1/persons/{person['id']}/name", json={"name": "Square"}))
    assert named["name"] == "Square"

    found = await ok(await client.post("/v1/search/face", data=ingest_form(faces_image([(224, 224)]))))
    assert len(found["faces"]) == 1
    hits = found["faces"][0]
    assert hits["persons"][0]["personId"] == person["id"] and hits["persons"][0]["personName"] == "Square"
    assert hits["results"][0]["similarity"] > 0.999

    by_id = await ok(await client.post("/v1/search/face/by-id", json={"faceId": hits["results"][0]["faceId"]}))
    assert len(by_id["results"]) == 3  # the other three faces, not itself


@requires_data
async def test_ocr_search_finds_words_of_the_real_images(client) -> None:
    golden = json.loads((GOLDEN / "immich_ml_3.1.0_ocr.json").read_text())["responses"]["ocr"]
    names = ["ocr/en.jpg", "ocr/ch_en_num.jpg", "ocr/text_rec.jpg"]
    ids = {}
    for name in names:
        result = await ok(await client.post(
            "/v1/ingest", data=ingest_form((SHARED_DATA / name).read_bytes(), assetId=name, clip=False, faces=False)
        ))
        ids[name] = result["assetId"]
    for name, query in (("ocr/text_rec.jpg", "韩国小馆"), ("ocr/ch_en_num.jpg", "破损就赔")):
        texts = json.loads(golden[name]["body"])["ocr"]["text"]
        assert any(query in t for t in texts)
        found = await ok(await client.post("/v1/search/ocr", json={"query": query}))
        assert [item["assetId"] for item in found["items"]] == [ids[name]]
        line = found["items"][0]["lines"][0]
        assert query in line["text"] and len(line["polygon"]) == 8
        assert all(0.0 <= v <= 1.0 for v in line["polygon"])
    # an English word: every stored line containing it, case-insensitively
    english = [t for t in json.loads(golden["ocr/en.jpg"]["body"])["ocr"]["text"] if len(t) >= 5][0]
    word = english[:5].upper()
    found = await ok(await client.post("/v1/search/ocr", json={"query": word}))
    assert ids["ocr/en.jpg"] in [item["assetId"] for item in found["items"]]


@requires_data
async def test_duplicates_byte_identical_and_reencoded(client) -> None:
    path = SHARED_DATA / "photos" / "prairie_falcon.jpg"
    data = path.read_bytes()
    reencoded = encode(np.asarray(Image.open(path).convert("RGB")), "JPEG", quality=90)
    other = (SHARED_DATA / "photos" / "silver_fir.jpg").read_bytes()
    for ref, image in (("orig", data), ("copy", data), ("re", reencoded), ("other", other)):
        await ok(await client.post("/v1/ingest", data=ingest_form(image, assetId=ref, faces=False, ocr=False)))

    check = await ok(await client.post("/v1/duplicates/check", data=ingest_form(data)))
    assert check["duplicate"] is True and sorted(check["asset"]["refs"]) == ["copy", "orig"]
    check = await ok(await client.post("/v1/duplicates/check", data=ingest_form(b"\xff\xd8 not stored")))
    assert check["duplicate"] is False

    found = await ok(await client.post("/v1/duplicates/find", json={}))
    assert found["groups"] >= 1
    groups = (await ok(await client.get("/v1/duplicates/groups")))["items"]
    member_refs = [sorted(r for m in g["members"] for r in m["refs"]) for g in groups]
    assert ["copy", "orig", "re"] in member_refs  # same bytes and the re-encoded copy together
    assert not any("other" in refs for refs in member_refs)
    group = next(g for g in groups if sorted(r for m in g["members"] for r in m["refs"]) == ["copy", "orig", "re"])
    resolved = await ok(await client.post("/v1/duplicates/resolve", json={"groupId": group["id"]}))
    assert resolved["resolved"] is True
    hidden = {m["id"] for m in resolved["members"] if m["hidden"]}
    assert resolved["keeper"] not in hidden and len(hidden) == len(resolved["members"]) - 1
    undone = await ok(await client.post("/v1/duplicates/resolve", json={"groupId": group["id"], "undo": True}))
    assert not any(m["hidden"] for m in undone["members"])


async def test_text_search_ranks_stored_assets(client) -> None:
    ids = set()
    for value in (255, 200, 150):
        r = await ok(await client.post("/v1/ingest", data=ingest_form(faces_image([(96, 96)], value), ocr=False)))
        ids.add(r["assetId"])
    found = await ok(await client.post("/v1/search/text", json={"query": "a white square", "k": 10}))
    sims = [hit["similarity"] for hit in found["results"]]
    assert {hit["assetId"] for hit in found["results"]} == ids
    assert sims == sorted(sims, reverse=True)
    hybrid = await ok(await client.post("/v1/search/hybrid", json={"query": "square"}))
    assert {hit["assetId"] for hit in hybrid["results"]} <= ids


async def test_record_mode_stores_predict_results_by_imohash(aiohttp_client, settings) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, record=True)))
    image = faces_image([(96, 96)])
    form = aiohttp.FormData()
    entries = {"clip": {"visual": {"modelName": "ViT-B-32__openai"}},
               "facial-recognition": {"detection": {"modelName": "buffalo_l", "options": {"minScore": 0.7}},
                                      "recognition": {"modelName": "buffalo_l"}}}
    form.add_field("entries", json.dumps(entries))
    form.add_field("image", image, filename="blob")
    response = await ok(await client.post("/predict", data=form))
    assert len(response["facial-recognition"]) == 1
    for _ in range(50):  # recorded in the background
        stored = await client.get(f"/v1/assets/imohash:{_imohash(image)}")
        if stored.status == 200:
            break
        await __import__("asyncio").sleep(0.05)
    asset = await ok(stored)
    assert asset["tasks"] == {"clip": ["ViT-B-32__openai"], "faces": ["buffalo_l"]}
    assert asset["faces"][0]["box"] == response["facial-recognition"][0]["boundingBox"]


def _imohash(data: bytes) -> str:
    from immich_trt.sidecar.duplicates import imohash_of

    return imohash_of(data)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "method, path, kwargs, status, fragment",
    [
        ("POST", "/v1/faces/cluster", {"data": b"{not json"}, 400, "not valid JSON"),
        ("POST", "/v1/faces/cluster", {"json": [1, 2]}, 400, "JSON object"),
        ("POST", "/v1/faces/cluster", {"json": {"full": "yes"}}, 400, "full must be a boolean"),
        ("POST", "/v1/faces/cluster", {"json": {"bogus": 1}}, 400, "unknown field(s): bogus"),
        ("POST", "/v1/search/text", {"json": {}}, 400, "query is required"),
        ("POST", "/v1/search/ocr", {"json": {"query": " \t "}}, 400, "query must match"),
        ("POST", "/v1/search/text", {"json": {"query": "x", "model": "RN50__cc12m"}}, 503, "Failed to load model"),
        ("POST", "/v1/search/text", {"json": {"query": "x", "k": 0}}, 400, "k must be >= 1"),
        ("POST", "/v1/search/text", {"json": {"query": "x", "k": True}}, 400, "k must be an integer"),
        ("POST", "/v1/search/text", {"json": {"query": "x", "model": "../../etc"}}, 400, "unknown model '../../etc'"),
        ("POST", "/v1/search/text", {"json": {"query": "x" * 257}}, 400, "longer than 256"),
        ("POST", "/v1/search/ocr", {"json": {"query": "abc", "limit": 10**6}}, 400, "limit must be <= 500"),
        ("POST", "/v1/search/face/by-id", {"json": {"faceId": 2**70}}, 400, "faceId must be"),
        ("POST", "/v1/search/face/by-id", {"json": {"faceId": 12345}}, 404, "12345"),
        ("GET", "/v1/persons/abc", {}, 404, "Not Found"),
        ("GET", "/v1/persons/99999999999999999999999", {}, 400, "id must be <="),
        ("GET", "/v1/persons/77", {}, 404, "77"),
        ("GET", "/v1/persons?limit=-1", {}, 400, "limit must be >= 1"),
        ("DELETE", "/v1/persons/5", {}, 404, "5"),
        ("POST", "/v1/persons/merge", {"json": {"targetId": 1, "sourceIds": ["a"]}}, 400, "list of integers"),
        ("POST", "/v1/persons/split", {"json": {"faceIds": []}}, 400, "faceIds must not be empty"),
        ("POST", "/v1/ingest", {"json": {"image": "x"}}, 400, "multipart"),
        ("POST", "/v1/ingest", {"data": ingest_form(b"")}, 400, "image is empty"),
        ("POST", "/v1/ingest", {"data": ingest_form(b"not an image")}, 400, "cannot be decoded"),
        ("POST", "/v1/ingest", {"data": ingest_form(b"\x89PNG\r\n\x1a\n", faceModel="../x")}, 400,
         "unknown faceModel '../x'"),
        ("POST", "/v1/ingest", {"data": ingest_form(b"x", clip=False, faces=False, ocr=False)}, 400, "no task"),
        ("POST", "/v1/duplicates/find", {"json": {"threshold": 1.5}}, 400, "threshold must be <= 1.0"),
        ("POST", "/v1/duplicates/resolve", {"json": {"groupId": 3}}, 404, "3"),
        ("GET", "/v1/assets/nothing-here", {}, 404, "nothing-here"),
        ("GET", "/v1/persons/1/thumbnail", {}, 404, "1"),
    ],
)
async def test_bad_input_gets_a_clear_4xx(client, method, path, kwargs, status, fragment) -> None:
    response = await client.request(method, path, **kwargs)
    body = await response.json()
    assert response.status == status, body
    assert fragment in body["detail"]
    assert (await client.get("/ping")).status == 200


# ----------------------------------------------------------------------------- auth


async def test_api_key_is_required_when_set(aiohttp_client, settings) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, api_key="s3cret-key")))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                    {"Authorization": "Bearer s3cret-key-and-more"}, {"Authorization": "Basic s3cret-key"}):
        response = await client.get("/v1/persons", headers=headers)
        assert response.status == 401
        assert "API key" in (await response.json())["detail"]
    for scheme in ("Bearer", "bearer"):  # the scheme is case-insensitive (RFC 7235)
        assert (await client.get("/v1/persons", headers={"Authorization": f"{scheme} s3cret-key"})).status == 200
    # Immich's own routes never need the key
    assert (await client.get("/ping")).status == 200


def test_loopback_detection() -> None:
    from immich_trt.loopback import is_loopback

    for address in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(address), address
    for address in ("192.0.2.2", "10.0.0.1", "::ffff:10.0.0.1", "fd00::2", "", None, "not-an-ip"):
        assert not is_loopback(address), address


def _peer_middleware(peer: str):
    """An outermost middleware that makes the app see ``peer`` as the client address
    (``request.remote``), as a connection from that host would: the real app, over a
    real loopback socket, with every other part of the request untouched."""
    from aiohttp import web

    @web.middleware
    async def as_peer(request, handler):
        return await handler(request.clone(remote=peer))

    return as_peer


@pytest.mark.parametrize("peer", ["192.0.2.7", "10.1.2.3", "2001:db8::5", "::ffff:192.0.2.7", "fe80::1%eth0"])
async def test_remote_clients_are_refused_without_a_key(aiohttp_client, settings, peer: str) -> None:
    """Without an API key, a client from another host gets 403 on /v1, whatever headers
    claim about its origin; Immich's own routes stay open to it."""
    app = create_app(settings)
    app.middlewares.insert(0, _peer_middleware(peer))
    client = await aiohttp_client(app)
    spoofed = (
        {},
        {"X-Forwarded-For": "127.0.0.1"},
        {"X-Forwarded-For": "127.0.0.1, ::1"},
        {"Forwarded": "for=127.0.0.1;proto=http"},
        {"Forwarded": 'for="[::1]"'},
        {"X-Real-IP": "127.0.0.1"},
        {"X-Forwarded-Host": "localhost", "Host": "localhost"},
    )
    for headers in spoofed:
        for method, path in (("GET", "/v1/persons"), ("GET", "/v1/status"), ("POST", "/v1/search/text")):
            response = await client.request(method, path, headers=headers, json={"query": "x"})
            assert response.status == 403, (headers, path)
            assert "loopback" in (await response.json())["detail"]
    assert (await client.get("/ping")).status == 200
    assert (await client.get("/")).status == 200


async def test_remote_clients_with_the_key_are_served(aiohttp_client, settings) -> None:
    app = create_app(dataclasses.replace(settings, api_key="s3cret-key"))
    app.middlewares.insert(0, _peer_middleware("192.0.2.7"))
    client = await aiohttp_client(app)
    assert (await client.get("/v1/persons")).status == 401
    assert (await client.get("/v1/persons", headers={"X-Forwarded-For": "127.0.0.1"})).status == 401
    assert (await client.get("/v1/persons", headers={"Authorization": "Bearer s3cret-key"})).status == 200


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
async def test_loopback_peers_are_served_without_a_key(aiohttp_client, settings, peer: str) -> None:
    app = create_app(settings)
    app.middlewares.insert(0, _peer_middleware(peer))
    client = await aiohttp_client(app)
    assert (await client.get("/v1/persons")).status == 200


# The same rule end to end, between two network namespaces made by the test: the server
# in one (bound to every interface of it), clients in the other, over a veth pair whose
# ends never appear in this machine's own network namespace.
NETNS_CLIENT = """
import json, sys, time, urllib.error, urllib.request
deadline = time.monotonic() + float(sys.argv[1])
results = []
for url in sys.argv[2:]:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                results.append([r.status, r.read().decode()])
            break
        except urllib.error.HTTPError as e:
            results.append([e.code, e.read().decode()])
            break
        except OSError:
            if time.monotonic() > deadline:
                results.append([None, "unreachable"])
                break
            time.sleep(0.2)
print(json.dumps(results))
"""


def _ip(*args: str) -> None:
    import subprocess

    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns_pair():
    """Two network namespaces joined by a veth pair: ``(server_ns, client_ns, server_address)``.

    Skipped where namespaces cannot be made (no ``ip``, not root); in CI that is a
    failure, since CI installs iproute2 and runs as root."""
    import os
    import shutil
    import subprocess

    tag = f"itrt{os.getpid() % 100000}"
    server_ns, client_ns = f"{tag}-srv", f"{tag}-cli"
    made: list[str] = []
    try:
        if shutil.which("ip") is None:
            raise OSError("the ip command (iproute2) is not installed")
        for ns in (server_ns, client_ns):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", f"{tag}s", "netns", server_ns, "type", "veth", "peer", "name", f"{tag}c", "netns", client_ns)
        _ip("-n", server_ns, "addr", "add", "192.0.2.1/24", "dev", f"{tag}s")
        _ip("-n", client_ns, "addr", "add", "192.0.2.2/24", "dev", f"{tag}c")
        for ns, dev in ((server_ns, f"{tag}s"), (client_ns, f"{tag}c")):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
    except (OSError, subprocess.SubprocessError) as error:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        detail = getattr(error, "stderr", b"") or b""
        reason = f"cannot make network namespaces here: {error} {detail.decode(errors='replace').strip()}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield server_ns, client_ns, "192.0.2.1"
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_non_loopback_clients_are_refused_without_a_key(model_cache: Path, tmp_path: Path, netns_pair) -> None:
    """A real server in its own network namespace: a client of another namespace gets 403
    on /v1 (also with X-Forwarded-For: 127.0.0.1) and 200 on /ping; a client on that
    namespace's loopback gets 200 on /v1."""
    import subprocess
    import sys

    from immich_trt.tools.testing import LiveServer

    server_ns, client_ns, address = netns_pair
    live = LiveServer(model_cache, tmp_path, env={"IMMICH_HOST": "0.0.0.0", "IMMICH_TRT_RUNTIME": "onnxruntime"})
    log = open(live.log_path, "wb")
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, sys.executable, "-m", "immich_trt", "serve"],
        env=live.env, stdout=log, stderr=subprocess.STDOUT,
    )

    def fetch(ns: str, *urls: str, wait_s: float = 0.0) -> list:
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", NETNS_CLIENT, str(wait_s), *urls],
            capture_output=True, text=True, timeout=wait_s + 60, check=True,
        )
        return json.loads(out.stdout)

    try:
        local = f"http://127.0.0.1:{live.port}"
        remote = f"http://{address}:{live.port}"
        [(status, _)] = fetch(server_ns, f"{local}/ping", wait_s=180)
        assert status == 200, live.log_path.read_text()[-2000:]
        [(status, _)] = fetch(server_ns, f"{local}/v1/persons")
        assert status == 200
        (ping, persons) = fetch(client_ns, f"{remote}/ping", f"{remote}/v1/persons")
        assert ping == [200, "pong"]
        assert persons[0] == 403
        assert "loopback" in json.loads(persons[1])["detail"]
        spoof = subprocess.run(
            ["ip", "netns", "exec", client_ns, sys.executable, "-c",
             "import sys, urllib.request, urllib.error\n"
             "r = urllib.request.Request(sys.argv[1], headers={'X-Forwarded-For': '127.0.0.1'})\n"
             "try: urllib.request.urlopen(r, timeout=10); print(200)\n"
             "except urllib.error.HTTPError as e: print(e.code)",
             f"{remote}/v1/persons"],
            capture_output=True, text=True, timeout=60, check=True,
        )
        assert spoof.stdout.strip() == "403"
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


# ----------------------------------------------------------------------------- openapi


async def test_openapi_describes_every_route(client) -> None:
    document = await ok(await client.get("/v1/openapi.json"))
    assert document == json.loads(json.dumps(openapi_document()))
    described = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    assert described == {(r.method, "/v1" + r.path) for r in ROUTES}
    registered = {
        (route.method, route.resource.canonical)
        for route in client.app.router.routes()
        if route.resource is not None and route.resource.canonical.startswith("/v1") and route.method != "HEAD"
    }
    assert registered == described


# ----------------------------------------------------------------------------- mirror


async def test_server_mirrors_writes_to_opensearch_and_survives_an_outage(aiohttp_client, settings) -> None:
    import asyncio

    from fake_opensearch import FakeOpenSearch

    with FakeOpenSearch() as fake:
        fake.down()  # OpenSearch is down when the server starts: start-up must not block or fail
        client = await aiohttp_client(create_app(dataclasses.replace(settings, opensearch_url=fake.url)))
        first = await ok(await client.post("/v1/ingest", data=ingest_form(faces_image([(96, 96)]), ocr=False)))
        await asyncio.sleep(0.5)
        status = await ok(await client.get("/v1/status"))
        assert status["outbox"] >= 2  # the asset and its face wait in the outbox

        fake.up()
        second = await ok(await client.post("/v1/ingest", data=ingest_form(faces_image([(320, 96)]), ocr=False)))
        for _ in range(200):  # the write wakes the mirror; backoff may delay the first retry
            status = await ok(await client.get("/v1/status"))
            if status["outbox"] == 0:
                break
            await asyncio.sleep(0.1)
        assert status["outbox"] == 0, status
        assert fake.count("immich-trt-assets") == 2 and fake.count("immich-trt-faces") == 2
        docs = fake.docs["immich-trt-assets"]
        assert set(docs) == {str(first["assetId"]), str(second["assetId"])}
        assert docs[str(first["assetId"])]["imohash"] == first["imohash"]
