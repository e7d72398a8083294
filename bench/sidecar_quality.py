"""Measure the sidecar's face clustering and duplicate detection against known truths.

1. Face clustering (``persons.cluster_faces``, Immich's defaults minFaces=3,
   maxDistance=0.5) on constructed 512-d embeddings with known identities, stored in a
   real SQLite store.
2. Duplicate detection through the HTTP API (in-process app, onnxruntime) on the photos
   of ../shared/data/photos and their re-encoded / downscaled variants, with the test
   pack's CLIP models.

    python bench/sidecar_quality.py [--out bench/sidecar.md]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import itertools
import os
import platform
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import onnxruntime
import PIL
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from immich_trt.application import create_app
from immich_trt.contract import CLIP_MODEL, PREVIEW_SIZE
from immich_trt.models.transforms import decode_pil
from immich_trt.sidecar.assets import AssetResults, FaceResult
from immich_trt.sidecar.persons import cluster_faces
from immich_trt.sidecar.routes import SIDECAR
from immich_trt.sidecar.service import Sidecar
from immich_trt.tools.testing import offline_settings
from immich_trt.tools.testpack import make_test_pack

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos"
DIM = 512
THRESHOLDS = (0.90, 0.95, 0.98, 0.99)
VARIANTS = ("original", "copy", "q90", "q75", "preview")


# ----------------------------------------------------------------------------- helpers


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(fmt, r)) + " |" for r in rows])


def pair_scores(predicted: dict[int, int | None], truth: dict[int, int]) -> tuple[float, float]:
    """Pairwise precision and recall: items with the same predicted label (None = no
    label, never paired) against items with the same true label."""
    items = sorted(truth)
    same_pred = same_true = both = 0
    for a, b in itertools.combinations(items, 2):
        p = predicted.get(a) is not None and predicted.get(a) == predicted.get(b)
        t = truth[a] == truth[b]
        same_pred += p
        same_true += t
        both += p and t
    return (both / same_pred if same_pred else 1.0), (both / same_true if same_true else 1.0)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return (
        f"{platform.machine()}, {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"numpy {np.__version__}, onnxruntime {onnxruntime.__version__}, Pillow {PIL.__version__}. "
        f"Date: {datetime.date.today().isoformat()}."
    )


# ----------------------------------------------------------------------------- faces


def make_faces(rng: np.random.Generator, identities: int, per_identity: int, strangers: int, pair_cos: float):
    """Unit embeddings float32[N, 512] and labels int[N] (identity, strangers -1 - i).

    A face is ``normalise(centre + noise)``, ``noise ~ N(0, s2 / 512 I)`` per face, with
    ``s2`` log-normal around ``1 / pair_cos - 1`` (so two faces of one identity have
    cosine about ``pair_cos``, spread by the per-face noise)."""
    centres = rng.standard_normal((identities + strangers, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.concatenate([np.repeat(np.arange(identities), per_identity), -1 - np.arange(strangers)])
    rows = np.where(labels >= 0, labels, identities - 1 - labels)
    s2 = (1 / pair_cos - 1) * np.exp(rng.normal(0, 0.4, len(labels)))
    vectors = centres[rows] + rng.standard_normal((len(labels), DIM)) * np.sqrt(s2 / DIM)[:, None]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(len(labels))  # photos do not arrive grouped by identity
    return vectors[order].astype(np.float32), labels[order], centres[rows][order]


def cosine_stats(vectors: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> dict[str, float]:
    sims = vectors @ vectors.T
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    np.fill_diagonal(same, False)
    other = labels[:, None] != labels[None, :]
    return {
        "pair": float(sims[same].mean()),
        "pair_p5": float(np.percentile(sims[same], 5)),
        "centre": float(np.einsum("ij,ij->i", vectors, centres)[labels >= 0].mean()),
        "other_max": float(sims[other].max()),
        "below": float((sims[same] < 0.5).mean()),
    }


async def store_faces(sidecar: Sidecar, vectors: np.ndarray, first: int) -> list[int]:
    """One asset per face (imohash from the face number); returns the face ids."""
    ids = []
    for n, vector in enumerate(vectors, start=first):
        face = FaceResult(box=(10.0, 10.0, 110.0, 110.0), score=0.9, embedding=vector)
        saved = await sidecar.save(AssetResults(imohash=f"{n:032x}", size=1000, width=640, height=480,
                                                ref=f"face-{n}", faces=("buffalo_l", [face])))
        ids += saved.face_ids
    return ids


async def cluster_scores(sidecar: Sidecar, face_ids: list[int], labels: np.ndarray, **kwargs) -> dict:
    started = time.perf_counter()
    counts = await sidecar.call(cluster_faces, sidecar.faces, min_faces=3, max_distance=0.5, **kwargs)
    wall = time.perf_counter() - started
    rows = await sidecar.call(lambda store: store.conn.execute("SELECT id, person FROM faces").fetchall())
    person = {r[0]: r[1] for r in rows}
    truth = {f: int(label) for f, label in zip(face_ids, labels)}
    precision, recall = pair_scores(person, truth)
    by_identity: dict[int, set] = {}
    by_person: dict[int, set] = {}
    for f, label in truth.items():
        if person[f] is not None:
            by_identity.setdefault(label, set()).add(person[f])
            by_person.setdefault(person[f], set()).add(label)
    return {
        "persons": len(by_person), "new": counts["newPersons"], "precision": precision, "recall": recall,
        "split": sum(len(p) > 1 for label, p in by_identity.items() if label >= 0),
        "mixed": sum(len(ls) > 1 for ls in by_person.values()),
        "unassigned_id": sum(person[f] is None for f, label in truth.items() if label >= 0),
        "unassigned_strangers": sum(person[f] is None for f, label in truth.items() if label < 0),
        "wall_ms": f"{wall * 1000:.1f}",
    }


async def clustering_experiment(workdir: Path) -> str:
    rng = np.random.default_rng(7)
    settings = [  # name, identities, faces each, strangers, incremental
        ("(a) 50 ids x 10", 50, 10, 0, False),
        ("(b) 200 ids x 5 + 200 strangers", 200, 5, 200, False),
        ("(c) 50 ids x 10, incremental half + half", 50, 10, 0, True),
    ]
    rows, stats_rows = [], []
    for pair_cos in (0.65, 0.55):
        for name, identities, each, strangers, incremental in settings:
            vectors, labels, centres = make_faces(rng, identities, each, strangers, pair_cos)
            s = cosine_stats(vectors, labels, centres)
            stats_rows.append([f"{pair_cos:.2f}", name, s["pair"], s["pair_p5"], s["below"], s["centre"], s["other_max"]])
            sidecar = Sidecar(offline_settings(Path(tempfile.mkdtemp(dir=workdir))))
            await sidecar.start()
            half = len(vectors) // 2 if incremental else len(vectors)
            face_ids = await store_faces(sidecar, vectors[:half], 0)
            if incremental:
                first = await cluster_scores(sidecar, face_ids, labels[:half])
                rows.append([f"{pair_cos:.2f}", name + ": first half", *first.values()])
                face_ids += await store_faces(sidecar, vectors[half:], half)
            result = await cluster_scores(sidecar, face_ids, labels)
            rows.append([f"{pair_cos:.2f}", name + (": after second half" if incremental else ""), *result.values()])
            if incremental:
                full = await cluster_scores(sidecar, face_ids, labels, full=True)
                rows.append([f"{pair_cos:.2f}", name + ": then full=True recluster", *full.values()])
            await sidecar.stop()
    by = {(r[0], r[1]): r for r in rows}
    easy, hard = [r for r in rows if r[0] == "0.65"], [r for r in rows if r[0] == "0.55"]
    b_easy, b_hard = by["0.65", settings[1][0]], by["0.55", settings[1][0]]
    inc = [by[c, settings[2][0] + s] for c in ("0.65", "0.55")
           for s in (": after second half", ": then full=True recluster")]
    summary = (
        f"What this shows: the lowest pairwise precision of any run is {min(r[4] for r in rows):.3f} and at "
        f"most {max(r[7] for r in rows)} persons mix identities (the closest faces of different identities "
        f"have cosine <= "
        f"{max(r[-1] for r in stats_rows):.3f}, far from the 0.5 link). At same-identity pair cosine about 0.65 "
        f"recall is {min(r[5] for r in easy):.3f}-{max(r[5] for r in easy):.3f} with at most "
        f"{max(r[6] for r in easy)} identities split; at about 0.55 ({min(r[4] for r in stats_rows[3:]):.0%}-{max(r[4] for r in stats_rows[3:]):.0%} of "
        f"same-identity pairs below cosine 0.5) "
        f"recall falls to {min(r[5] for r in hard):.3f}-{max(r[5] for r in hard):.3f}, with up to "
        f"{max(r[6] for r in hard)} identities split and up to {max(r[8] for r in hard)} identity faces left "
        f"unassigned. Strangers (one face each): {b_easy[9]} and {b_hard[9]} of 200 left unassigned. "
        f"Incremental runs do not revisit faces an earlier run left unassigned, so after the second half "
        f"{inc[0][8]} (0.65) and {inc[2][8]} (0.55) identity faces stay unassigned; a full recluster brings that "
        f"to {inc[1][8]} and {inc[3][8]} with recall {inc[1][5]:.3f} and {inc[3][5]:.3f}, and {inc[1][2]} and "
        f"{inc[3][2]} persons for the 50 identities (incremental: {inc[0][2]} and {inc[2][2]}). Clustering the "
        f"largest store (1 200 faces, setting b) takes {b_easy[10]} ms (0.65) and {b_hard[10]} ms (0.55)."
    )
    header = ["pair cos", "setting", "persons", "new persons (run)", "pair precision", "pair recall",
              "identities split", "persons mixing ids", "unassigned id faces", "unassigned strangers", "wall ms"]
    return "\n\n".join([
        "## 1. Face clustering (minFaces=3, maxDistance=0.5)",
        "Embeddings: random unit identity centres in 512-d; a face is normalise(centre + noise) with per-face "
        "noise variance log-normal around the level that gives the target within-identity pair cosine. Faces "
        "are stored in shuffled order, one asset per face, in a fresh SQLite store per setting. Measured "
        "cosines of the generated faces:",
        table(["target", "setting", "same-id pair cos mean", "same-id pair cos p5", "same-id pairs < 0.5",
               "face-to-centre cos mean", "max cos across ids"], stats_rows),
        "Clustering results (pairs: faces with the same person vs faces of the same identity; unassigned "
        "faces pair with nothing; strangers are their own identity):",
        table(header, rows),
        summary,
    ])


# ----------------------------------------------------------------------------- duplicates


def variants(data: bytes) -> dict[str, bytes]:
    """The photo's variants: the original bytes, an exact copy, JPEG q90 and q75
    re-encodes, and a downscale to the preview size (longest side PREVIEW_SIZE) at q80."""
    image = decode_pil(data)

    def jpeg(img, quality):
        out = io.BytesIO()
        img.save(out, "JPEG", quality=quality)
        return out.getvalue()

    preview = image.copy()
    preview.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE), Image.Resampling.LANCZOS)
    return {"original": data, "copy": data, "q90": jpeg(image, 90), "q75": jpeg(image, 75), "preview": jpeg(preview, 80)}


async def post(client: TestClient, path: str, **kwargs) -> dict:
    response = await client.post(path, **kwargs)
    assert response.status == 200, await response.text()
    return await response.json()


async def duplicates_run(cache: Path, workdir: Path, photos: dict[str, dict[str, bytes]]) -> dict:
    settings = offline_settings(cache, runtime="onnxruntime", model_ttl=0, data_dir=workdir / "data",
                                engines_dir=workdir / "engines")
    app = create_app(settings)
    async with TestClient(TestServer(app)) as client:
        asset: dict[tuple[str, str], int] = {}
        started = time.perf_counter()
        for name, kinds in photos.items():
            for kind, data in kinds.items():
                form = aiohttp.FormData()
                form.add_field("image", data, filename=f"{name}.{kind}")
                for field, value in (("assetId", f"{name}/{kind}"), ("faces", "false"), ("ocr", "false")):
                    form.add_field(field, value)
                asset[name, kind] = (await post(client, "/v1/ingest", data=form))["assetId"]
        ingest_s = time.perf_counter() - started
        index = app[SIDECAR].clip[CLIP_MODEL]
        vec = {key: index.get(a) for key, a in asset.items()}
        cos = {kind: [float(vec[n, kind] @ vec[n, "original"]) for n in photos] for kind in VARIANTS[2:]}
        keys = [(n, k) for n in photos for k in VARIANTS if k != "copy"]
        owner = np.array([n for n, _ in keys])
        sims = np.stack([vec[key] for key in keys]) @ np.stack([vec[key] for key in keys]).T
        cross = float(sims[owner[:, None] != owner[None, :]].max())
        truth = {a: name for (name, _), a in asset.items()}
        per_threshold = []
        for threshold in THRESHOLDS:
            started = time.perf_counter()
            await post(client, "/v1/duplicates/find", json={"threshold": threshold})
            find_ms = (time.perf_counter() - started) * 1000
            response = await client.get("/v1/duplicates/groups", params={"limit": "500", "includeResolved": "false"})
            groups = (await response.json())["items"]
            near = [g for g in groups if g["kind"] == "near"]
            exact = [g for g in groups if g["kind"] == "exact"]
            label = {m["id"]: g["id"] for g in near for m in g["members"]}
            precision, recall = pair_scores(label, truth)
            exact_ok = sum(len(g["members"]) == 1 and len(g["members"][0]["refs"]) == 2 for g in exact)
            mixing = sum(len({truth[m["id"]] for m in g["members"]}) > 1 for g in near)
            per_threshold.append([threshold, len(near), mixing, precision, recall, len(exact), exact_ok,
                                  f"{find_ms:.1f}"])
    return {"ingested": len(asset), "ingest_s": ingest_s, "cos": cos, "cross": cross, "thresholds": per_threshold}


async def duplicates_experiment(workdir: Path) -> str:
    photos, skipped = {}, []
    for path in sorted(PHOTOS.iterdir()):
        try:
            photos[path.name] = variants(path.read_bytes())
        except (PIL.UnidentifiedImageError, OSError) as exc:
            skipped.append(f"`{path.name}` ({type(exc).__name__})")
    packs = {"small (pooled pixels, random projection)": False, "full-size (ViT-B/32, random weights)": True}
    sections = [
        "## 2. Duplicate detection (CLIP near duplicates, exact duplicates)",
        f"Photos: {len(photos)} decodable files of `shared/data/photos`; skipped as undecodable by the "
        f"server's decoder: {', '.join(skipped) or 'none'}. Per photo, five uploads: the original bytes, the same "
        f"bytes under a second assetId (exact copy), JPEG re-encodes at quality 90 and 75, and a downscale to "
        f"longest side {PREVIEW_SIZE} (Immich's preview size) saved as JPEG q80. Ingested through `POST /v1/ingest` "
        "(clip only) of the in-process app (onnxruntime), then `POST /v1/duplicates/find` per threshold and "
        "`GET /v1/duplicates/groups?limit=500&includeResolved=false`. Truth: the variants of one photo belong "
        "together, different photos never.",
        f"**CLIP model: the test pack's `{CLIP_MODEL}`, built by `immich_trt.tools.testpack.make_test_pack` "
        "with random weights, no real OpenAI weights.** Two packs are measured: the small pack (average-pooled "
        "32x32 pixel patches through a fixed random projection, not a transformer) and the full-size pack (the "
        "real ViT-B/32 architecture with random weights). Neither gives the similarity values of the real "
        "OpenAI model; the numbers show how the pipeline behaves on embeddings of these models only.",
    ]
    for pack, full_size in packs.items():
        cache = workdir / f"cache-{int(full_size)}"
        make_test_pack(cache, full_size=full_size, face_models=())
        r = await duplicates_run(cache, workdir / f"run-{int(full_size)}", photos)
        cos_rows = [[kind, f"{min(v):.4f}", f"{np.mean(v):.4f}"] for kind, v in r["cos"].items()]
        cos_rows.append(["different photos (highest pair, any variants)", f"{r['cross']:.4f}", "-"])
        low = min(min(v) for v in r["cos"].values())
        clean = [t[0] for t in r["thresholds"] if t[3] == 1.0 and t[4] == 1.0]
        sections += [
            f"### {pack}",
            f"Ingestion: {r['ingested']} uploads in {r['ingest_s']:.1f} s ({r['ingested'] / r['ingest_s']:.1f} "
            "images/s, decode + CLIP visual + store; the exact copies skip inference).",
            table(["variant vs original", "cosine min", "cosine mean"], cos_rows),
            table(["threshold", "near groups", "groups mixing photos", "pair precision", "pair recall",
                   "exact groups", "exact groups of 1 asset with 2 refs", "find ms"], r["thresholds"]),
            f"What this shows: with this model every variant keeps cosine >= {low:.4f} to its original, while "
            f"the closest pair of different photos reaches {r['cross']:.4f}; thresholds "
            f"{', '.join(f'{t:.2f}' for t in clean) or 'none'} give pairwise precision and recall 1.000 "
            f"({len(photos)} near groups of 4 assets expected). At every threshold at least "
            f"{min(t[6] for t in r['thresholds'])} of the {len(photos)} exact copies form an exact group of one "
            "asset with both refs.",
        ]
    return "\n\n".join(sections)


async def main(out: Path) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        faces = await clustering_experiment(Path(tmp))
        dups = await duplicates_experiment(Path(tmp))
    text = "\n\n".join([
        "# Sidecar quality: face clustering and duplicate detection",
        f"Machine: {machine()} Generated by `bench/sidecar_quality.py` in "
        f"{time.perf_counter() - started:.0f} s.",
        faces, dups,
    ])
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("sidecar.md"))
    asyncio.run(main(parser.parse_args().out))
