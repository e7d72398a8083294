#!/usr/bin/env python3
"""Answers of immich-trt (GPU mode) against stock immich-ml on your own photos.

Both servers get Immich's requests (:mod:`immich_trt.contract`: CLIP, faces, OCR, with
Immich's default settings) on each photo of ``--images`` as an Immich preview
(:func:`immich_trt.tools.bench.load_previews`), and the answers are compared with the
GPU path's tolerances (docs/gpu.md): CLIP cosine >= 0.995; the same number of faces,
boxes within 2 px, embedding cosine >= 0.995; OCR texts identical. Both servers must use
the same model files (the model-cache volume of docker/compose.yml).

Prints a Markdown table to paste into an issue (and writes it to ``--out``); exit status
1 when any photo is outside the tolerances, 2 for a server that cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from immich_trt import contract  # noqa: E402
from immich_trt.tools.bench import load_previews  # noqa: E402

MIN_COSINE = 0.995
MAX_BOX_PX = 2.0


def cosine(a: str, b: str) -> float:
    x, y = np.asarray(json.loads(a), np.float64), np.asarray(json.loads(b), np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def compare_faces(ours: list[dict], stock: list[dict]) -> tuple[bool, float, float]:
    """(same count, max box corner distance in px, min embedding cosine) over the faces
    matched by order of score (both answer in detection order)."""
    if len(ours) != len(stock):
        return False, float("inf"), 0.0
    box, cos = 0.0, 1.0
    for a, b in zip(ours, stock):
        box = max(box, *(abs(a["boundingBox"][k] - b["boundingBox"][k]) for k in ("x1", "y1", "x2", "y2")))
        cos = min(cos, cosine(a["embedding"], b["embedding"]))
    return True, box, cos


async def run(args) -> int:
    import aiohttp

    previews, skipped = load_previews(Path(args.images))
    if not previews:
        print(f"no images under {args.images}", file=sys.stderr)
        return 2
    tasks = {
        "clip": contract.clip_visual_entries(),
        "faces": contract.face_entries(),
        "ocr": contract.ocr_entries(),
    }
    rows, worst = [], {"clip": 1.0, "faces_box": 0.0, "faces_cos": 1.0}
    failures = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        for preview in previews[: args.limit]:
            answers = {}
            for label, url in (("ours", args.ours), ("stock", args.stock)):
                answers[label] = {}
                for task, entries in tasks.items():
                    try:
                        status, _, body = await contract.predict(session, url, entries, preview.data)
                    except aiohttp.ClientError as exc:
                        print(f"{label} server at {url} cannot be reached: {exc}", file=sys.stderr)
                        return 2
                    answers[label][task] = json.loads(body) if status == 200 else {"status": status}
            ours, stock = answers["ours"], answers["stock"]
            clip = cosine(ours["clip"]["clip"], stock["clip"]["clip"]) if "clip" in ours["clip"] else 0.0
            same_faces, box, face_cos = compare_faces(
                ours["faces"].get("facial-recognition", []), stock["faces"].get("facial-recognition", [])
            )
            texts_ours = ours["ocr"].get("ocr", {}).get("text")
            same_text = texts_ours is not None and texts_ours == stock["ocr"].get("ocr", {}).get("text")
            ok = clip >= MIN_COSINE and same_faces and box <= MAX_BOX_PX and face_cos >= MIN_COSINE and same_text
            failures += not ok
            worst["clip"] = min(worst["clip"], clip)
            worst["faces_box"] = max(worst["faces_box"], box)
            worst["faces_cos"] = min(worst["faces_cos"], face_cos)
            faces = len(stock["faces"].get("facial-recognition", []))
            lines = len(stock["ocr"].get("ocr", {}).get("text", []))
            rows.append(f"| {preview.name} | {clip:.5f} | {faces} | {box:.1f} | {face_cos:.5f} | {lines} | "
                        f"{'same' if same_text else 'DIFFERENT'} | {'ok' if ok else 'OUTSIDE'} |")  # fmt: skip
    header = [
        f"Parity, immich-trt ({args.ours}) against stock immich-ml ({args.stock}), {len(rows)} photos"
        + (f" ({len(skipped)} unreadable skipped)" if skipped else ""),
        f"Tolerances: CLIP cosine >= {MIN_COSINE}; faces: same count, boxes within {MAX_BOX_PX:.0f} px, "
        f"embedding cosine >= {MIN_COSINE}; OCR texts identical.",
        f"Worst: CLIP {worst['clip']:.5f}, face box {worst['faces_box']:.1f} px, face embedding {worst['faces_cos']:.5f}; "
        f"{failures} photo(s) outside.",
        "",
        "| photo | CLIP cosine | faces | max box px | min face cosine | OCR lines | OCR texts | verdict |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    table = "\n".join(header + rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    print(table)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", default="http://localhost:3003")
    parser.add_argument("--stock", default="http://localhost:3103")
    parser.add_argument("--images", required=True, help="folder of your photos (recursive)")
    parser.add_argument("--limit", type=int, default=200, help="at most this many photos (default 200)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
