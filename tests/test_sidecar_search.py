"""Sidecar search: similar faces, CLIP ranking, OCR substring search, hybrid ranking.

Real SQLite stores in tmp_path, results written with ``save_results`` (or through the
running ``Sidecar``), real numpy embeddings with known cosine similarities."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from immich_trt.sidecar.assets import AssetResults, FaceResult, OcrLine, save_results
from immich_trt.sidecar.errors import BadRequest, NotFound
from immich_trt.sidecar.search import (
    group_by_person,
    search_clip,
    search_face_by_id,
    search_faces,
    search_hybrid,
    search_ocr,
)
from immich_trt.sidecar.service import Sidecar
from immich_trt.sidecar.store import Store
from immich_trt.sidecar.vectors import VectorIndex
from immich_trt.tools.testing import offline_settings

DIM = 512
CLIP = "ViT-B-32__openai"
FACE = "buffalo_l"
OCR = "PP-OCRv5_mobile"
POLYGON = [0.1, 0.2, 0.5, 0.2, 0.5, 0.3, 0.1, 0.3]


def unit(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i] = 1.0
    return v


def at_cosine(c: float, axis: int, base: int = 0) -> np.ndarray:
    """A unit vector with cosine ``c`` to ``unit(base)``, tilted towards ``unit(axis)``."""
    return (c * unit(base) + math.sqrt(max(0.0, 1 - c * c)) * unit(axis)).astype(np.float32)


def results(n: int, **kwargs) -> AssetResults:
    kwargs.setdefault("ref", f"asset-{n}")
    return AssetResults(imohash=f"{n:032x}", size=1000 + n, width=640, height=480, **kwargs)


def ocr(*texts: str) -> tuple[str, list[OcrLine]]:
    return OCR, [OcrLine(POLYGON, t, 0.9, 0.8) for t in texts]


def hide(store: Store, asset_id: int) -> None:
    store.conn.execute("UPDATE assets SET hidden = 1 WHERE id = ?", (asset_id,))


def add_clip(store: Store, index: VectorIndex, n: int, vector: np.ndarray, **kwargs) -> int:
    saved = save_results(store, results(n, clip=(CLIP, vector), **kwargs))
    index.add([saved.asset_id], vector[None])
    return saved.asset_id


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path)
    yield s
    s.close()


# ---------------------------------------------------------------- faces


@pytest.fixture
async def faces(tmp_path: Path):
    """A running sidecar with five faces on three assets; person "Ana" (faces 1 and 3),
    an unnamed person (face 4), no person (face 2); asset 3 (face 5) hidden."""
    sidecar = Sidecar(offline_settings(tmp_path))
    await sidecar.start()
    vectors = {
        1: unit(0),
        2: unit(1),
        3: at_cosine(0.99, 2),
        4: at_cosine(0.6, 3),
        5: unit(0),
    }
    boxes = {i: (10.0 * i, 20.0, 10.0 * i + 50, 90.0) for i in vectors}
    layout = {1: [1, 2], 2: [3, 4], 3: [5]}
    ids = {}
    for asset, face_numbers in layout.items():
        saved = await sidecar.save(
            results(asset, faces=(FACE, [FaceResult(boxes[f], 0.9, vectors[f] * 3.0) for f in face_numbers]))
        )
        ids.update(zip(face_numbers, saved.face_ids))
        ids[f"asset{asset}"] = saved.asset_id

    def people(store: Store) -> None:
        ana = store.conn.execute("INSERT INTO persons (name, created_at, updated_at) VALUES ('Ana', 0, 0)").lastrowid
        anon = store.conn.execute("INSERT INTO persons (name, created_at, updated_at) VALUES (NULL, 0, 0)").lastrowid
        for face, person in ((1, ana), (3, ana), (4, anon)):
            store.conn.execute("UPDATE faces SET person = ?, assigned = 'manual' WHERE id = ?", (person, ids[face]))
        hide(store, ids["asset3"])
        ids.update(ana=ana, anon=anon)

    await sidecar.call(people)
    yield sidecar, ids, boxes
    await sidecar.stop()


async def test_search_faces_ranks_by_cosine_with_persons_and_boxes(faces) -> None:
    sidecar, ids, boxes = faces
    hits = await sidecar.call(search_faces, sidecar.faces, unit(0), FACE)
    assert [h["faceId"] for h in hits] == [ids[1], ids[3], ids[4], ids[2]]  # hidden face 5 left out
    assert [h["similarity"] for h in hits] == pytest.approx([1.0, 0.99, 0.6, 0.0], abs=1e-6)
    first = hits[0]
    assert first["assetId"] == ids["asset1"] and first["asset"]["refs"] == ["asset-1"]
    assert first["personId"] == ids["ana"] and first["personName"] == "Ana"
    assert first["box"] == dict(zip(("x1", "y1", "x2", "y2"), boxes[1]))
    assert hits[2]["personId"] == ids["anon"] and hits[2]["personName"] is None
    assert hits[3]["personId"] is None

    limited = await sidecar.call(search_faces, sidecar.faces, unit(0), FACE, 2, 0.7)
    assert [h["faceId"] for h in limited] == [ids[1], ids[3]]
    excluded = await sidecar.call(search_faces, sidecar.faces, unit(0), FACE, 2, 0.0, {ids[1]})
    assert [h["faceId"] for h in excluded] == [ids[3], ids[4]]
    one = await sidecar.call(search_faces, sidecar.faces, unit(0), FACE, 1, 0.0, {ids[2]})
    assert [h["faceId"] for h in one] == [ids[1]]
    with_hidden = await sidecar.call(search_faces, sidecar.faces, unit(0), FACE, 2, 0.0, None, True)
    assert {h["faceId"] for h in with_hidden} == {ids[1], ids[5]}
    assert await sidecar.call(search_faces, sidecar.faces, unit(0), "antelopev2") == []


async def test_group_by_person_takes_the_best_similarity_per_person(faces) -> None:
    sidecar, ids, _ = faces
    hits = await sidecar.call(search_faces, sidecar.faces, at_cosine(0.5, 3), FACE)
    persons = group_by_person(hits)
    by_id = {p["personId"]: p for p in persons}
    assert set(by_id) == {ids["ana"], ids["anon"]}
    assert by_id[ids["ana"]]["faces"] == 2 and by_id[ids["anon"]]["faces"] == 1
    best_ana = max(h["similarity"] for h in hits if h["personId"] == ids["ana"])
    assert by_id[ids["ana"]]["similarity"] == best_ana
    assert [p["similarity"] for p in persons] == sorted((p["similarity"] for p in persons), reverse=True)
    # cos to face 4 = 0.5*0.6 + 0.866*0.8 = 0.99 beats Ana's best (0.5)
    assert persons[0]["personId"] == ids["anon"] and persons[0]["personName"] is None


async def test_search_face_by_id_leaves_out_the_query_face(faces) -> None:
    sidecar, ids, boxes = faces
    answer = await sidecar.call(search_face_by_id, sidecar.faces, ids[3])
    assert answer["face"]["faceId"] == ids[3] and "similarity" not in answer["face"]
    assert answer["face"]["box"]["x1"] == boxes[3][0]
    result_ids = [h["faceId"] for h in answer["results"]]
    assert ids[3] not in result_ids and result_ids[0] == ids[1]
    assert answer["results"][0]["similarity"] == pytest.approx(0.99, abs=1e-6)
    assert answer["persons"][0] == {"personId": ids["ana"], "personName": "Ana",
                                    "similarity": answer["results"][0]["similarity"], "faces": 1}
    with pytest.raises(NotFound):
        await sidecar.call(search_face_by_id, sidecar.faces, 999_999)


async def test_vector_search_rejects_bad_k_thresholds_and_dimensions(faces) -> None:
    sidecar, _, _ = faces
    for k, threshold in ((0, 0.0), (1001, 0.0), (True, 0.0), (5, 1.5), (5, -1.01), (5, float("nan")), (5, "x")):
        with pytest.raises(BadRequest):
            await sidecar.call(search_faces, sidecar.faces, unit(0), FACE, k, threshold)
        with pytest.raises(BadRequest):
            await sidecar.call(search_clip, sidecar.clip, unit(0), CLIP, k, threshold)
    with pytest.raises(BadRequest, match="dimensions"):
        await sidecar.call(search_faces, sidecar.faces, np.ones(128, np.float32), FACE)


# ---------------------------------------------------------------- CLIP


async def test_search_clip_ranks_assets_through_the_sidecar(tmp_path: Path) -> None:
    sidecar = Sidecar(offline_settings(tmp_path))
    await sidecar.start()
    try:
        ids = []
        for n, c in enumerate((0.2, 0.9, 0.5, 0.95)):
            saved = await sidecar.save(results(n, clip=(CLIP, at_cosine(c, n + 1) * 7.0)))
            ids.append(saved.asset_id)
        await sidecar.call(hide, ids[3])
        hits = await sidecar.call(search_clip, sidecar.clip, unit(0), CLIP)
        assert [h["assetId"] for h in hits] == [ids[1], ids[2], ids[0]]
        assert [h["similarity"] for h in hits] == pytest.approx([0.9, 0.5, 0.2], abs=1e-6)
        assert hits[0]["asset"]["refs"] == ["asset-1"] and hits[0]["asset"]["hidden"] is False
        shown = await sidecar.call(search_clip, sidecar.clip, unit(0), CLIP, 2, 0.0, True)
        assert [h["assetId"] for h in shown] == [ids[3], ids[1]] and shown[0]["asset"]["hidden"] is True
        assert [h["assetId"] for h in await sidecar.call(search_clip, sidecar.clip, unit(0), CLIP, 5, 0.4)] == [
            ids[1], ids[2]]
        assert await sidecar.call(search_clip, sidecar.clip, unit(0), "ViT-L-14__openai") == []
    finally:
        await sidecar.stop()


# ---------------------------------------------------------------- OCR


@pytest.fixture
def texts(store: Store) -> dict[str, int]:
    lines = {
        "greeting": ("Hello World", "hello again", "韩国小馆"),
        "shout": ("HELLO there",),
        "special": ("100%_off today", 'say "hi" now', "it's a*b NEAR(x) OR y", "back\\slash"),
        "plain": ("1000 off",),
        "hidden": ("Hello hidden",),
    }
    ids = {name: save_results(store, results(n, ocr=ocr(*t))).asset_id for n, (name, t) in enumerate(lines.items())}
    hide(store, ids["hidden"])
    return ids


def hits(store: Store, query: str, **kwargs) -> list[tuple[int, list[tuple[str, list[int]]]]]:
    answer = search_ocr(store, query, **kwargs)
    assert answer["total"] >= len(answer["items"])
    return [(item["assetId"], [(line["text"], line["match"]) for line in item["lines"]]) for item in answer["items"]]


def test_search_ocr_finds_substrings_case_insensitively(store: Store, texts: dict[str, int]) -> None:
    assert hits(store, "hello") == [
        (texts["greeting"], [("Hello World", [0, 5]), ("hello again", [0, 5])]),
        (texts["shout"], [("HELLO there", [0, 5])]),
    ]
    assert hits(store, "  LLO w ") == [(texts["greeting"], [("Hello World", [2, 7])])]
    assert hits(store, "国小馆") == [(texts["greeting"], [("韩国小馆", [1, 4])])]
    assert search_ocr(store, "hello", include_hidden=True)["total"] == 3
    assert search_ocr(store, "goodbye") == {"total": 0, "items": []}

    item = search_ocr(store, "world")["items"][0]
    assert item["asset"]["id"] == texts["greeting"] and item["asset"]["refs"] == ["asset-0"]
    line = item["lines"][0]
    assert line["polygon"] == pytest.approx(POLYGON)
    assert (line["boxScore"], line["textScore"]) == pytest.approx((0.9, 0.8))
    assert isinstance(line["id"], int)


def test_search_ocr_short_queries_fall_back_to_like(store: Store, texts: dict[str, int]) -> None:
    assert hits(store, "国小") == [(texts["greeting"], [("韩国小馆", [1, 3])])]
    assert hits(store, "Wo") == [(texts["greeting"], [("Hello World", [6, 8])])]
    assert hits(store, "馆") == [(texts["greeting"], [("韩国小馆", [3, 4])])]
    assert [a for a, _ in hits(store, "he")] == [texts["greeting"], texts["shout"]]


@pytest.mark.parametrize(
    "query, text, match",
    [
        ('"', 'say "hi" now', [4, 5]),
        ('"hi"', 'say "hi" now', [4, 8]),
        ("*", "it's a*b NEAR(x) OR y", [6, 7]),
        ("a*b", "it's a*b NEAR(x) OR y", [5, 8]),
        ("NEAR(", "it's a*b NEAR(x) OR y", [9, 14]),
        (") OR", "it's a*b NEAR(x) OR y", [15, 19]),
        ("'", "it's a*b NEAR(x) OR y", [2, 3]),
        ("it's", "it's a*b NEAR(x) OR y", [0, 4]),
        ("%", "100%_off today", [3, 4]),
        ("_", "100%_off today", [4, 5]),
        ("%_", "100%_off today", [3, 5]),
        ("0%_off", "100%_off today", [2, 8]),
        ("\\", "back\\slash", [4, 5]),
        ("k\\s", "back\\slash", [3, 6]),
    ],
)
def test_search_ocr_matches_special_characters_literally(
    store: Store, texts: dict[str, int], query: str, text: str, match: list[int]
) -> None:
    assert hits(store, query) == [(texts["special"], [(text, match)])]


@pytest.mark.parametrize("query", ['x"y', "%%%", "__", "*a", "NEAR(a b)", "AND", "-", "^Hello", "''"])
def test_search_ocr_operator_like_queries_never_raise(store: Store, texts: dict[str, int], query: str) -> None:
    assert search_ocr(store, query) == {"total": 0, "items": []}


def test_search_ocr_orders_by_matching_lines_and_pages(store: Store) -> None:
    counts = [2, 5, 1, 5, 3]
    ids = [
        save_results(store, results(n, ocr=ocr(*[f"page line {j}" for j in range(c)], "other"))).asset_id
        for n, c in enumerate(counts)
    ]
    expected = [ids[1], ids[3], ids[4], ids[0], ids[2]]  # by count desc, then id
    pages = [search_ocr(store, "page line", limit=2, offset=offset) for offset in (0, 2, 4, 6)]
    assert [p["total"] for p in pages] == [5, 5, 5, 5]
    assert [[i["assetId"] for i in p["items"]] for p in pages] == [expected[:2], expected[2:4], expected[4:], []]
    assert [len(i["lines"]) for i in pages[0]["items"]] == [5, 5]
    assert [line["text"] for line in pages[1]["items"][0]["lines"]] == ["page line 0", "page line 1", "page line 2"]


@pytest.mark.parametrize(
    "query, limit, offset",
    [("", 20, 0), ("   \t", 20, 0), ("x" * 257, 20, 0), (None, 20, 0), ("ok", 0, 0), ("ok", 1001, 0), ("ok", 20, -1)],
)
def test_search_ocr_rejects_bad_queries_and_pages(store: Store, query, limit: int, offset: int) -> None:
    with pytest.raises(BadRequest):
        search_ocr(store, query, limit, offset)


def test_search_ocr_accepts_a_query_of_256_characters(store: Store) -> None:
    text = "a" * 300
    asset = save_results(store, results(1, ocr=ocr(text))).asset_id
    assert hits(store, "a" * 256) == [(asset, [(text, [0, 256])])]


# ---------------------------------------------------------------- hybrid


@pytest.fixture
def hybrid(store: Store):
    """OCR texts and CLIP cosines (to unit(0)): both = "Sale 50%" / 0.9, clip = 0.95
    (no text), text = "SALE today" / 0.1, textonly = "for sale" / no CLIP, weak = 0.5;
    12 distractors at 0.3; hidden = "sale" / 0.99."""
    index = VectorIndex()
    ids = {
        "both": add_clip(store, index, 1, at_cosine(0.9, 1), ocr=ocr("Sale 50%", "other")),
        "clip": add_clip(store, index, 2, at_cosine(0.95, 2), ocr=ocr("nothing here")),
        "text": add_clip(store, index, 3, at_cosine(0.1, 3), ocr=ocr("SALE today")),
        "textonly": save_results(store, results(4, ocr=ocr("for sale"))).asset_id,
        "weak": add_clip(store, index, 5, at_cosine(0.5, 5)),
        "hidden": add_clip(store, index, 6, at_cosine(0.99, 6), ocr=ocr("sale")),
    }
    for n in range(12):
        add_clip(store, index, 100 + n, at_cosine(0.3, 100 + n))
    hide(store, ids["hidden"])
    return {CLIP: index}, ids


def test_search_hybrid_puts_text_and_image_matches_first(store: Store, hybrid) -> None:
    indices, ids = hybrid
    ranked = search_hybrid(store, indices, "sale", unit(0), CLIP, k=5)
    assert [r["assetId"] for r in ranked] == [ids["both"], ids["text"], ids["textonly"], ids["clip"]] + [
        r["assetId"] for r in ranked[4:]]
    assert [r["score"] for r in ranked[:4]] == pytest.approx([0.95, 0.55, 0.5, 0.475], abs=1e-6)
    top = ranked[0]
    assert (top["ocrScore"], top["clipSimilarity"]) == pytest.approx((1.0, 0.9), abs=1e-6)
    assert [(line["text"], line["match"]) for line in top["lines"]] == [("Sale 50%", [0, 4])]
    assert top["asset"]["id"] == ids["both"]
    assert ranked[2]["clipSimilarity"] is None and ranked[2]["ocrScore"] == 1.0
    assert ranked[3]["ocrScore"] == 0.0 and ranked[3]["lines"] == []
    assert ids["hidden"] not in [r["assetId"] for r in search_hybrid(store, indices, "sale", unit(0), CLIP, k=50)]


def test_search_hybrid_reads_similarity_of_text_matches_outside_the_clip_candidates(store: Store, hybrid) -> None:
    indices, ids = hybrid
    # k=2: CLIP candidates are the 10 nearest, which leave out "text" (0.1 < 12 x 0.3)
    ranked = search_hybrid(store, indices, "sale", unit(0), CLIP, k=2)
    assert [r["assetId"] for r in ranked] == [ids["both"], ids["text"]]
    assert ranked[1]["clipSimilarity"] == pytest.approx(0.1, abs=1e-6)


def test_search_hybrid_weights(store: Store, hybrid) -> None:
    indices, ids = hybrid
    clip_only = search_hybrid(store, indices, "sale", unit(0), CLIP, k=3, ocr_weight=0.0)
    assert [r["assetId"] for r in clip_only] == [ids["clip"], ids["both"], ids["weak"]]
    text_only = search_hybrid(store, indices, "sale", unit(0), CLIP, k=3, ocr_weight=1.0)
    assert [r["assetId"] for r in text_only] == sorted([ids["both"], ids["text"], ids["textonly"]])
    no_embedding = search_hybrid(store, indices, "sale", None, None)
    assert [(r["assetId"], r["score"], r["clipSimilarity"]) for r in no_embedding] == [
        (ids["both"], 0.5, None), (ids["text"], 0.5, None), (ids["textonly"], 0.5, None)]
    unknown_model = search_hybrid(store, indices, "sale", unit(0), "ViT-L-14__openai")
    assert [r["assetId"] for r in unknown_model] == [r["assetId"] for r in no_embedding]


@pytest.mark.parametrize(
    "query, embedding, model, k, weight",
    [
        ("sale", unit(0), CLIP, 0, 0.5),
        ("sale", unit(0), CLIP, 5, 1.5),
        ("sale", unit(0), CLIP, 5, -0.1),
        ("sale", unit(0), None, 5, 0.5),
        ("sale", np.ones(64, np.float32), CLIP, 5, 0.5),
        (" ", unit(0), CLIP, 5, 0.5),
    ],
)
def test_search_hybrid_rejects_bad_input(store: Store, hybrid, query, embedding, model, k, weight) -> None:
    indices, _ = hybrid
    with pytest.raises(BadRequest):
        search_hybrid(store, indices, query, embedding, model, k, weight)
