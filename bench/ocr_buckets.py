"""Measure OCR shape buckets: answers and distinct shapes with and without padding.

Runs Immich's default OCR request (PP-OCRv5_mobile, minScore 0.5/0.8, maxResolution 736)
on every image of ../shared/data/{ocr,photos} in-process (onnxruntime, the same
pipelines and ONNX files Triton runs), once per mode, and writes a Markdown report.

    python bench/ocr_buckets.py [--out bench/ocr_buckets.md]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import orjson
import PIL

from immich_trt.models import build_model
from immich_trt.models.base import ModelContext
from immich_trt.models.cache import ModelCache
from immich_trt.models.transforms import decode_pil
from immich_trt.runtime.onnxruntime import OnnxRuntime
from immich_trt.tools.testing import offline_settings, prepare_ocr_cache

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODES = {"exact": (False, False), "det buckets": (True, False), "rec buckets": (False, True), "det+rec buckets": (True, True)}


class RecordingRuntime(OnnxRuntime):
    """Records the input shape of every inference call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shapes: dict[str, set[tuple[int, ...]]] = {}

    async def infer(self, name, inputs, outputs=None):
        self.shapes.setdefault(name, set()).add(tuple(next(iter(inputs.values())).shape))
        return await super().infer(name, inputs, outputs)


async def run_mode(cache_folder: Path, images: list[Path], det_buckets: bool, rec_buckets: bool):
    settings = offline_settings(cache_folder)
    runtime = RecordingRuntime(*settings.ort_threads)
    ctx = ModelContext(settings, runtime)
    cache = ModelCache(ctx, build_model, ttl=0)
    det = await cache.get("PP-OCRv5_mobile", "detection", "ocr", minScore=0.5)
    rec = await cache.get("PP-OCRv5_mobile", "recognition", "ocr", minScore=0.8)
    await cache.load(det)
    await cache.load(rec)
    # the setting switches both sides; the benchmark toggles each on its own
    det.shape_buckets, rec.shape_buckets = det_buckets, rec_buckets
    results = {}
    for path in images:
        try:
            image = decode_pil(path.read_bytes())
        except Exception:
            continue
        d = await det.predict(image, minScore=0.5, maxResolution=736)
        r = await rec.predict(image, d, minScore=0.8)
        results[path.name] = (image.size, r, orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY))
    await runtime.stop()
    return results, runtime.shapes


def lines(size, response):
    w, h = size
    boxes = np.asarray(response["box"], dtype=np.float64).reshape(-1, 4, 2) * [w, h]
    return list(zip(response["text"], boxes, response["textScore"]))


def compare(base, other):
    identical = total = 0
    worst = 0.0
    same_bytes = 0
    for name, (size, resp, body) in base.items():
        o_size, o_resp, o_body = other[name]
        same_bytes += body == o_body
        a, b = lines(size, resp), lines(size, o_resp)
        total += max(len(a), len(b))
        used = set()
        for text, box, _ in a:
            # match the line with the nearest box
            best, best_d = None, None
            for j, (t2, b2, _) in enumerate(b):
                if j in used:
                    continue
                dist = float(np.abs(box - b2).max())
                if best_d is None or dist < best_d:
                    best, best_d = j, dist
            if best is None:
                continue
            used.add(best)
            worst = max(worst, best_d)
            identical += b[best][0] == text and best_d == 0.0
    return identical, total, worst, same_bytes


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).with_name("ocr_buckets.md")))
    args = parser.parse_args()
    images = sorted(p for d in ("ocr", "photos") for p in (DATA / d).iterdir() if p.suffix.lower() != ".md")
    with tempfile.TemporaryDirectory() as tmp:
        cache_folder = prepare_ocr_cache(Path(tmp))
        runs = {mode: await run_mode(cache_folder, images, *flags) for mode, flags in MODES.items()}
    base, base_shapes = runs["exact"]
    rows = []
    for mode, (results, shapes) in runs.items():
        identical, total, worst, same_bytes = compare(base, results)
        det_shapes = {s[1:3] for k, v in shapes.items() if k.endswith("detection") for s in v}  # NHWC uint8
        rec_widths = {s[3] for k, v in shapes.items() if k.endswith("recognition") for s in v}
        rows.append(
            f"| {mode} | {same_bytes}/{len(base)} | {identical}/{total} ({100 * identical / max(total, 1):.1f}%) "
            f"| {worst:.0f} | {len(det_shapes)} | {len(rec_widths)} |"
        )
    diffs = []
    for mode in MODES:
        if mode == "exact":
            continue
        for name, (size, resp, body) in base.items():
            o = runs[mode][0][name]
            if o[2] != body and resp["text"] != o[1]["text"]:
                diffs.append(f"- {mode}, `{name}`: {list(resp['text'])} -> {list(o[1]['text'])}")
    report = [
        "# OCR shape buckets: answers and distinct shapes",
        "",
        f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}, Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}, Pillow {PIL.__version__}. Date: {datetime.date.today().isoformat()}.",
        f"Images: {len(base)} decodable files of `shared/data/ocr` and `shared/data/photos`; Immich's default OCR "
        "request (PP-OCRv5_mobile, detection minScore 0.5, maxResolution 736, recognition minScore 0.8).",
        "",
        "Detector ladder (each side): 256, 512, 768, 1024, 1280, 1536, 2048, then multiples of 512. "
        "Recognizer width ladder: 320, 480, 640, 960, 1280, 1920, 2560, then multiples of 640.",
        "",
        "| mode | responses byte-identical to exact | lines identical (text and box) | worst box deviation (px) "
        "| distinct detector shapes | distinct recognizer widths |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Lines are matched to the exact-mode line with the nearest box; 'identical' needs the same text and the "
        "same box. Text changes:",
        "",
        *(diffs or ["- none"]),
        "",
    ]
    Path(args.out).write_text("\n".join(report), encoding="utf-8")
    print("\n".join(report))


if __name__ == "__main__":
    asyncio.run(main())
