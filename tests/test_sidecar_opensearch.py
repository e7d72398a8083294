"""The OpenSearch mirror against a real SQLite store and a fake node speaking HTTP
(tests/fake_opensearch.py); one test runs against a real cluster when OPENSEARCH_URL is set."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
from fake_opensearch import FakeOpenSearch

from immich_trt.sidecar.assets import AssetResults, FaceResult, OcrLine
from immich_trt.sidecar.opensearch import (
    BACKOFF_MAX_S,
    CLIP_DIMENSIONS,
    Mirror,
    backoff_s,
    drain_once,
    index_name,
    index_templates,
    reindex_command,
)
from immich_trt.sidecar.service import Sidecar
from immich_trt.sidecar.store import Store
from immich_trt.tools.testing import offline_settings

PREFIX = "immich-trt"
ASSETS, FACES, PERSONS, OCR = (index_name(PREFIX, e) for e in ("asset", "face", "person", "ocr_line"))


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def results(seed: int, *, faces: int = 2, lines: int = 2, clip_dim: int = 512, ref: str | None = None) -> AssetResults:
    """One image's results with random (not normalised) embeddings, as models return them."""
    rng = np.random.default_rng(seed)
    return AssetResults(
        imohash=f"{seed:032x}",
        size=1000 + seed,
        width=640,
        height=480,
        ref=ref or f"asset-{seed}",
        filename=f"IMG_{seed}.jpg",
        clip=(
            "ViT-B-32__openai" if clip_dim == 512 else "ViT-L-14__openai",
            rng.normal(size=clip_dim).astype(np.float32) * 3,
        ),
        faces=(
            "buffalo_l",
            [
                FaceResult(
                    box=(10.0 * i, 20.0, 10.0 * i + 50, 90.0),
                    score=0.9,
                    embedding=rng.normal(size=512).astype(np.float32) * 7,
                    landmarks=rng.uniform(0, 100, size=(5, 2)).astype(np.float32),
                )
                for i in range(faces)
            ],
        ),
        ocr=(
            "PP-OCRv5_mobile",
            [
                OcrLine([0.1, 0.1, 0.5, 0.1, 0.5, 0.2, 0.1, 0.2], f"Line {i} of image {seed}", 0.95, 0.9)
                for i in range(lines)
            ],
        ),
    )


def outbox(store: Store) -> list[dict]:
    return [dict(r) for r in store.conn.execute("SELECT * FROM outbox ORDER BY id")]


def row_ids(store: Store) -> dict[str, set[str]]:
    tables = {ASSETS: "assets", FACES: "faces", PERSONS: "persons", OCR: "ocr_lines"}
    return {index: {str(i) for (i,) in store.conn.execute(f"SELECT id FROM {t}")} for index, t in tables.items()}


def add_person(store: Store, name: str, face_id: int) -> int:
    now = time.time()
    with store.transaction() as conn:
        person = conn.execute(
            "INSERT INTO persons (name, name_source, representative_face, created_at, updated_at) "
            "VALUES (?, 'user', ?, ?, ?)",
            (name, face_id, now, now),
        ).lastrowid
        conn.execute("UPDATE faces SET person = ?, assigned = 'manual' WHERE id = ?", (person, face_id))
        store.touch("person", person)
        store.touch("face", face_id)
    return person


def delete_person(store: Store, person: int) -> None:
    with store.transaction() as conn:
        faces = [i for (i,) in conn.execute("SELECT id FROM faces WHERE person = ?", (person,))]
        conn.execute("DELETE FROM persons WHERE id = ?", (person,))
        store.touch("person", person)
        store.touch("face", *faces)


@pytest.fixture
def fake():
    with FakeOpenSearch() as server:
        yield server


@pytest.fixture
async def sidecar(tmp_path, fake):
    sidecar = Sidecar(offline_settings(tmp_path, opensearch_url=fake.url))
    await sidecar.start()
    yield sidecar
    await sidecar.stop()


@pytest.fixture
async def mirror(sidecar):
    mirror = Mirror(sidecar, sidecar.settings, interval_s=3600)
    yield mirror
    await mirror.stop()


