"""``immich-trt bench``: Immich's own requests against one or more ML servers, side by side.

What is sent: the four requests of Immich's server with its default settings, built by
:mod:`immich_trt.contract` (CLIP visual, faces and OCR on previews; CLIP textual on
queries). Previews are made once, in memory, as Immich makes them: EXIF orientation
applied, shorter side down to ``--preview-size`` (1440) if larger (sharp's ``fit:
outside, withoutEnlargement``), JPEG quality 80.

Two scenarios (``--scenario``; ``both`` by default, the job mix first):

- ``job-mix``, the headline: what Immich's server does after a bulk upload. Its job
  queues run at once over the same K assets (``--job-mix-assets``, all previews by
  default, cycling over them when K is larger), each queue a closed loop of its own
  concurrency: ``--job-mix clip-visual=2,faces=2,ocr=1``, Immich's default job
  concurrencies (smart search 2, face detection 2, OCR 1; ``server/src/config.ts``). A
  worker takes the next asset of its queue's list when its previous request is answered;
  a round ends when every queue has its K answers. Measured per target, summed over the
  rounds: assets/s (assets answered with 2xx by every queue over the wall time of the
  rounds; K × rounds / wall when nothing fails), per task the requests/s while its queue ran
  (2xx over the time from the round's start to that queue's last answer), p50/p95/p99
  latency and errors, and the process tree's CPU seconds (also per asset) and peak RSS.
- ``tasks``: one task at a time at each ``--concurrency`` level. Each round is a closed
  loop: ``concurrency`` workers, each sending its next request when the previous one is
  answered. Measured per (target, task, concurrency): requests/s (answered with 2xx, over
  the wall time of the rounds), p50/p95/p99 latency of those, errors (non-2xx or
  exceptions), and the process tree's peak RSS and CPU seconds.

How: each target first gets a few warm-up requests per task (model loading, not
counted). Then the rounds (``--rounds``: job-mix rounds; each level's requests split into
that many rounds) visit the targets in turn (A B A B ...), so that drift of the machine
(thermal, caches, other load) hits every target alike. Every target sees the same images
and queries in the same order.

Process tree, when the target's PID is given: the process and all its descendants,
summed, read from ``/proc``: peak resident memory (sampled every 0.5 s) and CPU seconds
(user + system of the tree, reaped children included). Also this client's own CPU
seconds. Ratios are against the first target.

Agreement, per scenario: the first answer of each target to each image or query is kept
and compared with the first target's: CLIP cosine, faces (count equal, box IoU and
embedding cosine of matched faces), OCR texts equal.

Output in ``--out``: ``results.md`` (the job mix first, then the per-task tables),
``results.csv`` (per-task levels), ``jobmix.csv`` (one ``job-mix`` row per target, then
a row per queue whose ``concurrency`` is the queue's; the ``job-mix`` row's is their
sum) and ``throughput.png`` (per-task levels; matplotlib, when installed); the tables
also on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

from .. import contract
from ..loopback import is_loopback

TASKS = ("clip-visual", "clip-text", "faces", "ocr")
IMAGE_TASKS = ("clip-visual", "faces", "ocr")
DEFAULT_CONCURRENCY = (1, 2, 4, 8)
SCENARIOS = ("job-mix", "tasks", "both")
#: Immich's default job concurrencies (``server/src/config.ts``): smart search (CLIP visual) 2,
#: face detection (detection + recognition in one request) 2, OCR 1.
DEFAULT_JOB_MIX = (("clip-visual", 2), ("faces", 2), ("ocr", 1))
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".avif", ".heic"}

#: Smart-search queries (CLIP textual) when no --queries file is given.
DEFAULT_QUERIES = (
    "a dog on the beach",
    "sunset over the sea",
    "birthday cake with candles",
    "snow covered mountains",
    "a cat sleeping on a sofa",
    "people hiking in a forest",
    "city skyline at night",
    "red car",
    "children playing football",
    "a plate of pasta",
    "wedding dress",
    "old castle",
    "flowers in a garden",
    "screenshot of a receipt",
    "a man riding a bicycle",
    "christmas tree with lights",
    "boat on a lake",
    "selfie with friends",
    "whiteboard with handwriting",
    "airplane window view",
    "baby smiling",
    "fireworks",
    "coffee cup on a table",
    "street market in the rain",
)


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    url: str
    pids: tuple[int, ...] = ()


def is_loopback_url(url: str) -> bool:
    """Whether ``url``'s host is ``localhost`` or a loopback address (127.0.0.0/8,
    ``[::1]``, IPv4-mapped loopback): the only servers a benchmark sends traffic to."""
    host = urlsplit(url).hostname or ""
    return host == "localhost" or is_loopback(host)


def parse_target(spec: str) -> Target:
    """``NAME=URL[,pid=PID[+PID...]]``: several PIDs count as one tree (e.g. a server and
    a Triton it did not start)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise ValueError(f"target {spec!r}: expected NAME=URL[,pid=PID]")
    url, *options = rest.split(",")
    pids: tuple[int, ...] = ()
    for option in options:
        key, _, value = option.partition("=")
        if key.strip() != "pid":
            raise ValueError(f"target {spec!r}: unknown option {key.strip()!r} (only pid=)")
        try:
            pids = tuple(int(p) for p in value.split("+"))
        except ValueError:
            raise ValueError(f"target {spec!r}: pid must be an integer (or PID+PID)") from None
    if not url.strip().startswith(("http://", "https://")):
        raise ValueError(f"target {spec!r}: the URL must start with http:// or https://")
    return Target(name.strip(), url.strip(), pids)


def parse_levels(text: str) -> tuple[int, ...]:
    levels = tuple(int(v) for v in text.split(",") if v.strip())
    if not levels or any(v < 1 for v in levels):
        raise ValueError(f"concurrency {text!r}: expected positive integers such as 1,2,4,8")
    return levels


def parse_tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise ValueError(f"tasks {text!r}: choose from {','.join(TASKS)}")
    return tasks


