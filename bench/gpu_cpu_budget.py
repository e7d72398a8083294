#!/usr/bin/env python3
"""Server CPU per request in GPU mode (``IMMICH_TRT_PREPROCESS=gpu``), the model work excluded.

What a GPU host's CPU must do for each Immich request besides running models: parse the
multipart request, read the image header (or decode it when it must), build the tensors
the ensembles take, talk gRPC to Triton, postprocess (NMS, DB boxes, CTC) and answer JSON.
This script measures that cost, per request kind, on the machine it runs on:

* a model cache with the test pack (CLIP ViT-B-32 and buffalo_l with Immich's exact
  tensors, small random weights) and PP-OCRv5 mobile (real weights, real text lines);
* the GPU repository with python-backend stand-ins (``write_standin_repository``: the
  same model names, ensembles and tensors as the TensorRT/DALI repository, so the server
  runs exactly its GPU-mode code), served by the Triton of the ``nvidia-pytriton`` wheel
  that ``immich-trt serve`` launches and supervises, with system shared memory, as in
  the GPU image;
* requests as Immich sends them (:mod:`immich_trt.contract`) on Immich-like previews
  (:func:`immich_trt.tools.bench.load_previews`: shorter side <= 1440 px, JPEG q80):
  ``clip`` (smart search) on every photo of ``--photos``; ``faces`` (detection +
  recognition) on the same previews darkened, with three bright squares the test
  detector finds as faces (so three faces are aligned and embedded per request);
  ``ocr`` (detection + recognition) on every image of ``--ocr-images`` (real text).

Measured: the CPU time (user + system, from ``/proc/PID/stat``, threads included) of the
server's process tree without the ``tritonserver`` subtree (where the models and
stand-ins run, excluded), over ``--requests`` requests per kind sent by
``--concurrency`` closed-loop clients after a warm-up; CPU ms per request and the
requests per second one core can feed. The same for Triton's own process (its gRPC
front end, scheduler and backend plumbing, stand-in IPC included: an upper bound of
what Triton's core costs on a GPU host, where TensorRT and DALI run in that process).

``--workers 1,2`` measures the server with each ``MACHINE_LEARNING_WORKERS`` in turn
(the processes behind the port sharing the one Triton; all of them counted, Triton's
subtree apart); the table then has a row per kind and process count, and the
end-to-end requests/s each delivered.

``--baseline PATH`` repeats the run with a server importing ``immich_trt`` from another
checkout (``PYTHONPATH=PATH``, e.g. the previous release) on the same repository, for
a before/after table. ``--py-spy DIR`` records collapsed stacks of the server during
each kind (``py-spy record --format raw``, all threads) and prints the hottest frames.
CPU time is little affected by niceness, so run it under ``nice -n 19`` on a shared
machine (and say so).

Output: a Markdown table on stdout and in ``--out/report.md`` (machine, date, versions),
``--out/results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from immich_trt import contract  # noqa: E402
from immich_trt.tools.bench import environment, load_previews  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SHARED_DATA = REPO.parent / "shared" / "data"
KINDS = ("clip", "faces", "ocr")
#: The goals of the GPU path: server CPU ms per request (16 cores then feed >= 5,000
#: CLIP requests/s).
GOALS_MS = {"clip": 1.0, "faces": 3.0, "ocr": 10.0}


# ---------------------------------------------------------------- process CPU time


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of ``pid``'s tree without any ``tritonserver`` subtree, CPU seconds
    of the ``tritonserver`` processes alone, their backend stubs excluded)."""
    server, triton = 0.0, 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        if _comm(current).startswith("tritonserver"):
            triton += _cpu_seconds(current)
            continue  # its children are the python-backend stubs: the models
        server += _cpu_seconds(current)
        stack += _children(current)
    return server, triton


# -------------------------------------------------------------------------- inputs


def face_previews(previews) -> list[bytes]:
    """The previews darkened to a quarter, with three bright squares (1/20 of the width,
    at least 32 px) the test pack's detector finds as faces; JPEG q80 as Immich's."""
    from PIL import Image

    out = []
    for preview in previews:
        with Image.open(io.BytesIO(preview.data)) as image:
            pixels = (np.asarray(image.convert("RGB")) * 0.25).astype(np.uint8)
        h, w = pixels.shape[:2]
        side = max(32, w // 20)
        for k in range(3):
            x, y = int(w * (0.15 + 0.3 * k)), int(h * 0.4)
            pixels[y : y + side, x : x + side] = 250
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=contract.PREVIEW_QUALITY)
        out.append(buffer.getvalue())
    return out