def later() -> float:
    """A clock past every backoff: all notices are due."""
    return time.time() + 2 * BACKOFF_MAX_S


# ---- templates ----


async def test_templates_are_put_with_valid_bodies(mirror, fake):
    await mirror.ensure_templates()
    assert set(fake.templates) == {ASSETS, FACES, PERSONS, OCR}
    assets = fake.templates[ASSETS]
    assert assets["index_patterns"] == [ASSETS]
    assert assets["template"]["settings"]["index"]["knn"] is True
    properties = assets["template"]["mappings"]["properties"]
    assert properties["imohash"] == {"type": "keyword"} and properties["hidden"] == {"type": "boolean"}
    clip = properties["clip_512"]
    assert clip["type"] == "knn_vector" and clip["dimension"] == 512
    assert clip["method"]["name"] == "hnsw" and clip["method"]["space_type"] == "cosinesimil"
    assert clip["method"]["engine"] in ("lucene", "faiss")
    assert {f"clip_{d}" for d in CLIP_DIMENSIONS} <= set(properties)
    face_vector = fake.templates[FACES]["template"]["mappings"]["properties"]["embedding"]
    assert face_vector["dimension"] == 512 and face_vector["method"]["space_type"] == "cosinesimil"
    name = fake.templates[PERSONS]["template"]["mappings"]["properties"]["name"]
    assert name["type"] == "text" and name["fields"]["keyword"]["type"] == "keyword"
    ocr = fake.templates[OCR]["template"]
    assert ocr["mappings"]["properties"]["text"]["analyzer"] == "trigram"
    assert ocr["settings"]["analysis"]["tokenizer"]["trigram"] == {"type": "ngram", "min_gram": 3, "max_gram": 3}
    assert ocr["settings"]["analysis"]["analyzer"]["trigram"]["filter"] == ["lowercase"]
    assert mirror.status()["lastSuccess"] is not None


def test_templates_follow_the_prefix():
    templates = index_templates("photos")
    assert set(templates) == {"photos-assets", "photos-faces", "photos-persons", "photos-ocr-lines"}
    assert all(body["index_patterns"] == [name] for name, body in templates.items())


# ---- drain ----


async def test_drain_sends_documents_and_empties_outbox(mirror, sidecar, fake):
    sent = results(1)
    saved = await sidecar.save(sent)
    result = await mirror.drain()
    assert result["sent"] == 1 + 2 + 2 and result["failed"] == 0 and result["backlog"] == 0
    assert await sidecar.call(outbox) == []
    assert fake.bulk_content_types == ["application/x-ndjson"]
    asset = fake.docs[ASSETS][str(saved.asset_id)]
    assert asset["imohash"] == sent.imohash and asset["refs"] == ["asset-1"] and asset["filenames"] == ["IMG_1.jpg"]
    assert (asset["width"], asset["height"], asset["size"], asset["hidden"]) == (640, 480, 1001, False)
    assert asset["clipModel"] == "ViT-B-32__openai" and asset["duplicateGroups"] == []
    np.testing.assert_allclose(asset["clip_512"], unit(sent.clip[1]), atol=1e-6)
    assert set(fake.docs[FACES]) == {str(i) for i in saved.face_ids}
    for face_id, face in zip(saved.face_ids, sent.faces[1]):
        doc = fake.docs[FACES][str(face_id)]
        assert doc["asset"] == saved.asset_id and doc["model"] == "buffalo_l" and doc["person"] is None
        assert doc["box"] == dict(zip(("x1", "y1", "x2", "y2"), face.box))
        np.testing.assert_allclose(doc["embedding"], unit(face.embedding), atol=1e-6)
        np.testing.assert_allclose(doc["landmarks"], face.landmarks.ravel(), atol=1e-5)
    lines = sorted(fake.docs[OCR].values(), key=lambda d: d["line"])
    assert [d["text"] for d in lines] == ["Line 0 of image 1", "Line 1 of image 1"]
    assert lines[0]["polygon"] == pytest.approx(sent.ocr[1][0].polygon)
    assert lines[0]["asset"] == saved.asset_id and lines[0]["boxScore"] == pytest.approx(0.95)
    status = mirror.status()
    assert status["backlog"] == 0 and status["lastError"] is None and status["lastSuccess"] > time.time() - 60