def parse_job_mix(text: str) -> tuple[tuple[str, int], ...]:
    """``TASK=N,...`` (e.g. ``clip-visual=2,faces=2,ocr=1``): the job queues that run at once
    and the concurrency of each, in the order given. Raises ValueError for a task that is not
    one of :data:`IMAGE_TASKS`, a task given twice, or a concurrency that is not an integer >= 1."""
    queues: list[tuple[str, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        task, sep, value = (v.strip() for v in part.partition("="))
        if task not in IMAGE_TASKS:
            raise ValueError(f"job mix {text!r}: {task!r} is not a job; choose from {','.join(IMAGE_TASKS)}")
        try:
            concurrency = int(value) if sep else 0
        except ValueError:
            concurrency = 0
        if concurrency < 1:
            raise ValueError(f"job mix {text!r}: {task} needs a concurrency >= 1, as in {task}=2")
        if task in (t for t, _ in queues):
            raise ValueError(f"job mix {text!r}: {task} is given twice")
        queues.append((task, concurrency))
    if not queues:
        raise ValueError(f"job mix {text!r}: expected TASK=N,... such as clip-visual=2,faces=2,ocr=1")
    return tuple(queues)


def preview_dimensions(width: int, height: int, size: int = contract.PREVIEW_SIZE) -> tuple[int, int]:
    """Immich's preview size (sharp ``resize(size, size, {fit: 'outside', withoutEnlargement: true})``):
    the shorter side becomes ``size`` when it is larger, the other keeps the aspect ratio."""
    shorter = min(width, height)
    if shorter <= size:
        return width, height
    scale = size / shorter
    if width <= height:
        return size, max(1, math.floor(height * scale + 0.5))
    return max(1, math.floor(width * scale + 0.5)), size


def make_preview(data: bytes, size: int = contract.PREVIEW_SIZE, quality: int = contract.PREVIEW_QUALITY) -> bytes:
    """An Immich-like preview: upright (EXIF orientation applied), RGB, resized with
    Lanczos to :func:`preview_dimensions`, JPEG ``quality``, no metadata."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as opened:
        image = ImageOps.exif_transpose(opened)
        image = image.convert("RGB")
    target = preview_dimensions(image.width, image.height, size)
    if target != image.size:
        image = image.resize(target, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class Preview:
    name: str
    data: bytes
    width: int
    height: int


def load_previews(
    folder: Path, size: int = contract.PREVIEW_SIZE, quality: int = contract.PREVIEW_QUALITY
) -> tuple[list[Preview], list[str]]:
    """Every image under ``folder`` (sorted, recursive) as a preview; returns the previews
    and the names of the files that could not be read as images."""
    from PIL import Image

    previews, skipped = [], []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        name = path.relative_to(folder).as_posix()
        try:
            data = make_preview(path.read_bytes(), size, quality)
        except Exception:  # noqa: BLE001 - any decoding failure: Immich would have no preview either
            skipped.append(name)
            continue
        with Image.open(io.BytesIO(data)) as image:
            previews.append(Preview(name, data, image.width, image.height))
    return previews, skipped


def load_queries(path: Path | None, language: str | None) -> list[tuple[str, str | None]]:
    """Queries, one a line (``query<TAB>language`` to give a language of its own);
    blank lines and lines starting with ``#`` are skipped."""
    if path is None:
        return [(q, language) for q in DEFAULT_QUERIES]
    queries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        text, tab, lang = line.partition("\t")
        queries.append((text, (lang.strip() or None) if tab else language))
    if not queries:
        raise ValueError(f"{path}: no queries")
    return queries


@dataclasses.dataclass(frozen=True)
class Request:
    key: str
    entries: dict
    image: bytes | None = None
    text: str | None = None


class Workload:
    """The i-th request of a task (cycling over the previews or the queries)."""

    def __init__(
        self, task: str, previews: Sequence[Preview], queries: Sequence[tuple[str, str | None]], models: dict[str, str]
    ) -> None:
        self.task = task
        self.previews = previews
        self.queries = queries
        if task == "clip-text":
            self.size = len(queries)
        else:
            self.size = len(previews)
            self.entries = {
                "clip-visual": lambda: contract.clip_visual_entries(models["clip"]),
                "faces": lambda: contract.face_entries(models["faces"]),
                "ocr": lambda: contract.ocr_entries(models["ocr"]),
            }[task]()
        self.models = models
        if self.size == 0:
            raise ValueError(f"{task}: nothing to send (no {'queries' if task == 'clip-text' else 'images'})")

    def request(self, index: int) -> Request:
        i = index % self.size
        if self.task == "clip-text":
            text, language = self.queries[i]
            return Request(f"q{i}", contract.clip_textual_entries(self.models["clip"], language), text=text)
        preview = self.previews[i]
        return Request(preview.name, self.entries, image=preview.data)


# ------------------------------------------------------------------------- /proc


class ProcessTree:
    """CPU time and resident memory of processes and all their descendants, from /proc."""

    def __init__(self, pids: Iterable[int], proc: Path = Path("/proc")) -> None:
        self.roots = tuple(pids)
        self.proc = proc
        self.tick = os.sysconf("SC_CLK_TCK")
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _stat(self, pid: int) -> list[str] | None:
        try:
            text = (self.proc / str(pid) / "stat").read_text()
        except OSError:
            return None
        return text[text.rindex(")") + 2 :].split()  # fields 3.. (the name may hold spaces)

    def pids(self) -> list[int]:
        """The roots that are alive and all their descendants."""
        children: dict[int, list[int]] = {}
        for entry in self.proc.iterdir():
            if entry.name.isdigit():
                fields = self._stat(int(entry.name))
                if fields is not None:
                    children.setdefault(int(fields[1]), []).append(int(entry.name))
        alive = [p for p in self.roots if (self.proc / str(p)).exists()]
        seen, stack = set(), list(alive)
        while stack:
            pid = stack.pop()
            if pid not in seen:
                seen.add(pid)
                stack.extend(children.get(pid, ()))
        return sorted(seen)

    def cpu_seconds(self, pids: Iterable[int] | None = None) -> float:
        """utime + stime of each process, plus the cutime + cstime of its reaped children."""
        ticks = 0
        for pid in self.pids() if pids is None else pids:
            fields = self._stat(pid)
            if fields is not None:
                ticks += sum(int(v) for v in fields[11:15])
        return ticks / self.tick

    def rss_bytes(self, pids: Iterable[int] | None = None) -> int:
        total = 0
        for pid in self.pids() if pids is None else pids:
            try:
                total += int((self.proc / str(pid) / "statm").read_text().split()[1]) * self.page
            except (OSError, IndexError, ValueError):
                pass
        return total


class Monitor:
    """Peak RSS of a process tree sampled in the background, and its CPU seconds between
    :meth:`start` and :meth:`stop`."""

    def __init__(self, tree: ProcessTree, interval_s: float = 0.5) -> None:
        self.tree = tree
        self.interval_s = interval_s
        self.peak_rss = 0
        self._cpu0 = 0.0
        self._task: asyncio.Task | None = None

    def _sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self.tree.rss_bytes())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self._sample()

    def start(self) -> None:
        self.peak_rss = 0
        self._sample()
        self._cpu0 = self.tree.cpu_seconds()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> tuple[float, int]:
        """Returns (CPU seconds since start, peak RSS bytes)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        cpu = self.tree.cpu_seconds() - self._cpu0
        self._sample()
        return max(cpu, 0.0), self.peak_rss


# ------------------------------------------------------------------------ metrics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default); ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base, ``None`` when either is missing or the base is 0."""
    if value is None or base is None or base == 0:
        return None
    return value / base


@dataclasses.dataclass
class Cell:
    """The measurements of one (target, task, concurrency), summed over its rounds."""

    target: str
    task: str
    concurrency: int
    latencies: list[float] = dataclasses.field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0
    client_cpu_s: float = 0.0
    cpu_s: float | None = None
    rss_bytes: int | None = None
    error_kinds: Counter = dataclasses.field(default_factory=Counter)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def requests(self) -> int:
        return self.ok + self.errors

    @property
    def throughput(self) -> float | None:
        return self.ok / self.wall_s if self.wall_s > 0 else None

    def latency_ms(self, q: float) -> float | None:
        value = percentile(self.latencies, q)
        return None if value is None else value * 1000.0

    @property
    def cpu_ms_per_request(self) -> float | None:
        return self.cpu_s / self.ok * 1000.0 if self.cpu_s is not None and self.ok else None

    def row(self, base: Cell | None) -> dict:
        """The CSV row; ratios against ``base`` (the first target's cell)."""
        row = {
            "target": self.target,
            "task": self.task,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.wall_s, 3),
            "throughput_rps": _round(self.throughput, 3),
            "p50_ms": _round(self.latency_ms(50), 1),
            "p95_ms": _round(self.latency_ms(95), 1),
            "p99_ms": _round(self.latency_ms(99), 1),
            "mean_ms": _round(sum(self.latencies) / self.ok * 1000.0 if self.ok else None, 1),
            "rss_mb": _round(self.rss_bytes / 2**20 if self.rss_bytes is not None else None, 1),
            "cpu_s": _round(self.cpu_s, 2),
            "cpu_ms_per_request": _round(self.cpu_ms_per_request, 1),
            "client_cpu_s": round(self.client_cpu_s, 2),
        }
        if base is not None:
            row["throughput_ratio"] = _round(ratio(self.throughput, base.throughput), 3)
            row["p95_ratio"] = _round(ratio(self.latency_ms(95), base.latency_ms(95)), 3)
            row["rss_ratio"] = _round(ratio(self.rss_bytes, base.rss_bytes), 3)
            row["cpu_per_request_ratio"] = _round(ratio(self.cpu_ms_per_request, base.cpu_ms_per_request), 3)
        return row


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