def ocr_images(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")]


# ------------------------------------------------------------------------- load


@dataclass
class KindResult:
    kind: str
    requests: int
    server_cpu_s: float
    triton_cpu_s: float
    wall_s: float
    image_bytes: float
    items: float  # faces or text lines per request
    errors: int

    @property
    def server_ms(self) -> float:
        return 1000 * self.server_cpu_s / self.requests

    @property
    def triton_ms(self) -> float:
        return 1000 * self.triton_cpu_s / self.requests


def entries_of(kind: str) -> dict:
    return {
        "clip": contract.clip_visual_entries,
        "faces": lambda: contract.face_entries("buffalo_l"),
        "ocr": contract.ocr_entries,
    }[kind]()


async def send(session, url: str, entries: dict, data: bytes) -> dict | None:
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("entries", json.dumps(entries))
    form.add_field("image", data, filename="blob", content_type="application/octet-stream")
    async with session.post(f"{url}/predict", data=form) as response:
        if response.status != 200:
            return None
        return await response.json()


def count_items(kind: str, answer: dict) -> int:
    if kind == "faces":
        return len(answer.get("facial-recognition", []))
    if kind == "ocr":
        return len(answer.get("ocr", {}).get("text", []))
    return 1


async def run_kind(url: str, pid: int, kind: str, images: list[bytes], requests: int, concurrency: int,
                   warmup: int, py_spy: Path | None) -> KindResult:
    import aiohttp

    entries = entries_of(kind)
    async with aiohttp.ClientSession() as session:
        for data in images[: max(1, warmup)]:  # loads the models, warms caches
            await send(session, url, entries, data)
        counter = iter(range(requests))
        items, errors, sizes = [], 0, []

        async def client() -> None:
            nonlocal errors
            for i in counter:
                data = images[i % len(images)]
                answer = await send(session, url, entries, data)
                sizes.append(len(data))
                if answer is None:
                    errors += 1
                else:
                    items.append(count_items(kind, answer))

        spy = None
        if py_spy is not None:
            py_spy.mkdir(parents=True, exist_ok=True)
            beside = Path(sys.executable).with_name("py-spy")
            spy = subprocess.Popen(
                [str(beside) if beside.is_file() else "py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--nonblocking",
                 "--output", str(py_spy / f"{kind}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            await asyncio.sleep(1.0)
        server0, triton0 = tree_cpu(pid)
        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.monotonic() - started
        server1, triton1 = tree_cpu(pid)
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its file
            spy.wait(60)
    return KindResult(kind, requests, server1 - server0, triton1 - triton0, wall, float(np.mean(sizes)),
                      float(np.mean(items)) if items else 0.0, errors)  # fmt: skip


def hottest(path: Path, top: int = 12) -> list[tuple[str, float]]:
    """Self-time share of the hottest frames in a py-spy raw (collapsed) file."""
    counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frame = stack.split(";")[-1]
        counts[frame] += int(n)
        total += int(n)
    return [(frame, n / max(1, total)) for frame, n in counts.most_common(top)]


# ------------------------------------------------------------------------ server


def prepare(work: Path):
    """The model cache and the stand-in GPU repository; returns (cache, repository,
    the Triton installation of the wheel)."""
    from immich_trt.tools.gpu.ensemble import write_standin_repository
    from immich_trt.tools.testing import offline_settings, prepare_ocr_cache, triton_installation_from_wheel
    from immich_trt.tools.testpack import make_test_pack

    cache = work / "cache"
    if not (cache / "ocr").is_dir():
        prepare_ocr_cache(cache)
        make_test_pack(cache)
    repository = work / "engines"
    write_standin_repository(offline_settings(cache, engines_dir=repository), repository)
    triton = work / "tritonserver"
    if not (triton / "bin" / "tritonserver").exists():
        triton_installation_from_wheel(triton)
    return cache, repository, triton


def measure(label: str, pythonpath: str | None, args, cache: Path, repository: Path, triton: Path,
            inputs: dict[str, list[bytes]], workers: int = 1) -> list[KindResult]:
    from immich_trt.server.workers import wait_for_workers
    from immich_trt.tools.testing import LiveServer

    env = {
        "IMMICH_TRT_PREPROCESS": "gpu",
        "IMMICH_TRT_TRITON_SERVER": str(triton),
        "IMMICH_TRT_ENGINES_DIR": str(repository),
        "IMMICH_TRT_SIDECAR": "false",
        "MACHINE_LEARNING_MODEL_TTL": "0",
        "MACHINE_LEARNING_WORKERS": str(workers),
        "PYTHONPATH": pythonpath or os.environ.get("PYTHONPATH", str(REPO)),
    }
    work = args.out / label.replace(", ", "-").replace(" ", "-")
    work.mkdir(parents=True, exist_ok=True)
    results = []
    # `python -m` puts the working directory first on sys.path: start the server from
    # its own folder, so that PYTHONPATH alone says which checkout it runs
    os.chdir(work)
    with LiveServer(cache, work, env) as server:
        assert server.process is not None
        if workers > 1:  # the clients' connections are spread when they open: all processes must listen
            asyncio.run(wait_for_workers(server.process.pid, workers - 1))
        for kind in args.kinds:
            spy = args.py_spy / label if args.py_spy else None
            result = asyncio.run(run_kind(server.url, server.process.pid, kind, inputs[kind], args.requests[kind],
                                          args.concurrency, args.warmup, spy))  # fmt: skip
            results.append(result)
            print(f"{label:9s} {kind:6s} {result.server_ms:7.2f} ms server CPU/request, {result.triton_ms:6.2f} ms "
                  f"Triton process; {result.requests} requests in {result.wall_s:.1f} s, {result.items:.1f} "
                  f"faces/lines per request, {result.errors} errors", flush=True)  # fmt: skip
            if spy is not None and (spy / f"{kind}.txt").is_file():
                for frame, share in hottest(spy / f"{kind}.txt"):
                    print(f"    {100 * share:5.1f}%  {frame}")
    return results


# ------------------------------------------------------------------------ report


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("aiohttp", "tritonclient", "grpcio", "numpy", "pillow", "opencv-python-headless", "nvidia-pytriton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def table(runs: dict[str, list[KindResult]], cores: int) -> str:
    lines = [
        "| server | request | server CPU ms/request | goal | requests/s per core | "
        f"{cores} cores | Triton process CPU ms | faces or lines | errors | requests/s measured |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, results in runs.items():
        for r in results:
            per_core = 1000 / r.server_ms if r.server_ms > 0 else float("inf")
            items = f"{r.items:.1f}" if r.kind != "clip" else "-"
            lines.append(
                f"| {label} | {r.kind} | {r.server_ms:.2f} | {GOALS_MS[r.kind]:.0f} | {per_core:,.0f} | "
                f"{per_core * cores:,.0f} | {r.triton_ms:.2f} | {items} | {r.errors} | {r.requests / r.wall_s:,.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=SHARED_DATA / "photos")
    parser.add_argument("--ocr-images", type=Path, default=SHARED_DATA / "ocr")
    parser.add_argument("--out", type=Path, default=Path("bench-results/gpu-cpu-budget"))
    parser.add_argument("--requests", default="clip=600,faces=300,ocr=60",
                        help="requests per kind, e.g. clip=600,faces=300,ocr=60")  # fmt: skip
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=8, help="requests per kind before measuring")
    parser.add_argument("--cores", type=int, default=16, help="the GPU host of the projection")
    parser.add_argument("--baseline", default=None, help="PYTHONPATH of a checkout to compare (before)")
    parser.add_argument("--py-spy", type=Path, default=None, help="record py-spy stacks into this folder")
    parser.add_argument("--workers", default="1",
                        help="MACHINE_LEARNING_WORKERS values to measure in turn, e.g. 1,2")  # fmt: skip
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",") if w]
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.requests = {k: int(v) for k, v in (item.split("=") for item in args.requests.split(","))}
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()

    cache, repository, triton = prepare(args.out / "work")
    previews, _ = load_previews(args.photos)
    inputs = {"clip": [p.data for p in previews], "faces": face_previews(previews), "ocr": ocr_images(args.ocr_images)}
    runs: dict[str, list[KindResult]] = {}
    if args.baseline:
        runs["before"] = measure("before", args.baseline, args, cache, repository, triton, inputs)
    for workers in args.workers:
        label = "after" if args.baseline else "this"
        if len(args.workers) > 1:
            label += f", {workers} process" + ("es" if workers > 1 else "")
        runs[label] = measure(label, None, args, cache, repository, triton, inputs, workers)
    host = environment()
    report = "\n".join([
        f"Machine: {host['machine']}, {host['cpu']}, {host['cores']}, {host['memory']}, {platform.platform()}; "
        f"date {host['date']}",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"Requests per kind: {args.requests}; concurrency {args.concurrency}; warm-up {args.warmup}; "
        f"inputs: {len(inputs['clip'])} previews (mean {np.mean([len(d) for d in inputs['clip']]) / 1024:.0f} KiB), "
        f"{len(inputs['ocr'])} OCR images",
        "",
        table(runs, args.cores),
    ])  # fmt: skip
    (args.out / "report.md").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {label: [r.__dict__ | {"server_ms": r.server_ms, "triton_ms": r.triton_ms} for r in results]
         for label, results in runs.items()}, indent=2))  # fmt: skip
    print()
    print(report)
    return 1 if any(r.errors for results in runs.values() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