async def test_second_save_of_the_same_bytes_sends_nothing(mirror, sidecar, fake):
    await sidecar.save(results(2))
    await mirror.drain()
    requests = len(fake.bulk_requests)
    await sidecar.save(results(2))
    result = await mirror.drain()
    assert (result["sent"], result["deleted"], result["failed"]) == (0, 0, 0)
    assert len(fake.bulk_requests) == requests


async def test_other_clip_dimension_uses_its_own_field(mirror, sidecar, fake):
    sent = results(3, clip_dim=768)
    sent.faces[1][0].embedding = np.zeros(512, np.float32)  # no direction: left out, not sent as NaN
    saved = await sidecar.save(sent)
    result = await mirror.drain()
    assert result["failed"] == 0
    asset = fake.docs[ASSETS][str(saved.asset_id)]
    assert "clip_512" not in asset and len(asset["clip_768"]) == 768
    assert asset["clipModel"] == "ViT-L-14__openai"
    assert "embedding" not in fake.docs[FACES][str(saved.face_ids[0])]
    assert len(fake.docs[FACES][str(saved.face_ids[1])]["embedding"]) == 512


@pytest.mark.parametrize("outage", ["down", "503"])
async def test_outage_keeps_the_backlog_then_drains_each_document_once(outage, mirror, sidecar, fake):
    await mirror.ensure_templates()
    for seed in (10, 11, 12):
        await sidecar.save(results(seed))
    if outage == "down":
        fake.down()
    else:
        fake.fail_next(1, status=503)
    before = time.time()
    result = await mirror.drain()  # must not raise
    assert result["sent"] == 0 and result["failed"] == 3 * 5 and result["backlog"] == 15
    rows = await sidecar.call(outbox)
    assert len(rows) == 15
    assert all(r["attempts"] == 1 and before < r["next_attempt"] <= time.time() + 1.2 for r in rows)
    assert all(r["last_error"] for r in rows)
    assert ("503" in rows[0]["last_error"]) if outage == "503" else ("Connection" in rows[0]["last_error"])
    status = mirror.status()
    assert status["backlog"] == 15 and status["lastError"] == rows[0]["last_error"]
    # not due yet: a drain now sends nothing
    fake.up()
    requests = len(fake.bulk_requests)
    assert (await drain_once(sidecar.call, mirror.client, PREFIX))["failed"] == 0
    assert len(fake.bulk_requests) == requests
    result = await drain_once(sidecar.call, mirror.client, PREFIX, now=later())
    assert result["sent"] == 15 and result["backlog"] == 0
    ids = await sidecar.call(row_ids)
    for index in (ASSETS, FACES, OCR):
        assert set(fake.docs[index]) == ids[index]
        sent = [doc_id for action, i, doc_id in fake.operations() if i == index and action == "index"]
        assert sorted(sent) == sorted(ids[index])  # each exactly once


async def test_item_failures_retry_only_those_items(mirror, sidecar, fake):
    saved = await sidecar.save(results(20))
    failing = str(saved.face_ids[1])
    fake.fail_ids({(FACES, failing)})
    result = await mirror.drain()
    assert result["sent"] == 4 and result["failed"] == 1
    rows = await sidecar.call(outbox)
    assert [(r["entity"], r["entity_id"], r["attempts"]) for r in rows] == [("face", saved.face_ids[1], 1)]
    assert rows[0]["last_error"].startswith("429 rejected_execution_exception")
    assert mirror.status()["lastError"] == rows[0]["last_error"]
    fake.fail_ids(())
    requests = len(fake.bulk_requests)
    result = await drain_once(sidecar.call, mirror.client, PREFIX, now=later())
    assert result["sent"] == 1 and result["backlog"] == 0
    assert fake.bulk_requests[requests:] == [[("index", FACES, failing)]]
    assert failing in fake.docs[FACES]