CSV_FIELDS = [
    "target", "task", "concurrency", "requests", "errors", "seconds", "throughput_rps",
    "p50_ms", "p95_ms", "p99_ms", "mean_ms", "rss_mb", "cpu_s", "cpu_ms_per_request", "client_cpu_s",
    "throughput_ratio", "p95_ratio", "rss_ratio", "cpu_per_request_ratio",
]  # fmt: skip


@dataclasses.dataclass
class JobMix:
    """Immich's job mix on one target, summed over its rounds: the queues ran at once over
    the same assets. ``queues`` maps each task to its :class:`Cell` (``concurrency``: the
    queue's; ``wall_s``: from each round's start to the queue's last answer)."""

    target: str
    queues: dict[str, Cell]
    assets: int = 0  # assets answered with 2xx by every queue
    wall_s: float = 0.0  # rounds' wall time: until the last queue's last answer
    client_cpu_s: float = 0.0
    cpu_s: float | None = None
    rss_bytes: int | None = None

    @property
    def concurrency(self) -> int:
        return sum(cell.concurrency for cell in self.queues.values())

    @property
    def requests(self) -> int:
        return sum(cell.requests for cell in self.queues.values())

    @property
    def errors(self) -> int:
        return sum(cell.errors for cell in self.queues.values())

    @property
    def assets_per_s(self) -> float | None:
        return self.assets / self.wall_s if self.wall_s > 0 else None

    @property
    def cpu_s_per_asset(self) -> float | None:
        return self.cpu_s / self.assets if self.cpu_s is not None and self.assets else None

    def rows(self, base: JobMix | None) -> list[dict]:
        """The ``jobmix.csv`` rows: the ``job-mix`` row, then one per queue (as
        :meth:`Cell.row`); ratios against ``base`` (the first target's job mix)."""
        row = {
            "target": self.target,
            "task": "job-mix",
            "concurrency": self.concurrency,
            "assets": self.assets,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.wall_s, 3),
            "assets_per_s": _round(self.assets_per_s, 3),
            "rss_mb": _round(self.rss_bytes / 2**20 if self.rss_bytes is not None else None, 1),
            "cpu_s": _round(self.cpu_s, 2),
            "cpu_s_per_asset": _round(self.cpu_s_per_asset, 4),
            "client_cpu_s": round(self.client_cpu_s, 2),
        }
        if base is not None:
            row["assets_ratio"] = _round(ratio(self.assets_per_s, base.assets_per_s), 3)
            row["rss_ratio"] = _round(ratio(self.rss_bytes, base.rss_bytes), 3)
            row["cpu_per_asset_ratio"] = _round(ratio(self.cpu_s_per_asset, base.cpu_s_per_asset), 3)
        rows = [row]
        for task, cell in self.queues.items():
            queue_row = cell.row(base.queues.get(task) if base is not None else None)
            queue_row["client_cpu_s"] = None  # the queues share this client: only the job-mix row has it
            rows.append(queue_row)
        return rows


JOB_MIX_CSV_FIELDS = [
    "target", "task", "concurrency", "assets", "requests", "errors", "seconds", "assets_per_s", "throughput_rps",
    "p50_ms", "p95_ms", "p99_ms", "mean_ms", "rss_mb", "cpu_s", "cpu_s_per_asset", "client_cpu_s",
    "assets_ratio", "throughput_ratio", "p95_ratio", "rss_ratio", "cpu_per_asset_ratio",
]  # fmt: skip


# ---------------------------------------------------------------------- agreement