async def test_notice_raised_during_a_drain_survives(mirror, sidecar, fake):
    saved = await sidecar.save(results(30))
    await mirror.ensure_templates()
    path = sidecar.store.path
    calls = []

    def touch_asset_meanwhile(ops):  # runs between the drain's read and its acknowledgement
        if not calls:
            other = Store(path)
            with other.transaction() as conn:
                conn.execute("UPDATE assets SET hidden = 1 WHERE id = ?", (saved.asset_id,))
                other.touch("asset", saved.asset_id)
            other.close()
        calls.append(ops)

    fake.before_bulk = touch_asset_meanwhile
    result = await drain_once(sidecar.call, mirror.client, PREFIX)
    assert result["sent"] == 5 and result["backlog"] == 1
    rows = await sidecar.call(outbox)
    assert [(r["entity"], r["entity_id"], r["version"]) for r in rows] == [("asset", saved.asset_id, 2)]
    assert fake.docs[ASSETS][str(saved.asset_id)]["hidden"] is False  # the old state went out
    result = await drain_once(sidecar.call, mirror.client, PREFIX)
    assert result["sent"] == 1 and result["backlog"] == 0
    assert fake.docs[ASSETS][str(saved.asset_id)]["hidden"] is True
    assert calls[1] == [("index", ASSETS, str(saved.asset_id))]


async def test_deleting_a_person_sends_a_delete(mirror, sidecar, fake):
    saved = await sidecar.save(results(40))
    person = await sidecar.call(add_person, "Ada", saved.face_ids[0])
    await mirror.drain()
    assert fake.docs[PERSONS][str(person)] == {
        "name": "Ada",
        "nameSource": "user",
        "faceCount": 1,
        "representativeFace": saved.face_ids[0],
        "createdAt": fake.docs[PERSONS][str(person)]["createdAt"],
        "updatedAt": fake.docs[PERSONS][str(person)]["updatedAt"],
    }
    assert fake.docs[FACES][str(saved.face_ids[0])]["person"] == person
    await sidecar.call(delete_person, person)
    result = await mirror.drain()
    assert result["deleted"] == 1 and result["sent"] == 1 and result["backlog"] == 0
    assert ("delete", PERSONS, str(person)) in fake.bulk_requests[-1]
    assert str(person) not in fake.docs[PERSONS]
    assert fake.docs[FACES][str(saved.face_ids[0])]["person"] is None
    # a row created and deleted before any drain: OpenSearch answers 404, which counts as done
    ghost = await sidecar.call(add_person, "Ghost", saved.face_ids[1])
    await sidecar.call(delete_person, ghost)
    result = await mirror.drain()
    assert result["deleted"] == 1 and result["backlog"] == 0


async def test_reindex_rebuilds_a_wiped_node(mirror, sidecar, fake):
    for seed in (50, 51):
        await sidecar.save(results(seed))
    await sidecar.call(add_person, "Grace", 1)
    await mirror.drain()
    fake.wipe()
    result = await mirror.reindex()
    assert result["touched"] == {"asset": 2, "face": 4, "person": 1, "ocr_line": 4}
    assert result["backlog"] == 0 and result["failed"] == 0
    assert set(fake.templates) == {ASSETS, FACES, PERSONS, OCR}
    ids = await sidecar.call(row_ids)
    assert {index: set(fake.docs[index]) for index in ids} == ids
    # recreate: indices dropped first, so documents the store lacks disappear
    fake.docs[ASSETS]["999"] = {"imohash": "orphan"}
    await mirror.reindex(recreate=True)
    assert {index: set(fake.docs[index]) for index in ids} == ids