def _embedding(value: str) -> list[float]:
    values = json.loads(value)
    if not isinstance(values, list):
        raise TypeError("an embedding is a JSON array in a string")
    return values


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity (float64); NaN when the lengths differ."""
    import numpy as np

    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape:
        return float("nan")
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / norm) if norm > 0 else (1.0 if not x.any() and not y.any() else 0.0)


def box_iou(a: dict, b: dict) -> float:
    """IoU of two ``boundingBox`` dicts (x1, y1, x2, y2)."""
    w = min(a["x2"], b["x2"]) - max(a["x1"], b["x1"])
    h = min(a["y2"], b["y2"]) - max(a["y1"], b["y1"])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a["x2"] - a["x1"]) * (a["y2"] - a["y1"]) + (b["x2"] - b["x1"]) * (b["y2"] - b["y1"]) - inter
    return inter / union if union > 0 else (1.0 if a == b else 0.0)


def greedy_pairs(boxes_a: Sequence[dict], boxes_b: Sequence[dict], min_iou: float = 0.0) -> list[tuple[int, int, float]]:
    """One-to-one pairs ``(i, j, iou)`` of two lists of boxes (x1, y1, x2, y2 dicts),
    greedily by IoU, highest first; pairs whose IoU is not above ``min_iou`` are left out."""
    pairs = sorted(((box_iou(a, b), i, j) for i, a in enumerate(boxes_a) for j, b in enumerate(boxes_b)), reverse=True)
    used_a, used_b, matches = set(), set(), []
    for iou, i, j in pairs:
        if iou <= min_iou:
            break
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            matches.append((i, j, iou))
    return matches


def match_faces(faces_a: list[dict], faces_b: list[dict]) -> list[tuple[dict, dict, float]]:
    """Greedy one-to-one matching by box IoU (highest first); pairs with IoU 0 are left out."""
    pairs = greedy_pairs([f["boundingBox"] for f in faces_a], [f["boundingBox"] for f in faces_b])
    return [(faces_a[i], faces_b[j], iou) for i, j, iou in pairs]


def box_offset(a: dict, b: dict) -> float:
    """The largest difference between two boxes' coordinates (x1, y1, x2, y2), in their
    unit (pixels for Immich's face boxes)."""
    return max(abs(float(a[k]) - float(b[k])) for k in ("x1", "y1", "x2", "y2"))


def ocr_lines(answer: dict) -> list[tuple[str, dict | None, list[float] | None]]:
    """The lines of an Immich OCR answer (``{"ocr": {"box": [8N floats], "text": [N]},
    "imageWidth", "imageHeight"}``) as ``(text, bounding rectangle, quad)``: the quad's
    corners in pixels (``box`` holds them as fractions of the image's width and height),
    the rectangle as x1, y1, x2, y2; both None when the answer has no boxes (``box``
    empty). Raises ``ValueError`` when there are boxes but not 8 numbers per text."""
    ocr = answer["ocr"]
    texts, flat = ocr["text"], ocr["box"]
    if len(flat) == 0 and texts:
        return [(text, None, None) for text in texts]
    if len(flat) != 8 * len(texts):
        raise ValueError(f"{len(texts)} OCR texts but {len(flat)} box coordinates")
    width, height = float(answer.get("imageWidth", 1)), float(answer.get("imageHeight", 1))
    lines = []
    for n, text in enumerate(texts):
        quad = [float(v) * (width if k % 2 == 0 else height) for k, v in enumerate(flat[8 * n : 8 * n + 8])]
        xs, ys = quad[0::2], quad[1::2]
        lines.append((text, {"x1": min(xs), "y1": min(ys), "x2": max(xs), "y2": max(ys)}, quad))
    return lines


#: OCR lines are the same line when their bounding rectangles overlap by more than this IoU.
OCR_LINE_IOU = 0.5


def match_ocr_lines(answer_a: dict, answer_b: dict) -> tuple[int, int, list[float]]:
    """How two OCR answers' lines agree: ``(identical, lines, offsets)``.

    Lines are paired one to one, greedily by the IoU of their bounding rectangles (above
    :data:`OCR_LINE_IOU`); answers without boxes pair lines in reading order instead. A
    line is *identical* when it is paired and its text is equal. ``lines`` is the larger
    of the two answers' line counts, so a line one answer lacks or adds counts as not
    identical; ``offsets`` holds, for each pair of lines with boxes, the largest distance
    between corresponding quad corners along x or y, in pixels."""
    lines_a, lines_b = ocr_lines(answer_a), ocr_lines(answer_b)
    boxed = all(r is not None for _, r, _ in lines_a + lines_b)
    if boxed:
        pairs = [(i, j) for i, j, _ in greedy_pairs([r for _, r, _ in lines_a], [r for _, r, _ in lines_b], OCR_LINE_IOU)]
    else:
        pairs = [(i, i) for i in range(min(len(lines_a), len(lines_b)))]
    identical = sum(lines_a[i][0] == lines_b[j][0] for i, j in pairs)
    offsets = [max(abs(p - q) for p, q in zip(lines_a[i][2], lines_b[j][2])) for i, j in pairs] if boxed else []
    return identical, max(len(lines_a), len(lines_b)), offsets


@dataclasses.dataclass
class Agreement:
    """The answers of ``target`` compared with the first target's, for one task."""

    target: str
    task: str
    items: int = 0  # answered (2xx) by both
    cosines: list[float] = dataclasses.field(default_factory=list)  # CLIP, or matched faces' embeddings
    ious: list[float] = dataclasses.field(default_factory=list)  # matched faces
    offsets: list[float] = dataclasses.field(default_factory=list)  # matched faces / paired OCR lines: px
    equal: int = 0  # faces: same count; OCR: same texts
    lines: int = 0  # OCR: lines, the larger count of the two answers per image (match_ocr_lines)
    identical_lines: int = 0  # OCR: paired lines with the same text
    unmatched_faces: int = 0
    malformed: int = 0  # 2xx answers that are not what Immich reads

    def add(self, base_body: bytes, body: bytes) -> None:
        try:
            a, b = json.loads(base_body), json.loads(body)
            if self.task in ("clip-visual", "clip-text"):
                value = cosine(_embedding(a["clip"]), _embedding(b["clip"]))
                self.cosines.append(value)
            elif self.task == "faces":
                faces_a, faces_b = a["facial-recognition"], b["facial-recognition"]
                matches = match_faces(faces_a, faces_b)
                pairs = [
                    (iou, cosine(_embedding(fa["embedding"]), _embedding(fb["embedding"]))) for fa, fb, iou in matches
                ]
                self.equal += len(faces_a) == len(faces_b)
                self.unmatched_faces += len(faces_a) + len(faces_b) - 2 * len(matches)
                self.ious += [iou for iou, _ in pairs]
                self.cosines += [c for _, c in pairs]
                self.offsets += [box_offset(fa["boundingBox"], fb["boundingBox"]) for fa, fb, _ in matches]
            elif self.task == "ocr":
                identical, lines, offsets = match_ocr_lines(a, b)
                self.equal += a["ocr"]["text"] == b["ocr"]["text"]
                self.identical_lines += identical
                self.lines += lines
                self.offsets += offsets
        except (KeyError, TypeError, ValueError, AttributeError):
            self.malformed += 1
            return
        self.items += 1

    def summary(self) -> str:
        text = self._summary()
        return text + (f"; {self.malformed} malformed answers" if self.malformed else "")

    def _summary(self) -> str:
        if not self.items:
            return "no image or query answered by both"
        if self.task in ("clip-visual", "clip-text"):
            return f"cosine min {min(self.cosines):.6f}, mean {sum(self.cosines) / len(self.cosines):.6f}"
        if self.task == "faces":
            text = f"face count equal {self.equal}/{self.items}"
            if self.ious:
                text += (
                    f"; {len(self.ious)} matched faces: box IoU min {min(self.ious):.4f}, "
                    f"box offset max {max(self.offsets):.2f} px, embedding cosine min {min(self.cosines):.6f}"
                )
            else:
                text += "; no matched faces"
            if self.unmatched_faces:
                text += f"; {self.unmatched_faces} unmatched"
            return text
        text = f"texts equal {self.equal}/{self.items} ({100.0 * self.equal / self.items:.1f}%)"
        if self.lines:
            text += (
                f"; lines identical {self.identical_lines}/{self.lines} ({self.identical_line_share * 100:.1f}%)"
                + (f", box offset max {max(self.offsets):.2f} px" if self.offsets else "")
            )
        return text

    @property
    def identical_line_share(self) -> float | None:
        """OCR: identical lines over lines (:func:`match_ocr_lines`), None without lines."""
        return self.identical_lines / self.lines if self.lines else None


def agreements(
    answers: dict[tuple[str, str], dict[str, bytes]], targets: Sequence[str], tasks: Sequence[str]
) -> list[Agreement]:
    """Compare each target after the first with the first, on the items both answered."""
    result = []
    for name in targets[1:]:
        for task in tasks:
            agreement = Agreement(name, task)
            for (item_task, _key), bodies in answers.items():
                if item_task == task and targets[0] in bodies and name in bodies:
                    agreement.add(bodies[targets[0]], bodies[name])
            result.append(agreement)
    return result


# ------------------------------------------------------------------------- runner


@dataclasses.dataclass
class Plan:
    targets: list[Target]
    tasks: tuple[str, ...]  # per-task scenario; () to leave it out
    levels: tuple[int, ...]
    requests_per_level: int | None  # per target; or
    seconds_per_level: float | None
    rounds: int
    warmup: int
    timeout_s: float
    job_mix: tuple[tuple[str, int], ...] = ()  # (task, concurrency) of each queue; () to leave the job mix out
    job_mix_assets: int = 0  # K: assets per job-mix round


class Bench:
    def __init__(self, plan: Plan, workloads: dict[str, Workload], progress: bool = True) -> None:
        self.plan = plan
        self.workloads = workloads
        self.progress = progress
        self.cells: dict[tuple[str, str, int], Cell] = {}
        self.answers: dict[tuple[str, str], dict[str, bytes]] = {}
        self.cursors: dict[tuple[str, str], int] = {}
        self.job_mixes: dict[str, JobMix] = {}
        self.job_mix_answers: dict[tuple[str, str], dict[str, bytes]] = {}
        self.warmed: set[tuple[str, str]] = set()
        self.monitors = {t.name: Monitor(ProcessTree(t.pids)) for t in plan.targets if t.pids}

    def _round_sizes(self) -> list[int]:
        n, r = self.plan.requests_per_level or 0, self.plan.rounds
        return [n // r + (1 if i < n % r else 0) for i in range(r)]

    def _warmup_tasks(self) -> list[str]:
        tasks = [task for task, _ in self.plan.job_mix]
        return tasks + [task for task in self.plan.tasks if task not in tasks]

    def total_requests(self) -> int | None:
        plan = self.plan
        if plan.tasks and plan.requests_per_level is None:
            return None
        per_target = plan.warmup * len(self._warmup_tasks()) + plan.job_mix_assets * len(plan.job_mix) * plan.rounds
        per_target += (plan.requests_per_level or 0) * len(plan.levels) * len(plan.tasks)
        return per_target * len(plan.targets)

    def _session(self):
        import aiohttp

        # a fresh pool per round: no connection left idle (and maybe closed) during other targets' rounds
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.plan.timeout_s), connector=aiohttp.TCPConnector(limit=0)
        )

    async def _send(self, session, target: Target, request: Request) -> tuple[float, int | None, bytes, str]:
        started = time.perf_counter()
        try:
            status, _, body = await contract.predict(session, target.url, request.entries, request.image, request.text)
        except Exception as exc:  # noqa: BLE001 - network errors, timeouts, bad answers: all count as errors
            return time.perf_counter() - started, None, b"", type(exc).__name__
        return time.perf_counter() - started, status, body, "" if 200 <= status < 300 else f"HTTP {status}"

    async def warm_up(self, target: Target, task: str, bar) -> None:
        """``plan.warmup`` uncounted requests, once per target and task."""
        if (target.name, task) in self.warmed:
            return
        self.warmed.add((target.name, task))
        workload = self.workloads[task]
        async with self._session() as session:
            for i in range(self.plan.warmup):
                await self._send(session, target, workload.request(i))
                bar.update(1)

    async def run_round(
        self, target: Target, task: str, concurrency: int, count: int | None, seconds: float | None, bar
    ) -> None:
        workload = self.workloads[task]
        cell = self.cells.setdefault((target.name, task, concurrency), Cell(target.name, task, concurrency))
        cursor_key = (target.name, task)
        issued = 0
        monitor = self.monitors.get(target.name)
        async with self._session() as session:
            if monitor is not None:
                monitor.start()
            client_cpu0 = time.process_time()
            started = time.perf_counter()
            deadline = started + seconds if seconds is not None else None

            async def worker() -> None:
                nonlocal issued
                while True:
                    if count is not None and issued >= count:
                        return
                    if deadline is not None and time.perf_counter() >= deadline:
                        return
                    issued += 1
                    index = self.cursors.get(cursor_key, 0)
                    self.cursors[cursor_key] = index + 1
                    request = workload.request(index)
                    latency, _status, body, error = await self._send(session, target, request)
                    if error:
                        cell.errors += 1
                        cell.error_kinds[error] += 1
                    else:
                        cell.latencies.append(latency)
                        self.answers.setdefault((task, request.key), {}).setdefault(target.name, body)
                    bar.update(1)

            try:
                await asyncio.gather(*(worker() for _ in range(concurrency)))
            finally:  # also when interrupted: the answered requests keep their time
                cell.wall_s += time.perf_counter() - started
                cell.client_cpu_s += time.process_time() - client_cpu0
                if monitor is not None:
                    cpu, rss = await monitor.stop()
                    cell.cpu_s = (cell.cpu_s or 0.0) + cpu
                    cell.rss_bytes = max(cell.rss_bytes or 0, rss)

    async def run_job_mix_round(self, target: Target, count: int, bar) -> None:
        """One job-mix round on ``target``: every queue of ``plan.job_mix`` at once, each a
        closed loop of its concurrency over assets 0..count-1 of its workload."""
        mix = self.job_mixes.setdefault(
            target.name,
            JobMix(target.name, {task: Cell(target.name, task, c) for task, c in self.plan.job_mix}),
        )
        answered: Counter = Counter()  # asset index -> queues that answered it with 2xx
        monitor = self.monitors.get(target.name)
        async with self._session() as session:
            if monitor is not None:
                monitor.start()
            client_cpu0 = time.process_time()
            started = time.perf_counter()

            async def queue(task: str, concurrency: int) -> None:
                workload, cell = self.workloads[task], mix.queues[task]
                taken = 0

                async def worker() -> None:
                    nonlocal taken
                    while taken < count:
                        index = taken
                        taken += 1
                        request = workload.request(index)
                        latency, _status, body, error = await self._send(session, target, request)
                        if error:
                            cell.errors += 1
                            cell.error_kinds[error] += 1
                        else:
                            cell.latencies.append(latency)
                            answered[index] += 1
                            self.job_mix_answers.setdefault((task, request.key), {}).setdefault(target.name, body)
                        bar.update(1)

                try:
                    await asyncio.gather(*(worker() for _ in range(concurrency)))
                finally:
                    cell.wall_s += time.perf_counter() - started

            try:
                await asyncio.gather(*(queue(task, c) for task, c in self.plan.job_mix))
            finally:  # also when interrupted: the assets answered so far keep their time
                mix.wall_s += time.perf_counter() - started
                mix.client_cpu_s += time.process_time() - client_cpu0
                mix.assets += sum(1 for n in answered.values() if n == len(self.plan.job_mix))
                if monitor is not None:
                    cpu, rss = await monitor.stop()
                    mix.cpu_s = (mix.cpu_s or 0.0) + cpu
                    mix.rss_bytes = max(mix.rss_bytes or 0, rss)

    async def run(self) -> None:
        from tqdm import tqdm

        plan = self.plan
        seconds = plan.seconds_per_level / plan.rounds if plan.seconds_per_level is not None else None
        sizes = self._round_sizes() if plan.requests_per_level is not None else [None] * plan.rounds
        with tqdm(total=self.total_requests(), unit="req", disable=not self.progress, dynamic_ncols=True) as bar:
            if plan.job_mix:
                for task, _ in plan.job_mix:
                    for target in plan.targets:
                        bar.set_postfix_str(f"{task} warm-up {target.name}")
                        await self.warm_up(target, task, bar)
                for round_index in range(plan.rounds):
                    for target in plan.targets:  # A B A B ...
                        bar.set_postfix_str(f"job mix round {round_index + 1}/{plan.rounds} {target.name}")
                        await self.run_job_mix_round(target, plan.job_mix_assets, bar)
            for task in plan.tasks:
                for target in plan.targets:
                    bar.set_postfix_str(f"{task} warm-up {target.name}")
                    await self.warm_up(target, task, bar)
                for level in plan.levels:
                    for round_index, size in enumerate(sizes):
                        if size == 0:
                            continue
                        for target in plan.targets:  # A B A B ...: drift hits every target alike
                            bar.set_postfix_str(f"{task} c={level} round {round_index + 1}/{plan.rounds} {target.name}")
                            await self.run_round(target, task, level, size, seconds, bar)

    def rows(self) -> list[dict]:
        first = self.plan.targets[0].name
        rows = []
        for task in self.plan.tasks:
            for level in self.plan.levels:
                base = self.cells.get((first, task, level))
                for target in self.plan.targets:
                    cell = self.cells.get((target.name, task, level))
                    if cell is not None:
                        rows.append(cell.row(base))
        return rows

    def job_mix_rows(self) -> list[dict]:
        base = self.job_mixes.get(self.plan.targets[0].name)
        rows = []
        for target in self.plan.targets:
            mix = self.job_mixes.get(target.name)
            if mix is not None:
                rows += mix.rows(base)
        return rows

    def agreements(self) -> list[Agreement]:
        return agreements(self.answers, [t.name for t in self.plan.targets], self.plan.tasks)

    def job_mix_agreements(self) -> list[Agreement]:
        names = [t.name for t in self.plan.targets]
        return agreements(self.job_mix_answers, names, [task for task, _ in self.plan.job_mix])

    def error_kinds(self) -> dict[str, Counter]:
        kinds: dict[str, Counter] = {}
        cells = [*self.cells.values(), *(cell for mix in self.job_mixes.values() for cell in mix.queues.values())]
        for cell in cells:
            kinds.setdefault(cell.target, Counter()).update(cell.error_kinds)
        return {k: v for k, v in kinds.items() if v}


# ------------------------------------------------------------------------ reports


def environment() -> dict[str, str]:
    """The machine and versions of this environment, for the report header."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except (OSError, ValueError):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()}",
        "cpu": cpu,
        "cores": f"{os.cpu_count()} logical ({usable} usable by this process)",
        "memory": memory or "unknown",
        "python": platform.python_version(),
        "onnxruntime": version("onnxruntime"),
        "immich-trt": version("immich-trt"),
        "aiohttp": version("aiohttp"),
        "pillow": version("pillow"),
    }


def _fmt(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.{digits}f}{suffix}" if isinstance(value, float) else f"{value}{suffix}"


def write_csv(path: Path, rows: Sequence[dict], fields: Sequence[str] = CSV_FIELDS) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})


def job_mix_tables(rows: Sequence[dict], targets: Sequence[str], queues: Sequence[tuple[str, int]]) -> str:
    """The job-mix tables from :meth:`JobMix.rows`: one line per target (assets/s, p95 of each
    queue, CPU per asset, peak RSS, ratios against the first target), then one per queue."""
    first = targets[0]
    by_key = {(r["target"], r["task"]): r for r in rows}
    header = f"| target | assets/s | × {first} |"
    rule = "|---|---:|---:|"
    for task, _ in queues:
        header += f" {task} p95 ms | × {first} |"
        rule += "---:|---:|"
    out = [header + f" CPU s/asset | peak RSS MB | RSS × {first} | errors |", rule + "---:|---:|---:|---:|"]
    for target in targets:
        mix = by_key.get((target, "job-mix"))
        if mix is None:
            continue
        line = f"| {target} | {_fmt(mix['assets_per_s'], 2)} | {_fmt(mix.get('assets_ratio'), 2, '×')} |"
        for task, _ in queues:
            queue = by_key.get((target, task), {})
            line += f" {_fmt(queue.get('p95_ms'))} | {_fmt(queue.get('p95_ratio'), 2, '×')} |"
        line += (
            f" {_fmt(mix['cpu_s_per_asset'], 3)} | {_fmt(mix['rss_mb'], 0)} | {_fmt(mix.get('rss_ratio'), 2, '×')} "
            f"| {mix['errors']}/{mix['requests']} |"
        )
        out.append(line)
    out += [
        "",
        f"| target | task | c | requests/s | × {first} | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target in targets:
        for task, _ in queues:
            r = by_key.get((target, task))
            if r is not None:
                out.append(
                    f"| {target} | {task} | {r['concurrency']} | {_fmt(r['throughput_rps'], 2)} "
                    f"| {_fmt(r.get('throughput_ratio'), 2, '×')} | {_fmt(r['p50_ms'])} | {_fmt(r['p95_ms'])} "
                    f"| {_fmt(r['p99_ms'])} | {r['errors']}/{r['requests']} |"
                )
    return "\n".join(out) + "\n"


def markdown_tables(rows: Sequence[dict], targets: Sequence[str], tasks: Sequence[str], levels: Sequence[int]) -> str:
    """The per-task result tables and the throughput-ratio summary."""
    first = targets[0]
    out: list[str] = []
    if len(targets) > 1:
        out += [f"### Throughput ratio against {first}", ""]
        out.append("| target | task | " + " | ".join(f"c={c}" for c in levels) + " |")
        out.append("|---|---|" + "---:|" * len(levels))
        by_key = {(r["target"], r["task"], r["concurrency"]): r for r in rows}
        for target in targets[1:]:
            for task in tasks:
                cells = [_fmt(by_key.get((target, task, c), {}).get("throughput_ratio"), 2, "×") for c in levels]
                out.append(f"| {target} | {task} | " + " | ".join(cells) + " |")
        out.append("")
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        if not task_rows:
            continue
        unit = "queries/s" if task == "clip-text" else "images/s"
        out += [f"### {task}", ""]
        out.append(
            f"| c | target | {unit} | × {first} | p50 ms | p95 ms | p99 ms | p95 × {first} | errors "
            f"| RSS MB | CPU s | CPU ms/req | client CPU s |"
        )
        out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in task_rows:
            out.append(
                f"| {r['concurrency']} | {r['target']} | {_fmt(r['throughput_rps'], 2)} "
                f"| {_fmt(r.get('throughput_ratio'), 2, '×')} | {_fmt(r['p50_ms'])} | {_fmt(r['p95_ms'])} "
                f"| {_fmt(r['p99_ms'])} | {_fmt(r.get('p95_ratio'), 2, '×')} | {r['errors']}/{r['requests']} "
                f"| {_fmt(r['rss_mb'], 0)} | {_fmt(r['cpu_s'], 1)} | {_fmt(r['cpu_ms_per_request'], 0)} "
                f"| {_fmt(r['client_cpu_s'], 1)} |"
            )
        out.append("")
    return "\n".join(out)


def agreement_table(items: Sequence[Agreement], first: str) -> str:
    if not items:
        return ""
    lines = [f"| target vs {first} | task | items | agreement |", "|---|---|---:|---|"]
    for a in items:
        lines.append(f"| {a.target} | {a.task} | {a.items} | {a.summary()} |")
    return "\n".join(lines) + "\n"


def write_markdown(
    path: Path,
    env: dict[str, str],
    settings: dict[str, str],
    targets: Sequence[Target],
    tables: str,
    agreement: str,
    errors: dict[str, Counter],
    job_mix: str = "",
    job_mix_agreement: str = "",
) -> None:
    """``results.md``: the job mix first (when run), then the setup, the per-task tables
    (when run), the agreement and the errors."""
    lines = ["# immich-trt bench", ""]
    if job_mix:
        lines += [
            "## Job mix",
            "",
            (
                "Immich's job queues after a bulk upload, run at once over the same assets, each a closed loop of "
                "its concurrency (c). assets/s: assets answered with 2xx by every queue over the wall time of the "
                "rounds (until the last queue's last answer); a queue's requests/s: its 2xx answers over the time "
                "it ran. CPU s/asset: user + system seconds of the target's process tree during the rounds, per "
                "asset; peak RSS: that tree's summed resident memory (sampled every 0.5 s)."
            ),
            "",
            job_mix,
        ]
        if job_mix_agreement:
            lines += ["### Agreement (job mix)", "", job_mix_agreement]
        lines += ["## Setup", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    lines += ["", "| target | URL | process tree measured |", "|---|---|---|"]
    lines += [f"| {t.name} | {t.url} | {'yes' if t.pids else 'no'} |" for t in targets]
    lines.append("")
    if tables:
        if job_mix:
            lines += ["## Per task", ""]
        lines += [
            (
                "Throughput counts the requests answered with 2xx over the wall time of the rounds; latencies "
                "are those of the same requests. RSS: peak over the level of the summed resident memory of "
                "the target's process tree (sampled every 0.5 s); CPU s: user + system seconds of that tree "
                "during the level. client CPU s: this benchmark process."
            ),
            "",
            tables,
        ]
    if agreement:
        lines += ["### Agreement", "", agreement]
    if errors:
        lines += ["### Errors", ""]
        lines += [
            f"- {target}: " + ", ".join(f"{kind} × {n}" for kind, n in kinds.most_common())
            for target, kinds in errors.items()
        ]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def write_plot(
    path: Path, rows: Sequence[dict], targets: Sequence[str], tasks: Sequence[str], levels: Sequence[int]
) -> bool:
    """Throughput against concurrency, one panel per task, one line per target.
    Returns False (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    columns = min(len(tasks), 2)
    lines_n = math.ceil(len(tasks) / columns)
    figure, axes = plt.subplots(lines_n, columns, figsize=(5.5 * columns, 3.8 * lines_n), squeeze=False)
    by_key = {(r["target"], r["task"], r["concurrency"]): r for r in rows}
    for index, task in enumerate(tasks):
        axis = axes[index // columns][index % columns]
        for target in targets:
            points = [(c, by_key.get((target, task, c), {}).get("throughput_rps")) for c in levels]
            points = [(c, v) for c, v in points if v is not None]
            if points:
                axis.plot([c for c, _ in points], [v for _, v in points], marker="o", label=target)
        axis.set_xscale("log", base=2)
        axis.set_xticks(list(levels), [str(c) for c in levels])
        axis.set_title(task)
        axis.set_xlabel("concurrency")
        axis.set_ylabel("queries/s" if task == "clip-text" else "images/s")
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        if axis.get_lines():
            axis.legend()
    for index in range(len(tasks), lines_n * columns):
        axes[index // columns][index % columns].set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


# ---------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    """``immich-trt bench`` (the arguments of :func:`add_arguments`)."""
    try:
        targets = [parse_target(spec) for spec in args.target]
        run_job_mix = args.scenario in ("job-mix", "both")
        tasks = parse_tasks(args.tasks) if args.scenario in ("tasks", "both") else ()
        levels = parse_levels(args.concurrency)
        job_mix = parse_job_mix(args.job_mix) if run_job_mix else ()
        if len({t.name for t in targets}) != len(targets):
            raise ValueError("target names must differ")
        remote = [t.url for t in targets if not is_loopback_url(t.url)]
        if remote:
            raise ValueError(
                f"{', '.join(remote)}: the benchmark measures servers you run on this machine; give a loopback "
                "URL (publish a container's port on 127.0.0.1, e.g. docker run -p 127.0.0.1:3103:3003)"
            )
        if args.rounds < 1 or args.warmup < 0:
            raise ValueError("--rounds must be >= 1 and --warmup >= 0")
        if args.seconds is not None and args.seconds <= 0:
            raise ValueError("--seconds must be positive")
        if args.requests_per_level is not None and args.requests_per_level < 1:
            raise ValueError("--requests-per-level must be >= 1")
        if args.job_mix_assets is not None and args.job_mix_assets < 1:
            raise ValueError("--job-mix-assets must be >= 1")
        if job_mix and not args.images:
            raise ValueError(f"--images is needed for the job mix (--scenario {args.scenario})")
        if any(t in IMAGE_TASKS for t in tasks) and not args.images:
            raise ValueError(f"--images is needed for {', '.join(t for t in tasks if t in IMAGE_TASKS)}")
        queries = load_queries(Path(args.queries) if args.queries else None, args.language or None)
    except (ValueError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    needed = [task for task, _ in job_mix] + [task for task in tasks if task not in dict(job_mix)]
    previews: list[Preview] = []
    if args.images and any(t in IMAGE_TASKS for t in needed):
        folder = Path(args.images)
        if not folder.is_dir():
            print(f"bench: {folder} is not a folder", file=sys.stderr)
            return 2
        started = time.perf_counter()
        previews, skipped = load_previews(folder, args.preview_size, contract.PREVIEW_QUALITY)
        print(
            f"{len(previews)} previews made in {time.perf_counter() - started:.1f} s"
            + (f"; skipped (not images): {', '.join(skipped)}" if skipped else ""),
            file=sys.stderr,
        )
    models = {"clip": args.clip_model, "faces": args.face_model, "ocr": args.ocr_model}
    try:
        workloads = {task: Workload(task, previews, queries, models) for task in needed}
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    assets = (args.job_mix_assets or len(previews)) if job_mix else 0
    requests_per_level = None if args.seconds is not None else (args.requests_per_level or 128)
    plan = Plan(
        targets, tasks, levels, requests_per_level, args.seconds, args.rounds, args.warmup, args.timeout,
        job_mix, assets,
    )  # fmt: skip
    bench = Bench(plan, workloads, progress=not args.no_progress)
    interrupted = False
    try:
        asyncio.run(bench.run())
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing the results measured so far", file=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [t.name for t in targets]
    rows = bench.rows()
    tables = markdown_tables(rows, names, tasks, levels) if tasks else ""
    agreement = agreement_table(bench.agreements(), names[0]) if len(targets) > 1 and tasks else ""
    mix_rows = bench.job_mix_rows()
    mix_tables = job_mix_tables(mix_rows, names, job_mix) if job_mix else ""
    mix_agreement = agreement_table(bench.job_mix_agreements(), names[0]) if len(targets) > 1 and job_mix else ""
    if previews:
        mean_w = sum(p.width for p in previews) / len(previews)
        mean_h = sum(p.height for p in previews) / len(previews)
        folder_name = Path(args.images).resolve().name
        images = f"{len(previews)} from `{folder_name}/`, previews {mean_w:.0f}x{mean_h:.0f} px on average"
    else:
        images = "none"
    settings = {"scenario": args.scenario}
    if job_mix:
        settings["job mix"] = (
            ", ".join(f"{task} c={c}" for task, c in job_mix)
            + f" at once over {assets} assets, {args.rounds} rounds per target (targets in turn), "
            f"after {args.warmup} warm-up requests per task"
        )
    if tasks:
        settings["tasks"] = ", ".join(tasks)
    settings |= {
        "images": images,
        "preview": f"shorter side <= {args.preview_size} px, JPEG quality {contract.PREVIEW_QUALITY}",
    }
    if "clip-text" in tasks:
        settings["queries"] = f"{len(queries)} ({'from ' + Path(args.queries).name if args.queries else 'built in'})"
    settings["models"] = f"CLIP {models['clip']}, faces {models['faces']}, OCR {models['ocr']}"
    if tasks:
        settings["concurrency"] = ", ".join(map(str, levels))
        settings["per level and target"] = (
            f"{args.seconds:g} s" if args.seconds is not None else f"{requests_per_level} requests"
        ) + f" in {args.rounds} rounds (targets in turn), after {args.warmup} warm-up requests per task"
    if interrupted:
        settings["interrupted"] = "yes: the last rounds are incomplete or missing"
    write_markdown(
        out / "results.md", environment(), settings, targets, tables, agreement, bench.error_kinds(),
        mix_tables, mix_agreement,
    )  # fmt: skip
    written = ["results.md"]
    if job_mix:
        write_csv(out / "jobmix.csv", mix_rows, JOB_MIX_CSV_FIELDS)
        written.append("jobmix.csv")
    plotted = False
    if tasks:
        write_csv(out / "results.csv", rows)
        plotted = write_plot(out / "throughput.png", rows, names, tasks, levels)
        written += ["results.csv"] + (["throughput.png"] if plotted else [])

    if job_mix:
        print("Job mix\n\n" + mix_tables)
        if mix_agreement:
            print("Agreement (job mix)\n\n" + mix_agreement)
    if tasks:
        print(tables)
        if agreement:
            print("Agreement\n\n" + agreement)
    for target, kinds in bench.error_kinds().items():
        print(f"errors from {target}: " + ", ".join(f"{k} × {n}" for k, n in kinds.most_common()))
    print(f"written to {out}: {', '.join(written)}")
    if tasks and not plotted:
        print("throughput.png not written: matplotlib is not installed", file=sys.stderr)
    return 130 if interrupted else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="NAME=URL[,pid=PID]",
        help="a server you run on this machine, at a loopback URL such as http://127.0.0.1:3003 (repeatable; "
        "the first is the reference of the ratios); "
        "pid: measure the RSS and CPU of that process and its descendants (PID+PID for several)",
    )
    parser.add_argument("--images", metavar="DIR", help="folder of images (recursive), sent as Immich previews")
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="both",
        help="job-mix: Immich's job queues at once (the headline); tasks: one task at a time at each "
        "--concurrency level; both (default): the job mix, then the tasks",
    )
    parser.add_argument(
        "--job-mix",
        default=",".join(f"{task}={c}" for task, c in DEFAULT_JOB_MIX),
        metavar="TASK=N,...",
        help="the job queues run at once and their concurrencies, from "
        f"{','.join(IMAGE_TASKS)} (default {','.join(f'{task}={c}' for task, c in DEFAULT_JOB_MIX)}: "
        "Immich's default job concurrencies)",
    )
    parser.add_argument(
        "--job-mix-assets",
        type=int,
        metavar="K",
        help="assets per job-mix round, every queue sends each once (default: all previews; cycles over them "
        "when K is larger)",
    )
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"tasks of the per-task scenario, comma-separated, from {','.join(TASKS)} (default: all)",
    )
    parser.add_argument(
        "--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)), help="concurrency levels (default 1,2,4,8)"
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument(
        "--requests-per-level", type=int, metavar="N", help="requests per target and level (default 128)"
    )
    amount.add_argument("--seconds", type=float, metavar="S", help="seconds per target and level instead")
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="job-mix rounds, and rounds per level, targets in turn in each (default 4)",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="uncounted requests per target and task first (default 2)"
    )
    parser.add_argument("--preview-size", type=int, default=contract.PREVIEW_SIZE, help="preview size (default 1440)")
    parser.add_argument("--queries", metavar="FILE", help="CLIP text queries, one a line (query<TAB>language allowed)")
    parser.add_argument(
        "--language", default="en", help="language option of the text queries ('' for none; default en)"
    )
    parser.add_argument("--clip-model", default=contract.CLIP_MODEL, help=f"default {contract.CLIP_MODEL}")
    parser.add_argument("--face-model", default=contract.FACE_MODEL, help=f"default {contract.FACE_MODEL}")
    parser.add_argument("--ocr-model", default=contract.OCR_MODEL, help=f"default {contract.OCR_MODEL}")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="per-request timeout in seconds (default 300, as Node's)"
    )
    parser.add_argument("--out", default="bench-results", metavar="DIR", help="output folder (default bench-results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