async def test_start_does_not_block_while_opensearch_is_down(sidecar, fake):
    fake.down()
    await sidecar.save(results(60))
    mirror = Mirror(sidecar, sidecar.settings, interval_s=3600)
    started = time.monotonic()
    await mirror.start()
    assert time.monotonic() - started < 0.5
    try:
        deadline = time.monotonic() + 10
        while mirror.status()["lastError"] is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        status = mirror.status()
        assert status["lastError"] and status["backlog"] == 5 and status["lastSuccess"] is None
        assert fake.templates == {}
        fake.up()
        mirror.notify()
        deadline = time.monotonic() + 10
        while mirror.status()["backlog"] != 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert mirror.status()["backlog"] == 0 and mirror.status()["lastError"] is None
        assert len(fake.templates) == 4 and fake.count(FACES) == 2
    finally:
        await mirror.stop()


async def test_reindex_command_exit_codes(tmp_path, fake, capsys):
    settings = offline_settings(tmp_path, opensearch_url=fake.url)
    sidecar = Sidecar(settings)
    await sidecar.start()
    await sidecar.save(results(70))
    await sidecar.stop()
    assert await reindex_command(settings) == 0
    assert "sent 5" in capsys.readouterr().out and fake.count(ASSETS) == 1
    fake.down()
    assert await reindex_command(settings) == 1
    assert await reindex_command(dataclasses.replace(settings, opensearch_url=None)) == 1


def test_backoff_doubles_from_one_second_and_is_capped():
    for attempts, base in [(1, 1), (2, 2), (3, 4), (6, 32)]:
        delays = [backoff_s(attempts) for _ in range(50)]
        assert all(0.8 * base <= d <= 1.2 * base for d in delays)
        assert len(set(delays)) > 1  # jittered
    assert all(backoff_s(a) <= BACKOFF_MAX_S for a in (9, 10, 100, 10_000))
    capped = [backoff_s(20) for _ in range(50)]
    assert all(0.8 * BACKOFF_MAX_S <= d <= BACKOFF_MAX_S for d in capped) and max(capped) == BACKOFF_MAX_S


# ---- the fake behaves like OpenSearch where the mirror relies on it ----


def _request(url: str, method: str, body: bytes, content_type: str = "application/x-ndjson") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_fake_rejects_malformed_requests(fake):
    bulk = f"{fake.url}/_bulk"
    assert _request(bulk, "POST", b'{"index": {"_index": "x", "_id": "1"}}\n{"a": 1}')[0] == 400  # no final newline
    assert _request(bulk, "POST", b'{"index": {"_index": "x", "_id": "1"}}\n')[0] == 400  # no source line
    assert _request(bulk, "POST", b'{"upsert": {"_index": "x"}}\n{}\n')[0] == 400
    assert _request(bulk, "POST", b"not json\n")[0] == 400
    assert _request(bulk, "POST", b'{"delete": {"_index": "x"}}\n')[0] == 400  # id missing
    assert _request(bulk, "POST", b'{"delete": {"_index": "x", "_id": "1"}}\n', "text/plain")[0] == 406
    mixed = b'{"index": {"_index": "x", "_id": "1"}}\n{"a": 1}\n{"delete": {"_index": "x", "_id": "2"}}\n'
    status, body = _request(bulk, "POST", mixed)
    assert status == 200 and body["errors"] is False
    assert [next(iter(i)) for i in body["items"]] == ["index", "delete"]
    assert (body["items"][0]["index"]["status"], body["items"][1]["delete"]["status"]) == (201, 404)
    template = f"{fake.url}/_index_template/t"
    vector = {"type": "knn_vector", "dimension": 4, "method": {"name": "hnsw"}}
    body_of = {"settings": {"index": {"knn": True}}, "mappings": {"properties": {"v": vector}}}
    good = {"index_patterns": ["v"], "template": body_of}
    assert _request(template, "PUT", json.dumps(good).encode(), "application/json") == (200, {"acknowledged": True})
    without_method = {"v": {"type": "knn_vector", "dimension": 4}}
    no_method = {**good, "template": {**body_of, "mappings": {"properties": without_method}}}
    assert _request(template, "PUT", json.dumps(no_method).encode(), "application/json")[0] == 400
    assert _request(template, "PUT", json.dumps({"template": good["template"]}).encode(), "application/json")[0] == 400
    status, body = _request(bulk, "POST", b'{"index": {"_index": "v", "_id": "1"}}\n{"v": [1, 2, 3]}\n')
    assert body["errors"] is True and body["items"][0]["index"]["status"] == 400  # dimension mismatch


# ---- a real cluster ----


@pytest.mark.skipif(
    not os.environ.get("OPENSEARCH_URL"), reason="OPENSEARCH_URL is not set: no real OpenSearch cluster to test against"
)
async def test_real_cluster_templates_drain_and_count(tmp_path):
    prefix = f"immich-trt-test-{uuid.uuid4().hex[:8]}"
    settings = offline_settings(tmp_path, opensearch_url=os.environ["OPENSEARCH_URL"], opensearch_prefix=prefix)
    sidecar = Sidecar(settings)
    await sidecar.start()
    mirror = Mirror(sidecar, settings, interval_s=3600)
    try:
        for seed in (80, 81, 82):
            await sidecar.save(results(seed))
        await sidecar.call(add_person, "Lin", 1)
        await sidecar.save(results(83, clip_dim=768))
        result = await mirror.drain()
        assert result["failed"] == 0 and result["backlog"] == 0, result
        ids = await sidecar.call(row_ids)
        for entity in ("asset", "face", "person", "ocr_line"):
            index = index_name(prefix, entity)
            mirror.client.indices.refresh(index=index)
            expected = len(ids[index_name(PREFIX, entity)])
            assert mirror.client.count(index=index)["count"] == expected, index
        hits = mirror.client.search(
            index=index_name(prefix, "ocr_line"), body={"query": {"match": {"text": "image 81"}}}
        )["hits"]["hits"]
        assert hits and "image 81" in hits[0]["_source"]["text"]
    finally:
        for entity in ("asset", "face", "person", "ocr_line"):
            mirror.client.indices.delete(index=index_name(prefix, entity), params={"ignore": 404})
            mirror.client.indices.delete_index_template(name=index_name(prefix, entity), params={"ignore": 404})
        await mirror.stop()
        await sidecar.stop()


def test_messages_never_show_the_opensearch_password() -> None:
    from immich_trt.sidecar.opensearch import redact_url

    assert redact_url("https://admin:s3cret@search.lan:9200") == "https://admin:***@search.lan:9200"
    assert redact_url("http://search.lan:9200") == "http://search.lan:9200"


async def test_no_backlog_without_opensearch_and_reindex_covers_the_past(tmp_path, fake, caplog):
    """Without OPENSEARCH_URL no change notice is kept; a backlog left by a run with a
    mirror is dropped (one warning saying to reindex); a later reindex mirrors it all."""
    with_mirror = offline_settings(tmp_path, opensearch_url=fake.url)
    sidecar = Sidecar(with_mirror)
    await sidecar.start()
    await sidecar.save(results(80))  # queued for a mirror that never drained it
    assert len(outbox(sidecar.store)) == 5
    await sidecar.stop()

    without = dataclasses.replace(with_mirror, opensearch_url=None)
    sidecar = Sidecar(without)
    await sidecar.start()
    assert outbox(sidecar.store) == []
    [warning] = [r.getMessage() for r in caplog.records if "OpenSearch change notice" in r.getMessage()]
    assert warning.startswith("Dropped 5 pending OpenSearch change notice(s)") and "opensearch reindex" in warning
    await sidecar.save(results(81))
    person = add_person(sidecar.store, "Ada", 1)
    delete_person(sidecar.store, person)
    assert outbox(sidecar.store) == [] and sidecar.store.counts()["outbox"] == 0
    await sidecar.stop()

    caplog.clear()
    sidecar = Sidecar(without)  # nothing to drop the next time: no second warning
    await sidecar.start()
    await sidecar.stop()
    assert "OpenSearch change notice" not in caplog.text

    assert await reindex_command(with_mirror) == 0  # the mirror configured later catches up
    assert fake.count(ASSETS) == 2 and fake.count(FACES) == 4 and fake.count(OCR) == 4
