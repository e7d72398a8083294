"""``immich-trt bench`` and the request builders it shares with compat_tests: the pure
parts against hand-computed values, the job mix against a stand-in server on loopback that
records what arrives, then one short run against a live server."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from immich_trt import contract
from immich_trt.cli import main
from immich_trt.tools import bench

# ------------------------------------------------------------- request builders


def test_entries_are_the_servers_defaults_as_json_stringify_writes_them() -> None:
    assert contract.js_json(contract.clip_visual_entries()) == '{"clip":{"visual":{"modelName":"ViT-B-32__openai"}}}'
    assert (
        contract.js_json(contract.clip_textual_entries())
        == '{"clip":{"textual":{"modelName":"ViT-B-32__openai","options":{}}}}'
    )
    assert (
        contract.js_json(contract.clip_textual_entries(language="en-null"))
        == '{"clip":{"textual":{"modelName":"ViT-B-32__openai","options":{"language":"en-null"}}}}'
    )
    assert contract.js_json(contract.face_entries()) == (
        '{"facial-recognition":{"detection":{"modelName":"buffalo_l","options":{"minScore":0.7}},'
        '"recognition":{"modelName":"buffalo_l"}}}'
    )
    assert contract.js_json(contract.ocr_entries()) == (
        '{"ocr":{"detection":{"modelName":"PP-OCRv5_mobile","options":{"minScore":0.5,"maxResolution":736}},'
        '"recognition":{"modelName":"PP-OCRv5_mobile","options":{"minScore":0.8}}}}'
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0, "1"), (0.7, "0.7"), (736, "736"), (-0.0, "0"), (1e-7, "1e-7"), (1.5e-7, "1.5e-7"),
        (0.000001, "0.000001"), (1e21, "1e+21"), (1.5e21, "1.5e+21"),
        (123456789012345680000.0, "123456789012345680000"),
        (0.1 + 0.2, "0.30000000000000004"), (float("nan"), "null"), (float("inf"), "null"), (100.5, "100.5"),
    ],
)  # fmt: skip
def test_numbers_as_javascript_writes_them(value: float, expected: str) -> None:
    assert contract.js_number(value) == expected


def test_json_stringify_strings_and_structure() -> None:
    assert contract.js_json({"b": [True, None, 'é\n"x"'], "a": {}}) == '{"b":[true,null,"é\\n\\"x\\""],"a":{}}'


def test_multipart_body_is_byte_for_byte_nodes() -> None:
    body, content_type = contract.multipart_body(
        {"a": 1}, image=b"\xff\xd8JPEG", boundary="----formdata-undici-012345678901"
    )
    assert content_type == "multipart/form-data; boundary=----formdata-undici-012345678901"
    assert body == (
        b"------formdata-undici-012345678901\r\n"
        b'Content-Disposition: form-data; name="entries"\r\n\r\n{"a":1}\r\n'
        b"------formdata-undici-012345678901\r\n"
        b'Content-Disposition: form-data; name="image"; filename="blob"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n\xff\xd8JPEG\r\n"
        b"------formdata-undici-012345678901--"
    )
    body, _ = contract.multipart_body("raw entries", text="a\nb\r\nc", boundary="B")
    assert body == (
        b'--B\r\nContent-Disposition: form-data; name="entries"\r\n\r\nraw entries\r\n'
        b'--B\r\nContent-Disposition: form-data; name="text"\r\n\r\na\r\nb\r\nc\r\n--B--'
    )
    body, _ = contract.multipart_body(None, image=b"x", boundary="B")
    assert b'name="entries"' not in body
    assert contract.node_boundary().startswith("----formdata-undici-0") and len(contract.node_boundary()) == 32


def test_predict_url_resolves_as_new_url() -> None:
    assert contract.predict_url("http://h:3003") == "http://h:3003/predict"
    assert contract.predict_url("http://h:3003/") == "http://h:3003/predict"
    assert contract.predict_url("http://h/ml/") == "http://h/ml/predict"


async def test_predict_sends_the_body_the_server_parses(aiohttp_client) -> None:
    from aiohttp import web

    seen = {}

    async def handler(request: web.Request) -> web.Response:
        seen["content_type"] = request.headers["Content-Type"]
        seen["fields"] = {k: (v.file.read() if hasattr(v, "file") else v) for k, v in (await request.post()).items()}
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/predict", handler)
    client = await aiohttp_client(app)
    status, content_type, body = await contract.predict(
        client.session, str(client.make_url("/")), contract.ocr_entries(), image=b"\x00\x01"
    )
    assert (status, json.loads(body)) == (200, {"ok": True}) and content_type.startswith("application/json")
    assert seen["content_type"].startswith("multipart/form-data; boundary=----formdata-undici-0")
    assert list(seen["fields"]) == ["entries", "image"]
    assert json.loads(seen["fields"]["entries"]) == contract.ocr_entries()
    assert seen["fields"]["image"] == b"\x00\x01"


# ------------------------------------------------------------------- bench inputs


def test_parse_target() -> None:
    assert bench.parse_target("stock=http://h:3003") == bench.Target("stock", "http://h:3003")
    assert bench.parse_target("ours=http://h:3004/,pid=42") == bench.Target("ours", "http://h:3004/", (42,))
    assert bench.parse_target("ours=http://h:3004,pid=42+43").pids == (42, 43)
    for bad in ("http://h:3003", "a=", "a=h:3003", "a=http://h,pid=x", "a=http://h,port=1"):
        with pytest.raises(ValueError):
            bench.parse_target(bad)


def test_only_loopback_targets_are_measured(capsys) -> None:
    import argparse

    for url in ("http://127.0.0.1:3003", "http://127.9.0.1:3003/", "http://localhost:3003", "http://[::1]:3003",
                "http://[::ffff:127.0.0.1]:3003"):
        assert bench.is_loopback_url(url), url
    for url in ("http://192.0.2.1:3003", "http://10.0.0.2:3003", "http://stock:3003", "http://[2001:db8::1]:3003",
                "http://[::ffff:192.0.2.1]:3003", "http://0.0.0.0:3003"):
        assert not bench.is_loopback_url(url), url
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--target", "ours=http://127.0.0.1:9", "--target", "stock=http://192.0.2.1:3003",
                              "--tasks", "clip-text", "--out", "unused"])
    assert bench.run(args) == 2  # refused before any request is sent
    assert "http://192.0.2.1:3003: the benchmark measures servers you run on this machine" in capsys.readouterr().err


def test_parse_levels_and_tasks() -> None:
    assert bench.parse_levels("1,2, 4,8") == (1, 2, 4, 8)
    assert bench.parse_tasks("ocr,faces") == ("ocr", "faces")
    for bad in ("", "0", "1,-2"):
        with pytest.raises(ValueError):
            bench.parse_levels(bad)
    with pytest.raises(ValueError):
        bench.parse_tasks("clip")


def test_parse_job_mix() -> None:
    assert bench.parse_job_mix("clip-visual=2,faces=2,ocr=1") == bench.DEFAULT_JOB_MIX
    assert bench.DEFAULT_JOB_MIX == (("clip-visual", 2), ("faces", 2), ("ocr", 1))  # Immich's defaults
    assert bench.parse_job_mix(" ocr = 3 , faces=1,") == (("ocr", 3), ("faces", 1))
    for bad, message in [
        ("clip-text=1", "'clip-text' is not a job; choose from clip-visual,faces,ocr"),
        ("faces=0", "faces needs a concurrency >= 1"),
        ("faces", "faces needs a concurrency >= 1"),
        ("faces=two", "faces needs a concurrency >= 1"),
        ("faces=1,faces=2", "faces is given twice"),
        ("", "expected TASK=N,..."),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            bench.parse_job_mix(bad)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((4000, 3000), (1920, 1440)),
        ((3000, 4000), (1440, 1920)),
        ((3001, 2000), (2161, 1440)),  # 3001 * 0.72 = 2160.72
        ((1000, 800), (1000, 800)),  # never enlarged
        ((5000, 1440), (5000, 1440)),  # the shorter side is already 1440
        ((1441, 1441), (1440, 1440)),
    ],
)
def test_preview_dimensions_fit_outside_without_enlargement(size, expected) -> None:
    assert bench.preview_dimensions(*size) == expected


def _jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    image = Image.new("RGB", (width, height), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, width // 2, height // 2))
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def test_make_preview_is_upright_resized_jpeg_80() -> None:
    data = bench.make_preview(_jpeg(3000, 2000, orientation=6))  # rotated 90° by EXIF
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == (1440, 2160)
        assert image.getexif().get(0x0112) is None
        # the blue quarter (top left before rotation) is now top right
        assert image.getpixel((1300, 100))[2] > 150 and image.getpixel((100, 100))[0] > 150
    reference = io.BytesIO()
    Image.open(io.BytesIO(data)).save(reference, format="JPEG", quality=80)
    assert abs(len(reference.getvalue()) - len(data)) < 0.1 * len(data)  # quality 80, not 95
    small = bench.make_preview(_jpeg(320, 200))
    assert Image.open(io.BytesIO(small)).size == (320, 200)


def test_load_previews_and_queries(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jpg").write_bytes(_jpeg(64, 48))
    (tmp_path / "a.png").write_bytes(_jpeg(10, 10))  # a JPEG named .png: Pillow reads it anyway
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    previews, skipped = bench.load_previews(tmp_path)
    assert [(p.name, p.width, p.height) for p in previews] == [("a.png", 10, 10), ("sub/b.jpg", 64, 48)]
    assert skipped == ["broken.jpg"]
    queries = tmp_path / "q.txt"
    queries.write_text("# comment\na dog\n\nHund am Strand\tde\n", encoding="utf-8")
    assert bench.load_queries(queries, "en") == [("a dog", "en"), ("Hund am Strand", "de")]
    assert bench.load_queries(None, None)[0] == (bench.DEFAULT_QUERIES[0], None)


def test_workload_cycles_over_the_inputs() -> None:
    previews = [bench.Preview("x.jpg", b"X", 1, 1), bench.Preview("y.jpg", b"Y", 1, 1)]
    models = {"clip": "ViT-B-32__openai", "faces": "buffalo_l", "ocr": "PP-OCRv5_mobile"}
    ocr = bench.Workload("ocr", previews, [], models)
    assert [ocr.request(i).key for i in range(3)] == ["x.jpg", "y.jpg", "x.jpg"]
    assert ocr.request(1) == bench.Request("y.jpg", contract.ocr_entries(), image=b"Y")
    text = bench.Workload("clip-text", [], [("a", "de"), ("b", None)], models)
    assert text.request(3) == bench.Request("q1", contract.clip_textual_entries(), text="b")
    assert text.request(0).entries == contract.clip_textual_entries(language="de")
    with pytest.raises(ValueError):
        bench.Workload("faces", [], [], models)


# ------------------------------------------------------------------------ metrics


def test_percentile_is_numpys_linear_interpolation() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        values = rng.exponential(size=n).tolist()
        for q in (0, 50, 95, 99, 100):
            assert bench.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert bench.percentile([], 50) is None
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_ratio() -> None:
    assert bench.ratio(3.0, 2.0) == 1.5
    assert bench.ratio(None, 2.0) is None and bench.ratio(1.0, None) is None and bench.ratio(1.0, 0) is None


def test_cell_row_and_ratios() -> None:
    base = bench.Cell("A", "ocr", 2, latencies=[0.1, 0.2, 0.3, 0.4], wall_s=2.0, cpu_s=4.0, rss_bytes=100 * 2**20)
    cell = bench.Cell("B", "ocr", 2, latencies=[0.05] * 8, errors=1, wall_s=2.0, cpu_s=4.0, rss_bytes=50 * 2**20)
    row = cell.row(base)
    assert row["requests"] == 9 and row["errors"] == 1
    assert row["throughput_rps"] == 4.0 and base.row(base)["throughput_rps"] == 2.0
    assert row["throughput_ratio"] == 2.0
    assert row["p50_ms"] == 50.0 and base.row(None)["p95_ms"] == pytest.approx(385.0)
    assert row["p95_ratio"] == pytest.approx(50 / 385, abs=1e-3)
    assert row["rss_mb"] == 50.0 and row["rss_ratio"] == 0.5
    assert row["cpu_ms_per_request"] == 500.0 and row["cpu_per_request_ratio"] == 0.5
    no_pid = bench.Cell("C", "ocr", 2, latencies=[0.1], wall_s=1.0).row(base)
    assert no_pid["rss_mb"] is None and no_pid["rss_ratio"] is None and no_pid["cpu_per_request_ratio"] is None


def test_process_tree_counts_descendants(tmp_path: Path) -> None:
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); " \
        "x = 0\nfor i in range(3_000_000): x += i\nprint('ready', flush=True); time.sleep(30)"  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        tree = bench.ProcessTree([parent.pid])
        deadline = time.monotonic() + 5
        while len(tree.pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = tree.pids()
        assert len(pids) == 2 and parent.pid in pids
        alone = bench.ProcessTree([parent.pid]).rss_bytes([parent.pid])
        assert tree.rss_bytes() > alone > 1 * 2**20
        assert tree.cpu_seconds() > 0.05  # the loop above
        assert bench.ProcessTree([2**22 + 12345]).pids() == []
    finally:
        for pid in bench.ProcessTree([parent.pid]).pids():
            if pid != parent.pid:
                os.kill(pid, 9)
        parent.kill()
        parent.wait()


# ---------------------------------------------------------------------- agreement


def _clip(values) -> bytes:
    return json.dumps({"clip": json.dumps(values)}).encode()


def _faces(*faces) -> bytes:
    return json.dumps(
        {
            "facial-recognition": [
                {"boundingBox": dict(zip(("x1", "y1", "x2", "y2"), box)), "embedding": json.dumps(emb), "score": 0.9}
                for box, emb in faces
            ]
        }
    ).encode()


def _ocr_answer(*lines, width: int = 200, height: int = 100) -> dict:
    """An OCR answer of ``(text, (x1, y1, x2, y2) in px)`` lines (axis-aligned quads)."""
    box = []
    for _, (x1, y1, x2, y2) in lines:
        box += [x1 / width, y1 / height, x2 / width, y1 / height, x2 / width, y2 / height, x1 / width, y2 / height]
    n = len(lines)
    ocr = {"box": box, "text": [t for t, _ in lines], "boxScore": [0.9] * n, "textScore": [0.9] * n}
    return {"ocr": ocr, "imageWidth": width, "imageHeight": height}


def _ocr(*texts) -> bytes:
    return json.dumps(_ocr_answer(*((t, (10, 20 * i, 90, 20 * i + 15)) for i, t in enumerate(texts)))).encode()


def test_box_iou_and_matching() -> None:
    a = {"x1": 0.0, "y1": 0.0, "x2": 10.0, "y2": 10.0}
    assert bench.box_iou(a, a) == 1.0
    assert bench.box_iou(a, {"x1": 5.0, "y1": 0.0, "x2": 15.0, "y2": 10.0}) == pytest.approx(50 / 150)
    assert bench.box_iou(a, {"x1": 20.0, "y1": 20.0, "x2": 30.0, "y2": 30.0}) == 0.0
    faces_a = [{"boundingBox": a}, {"boundingBox": {"x1": 100.0, "y1": 100.0, "x2": 110.0, "y2": 110.0}}]
    faces_b = [{"boundingBox": {"x1": 101.0, "y1": 100.0, "x2": 111.0, "y2": 110.0}}, {"boundingBox": a}]
    matches = bench.match_faces(faces_a, faces_b)
    assert len(matches) == 2
    assert matches[0][0] is faces_a[0] and matches[0][1] is faces_b[1] and matches[0][2] == 1.0
    assert matches[1][2] == pytest.approx(90 / 110)


def test_agreement_on_crafted_answers() -> None:
    answers = {
        ("clip-visual", "x"): {"A": _clip([1.0, 0.0]), "B": _clip([1.0, 0.0])},
        ("clip-visual", "y"): {"A": _clip([1.0, 0.0]), "B": _clip([1.0, 1.0])},
        ("clip-visual", "z"): {"A": _clip([1.0, 0.0])},  # B failed: not compared
        ("faces", "x"): {
            "A": _faces(((0, 0, 10, 10), [1.0, 0.0]), ((50, 50, 60, 60), [0.0, 1.0])),
            "B": _faces(((5, 0, 15, 10), [1.0, 0.0]), ((50, 50, 60, 60), [0.0, 1.0])),
        },
        ("faces", "y"): {"A": _faces(((0, 0, 10, 10), [1.0, 0.0])), "B": _faces()},
        ("ocr", "x"): {"A": _ocr("a", "b"), "B": _ocr("a", "b")},
        ("ocr", "y"): {"A": _ocr("a"), "B": _ocr("A")},
        ("ocr", "z"): {"A": _ocr("a"), "B": b"{}"},
    }
    clip, faces, ocr = bench.agreements(answers, ["A", "B"], ["clip-visual", "faces", "ocr"])
    assert clip.items == 2 and min(clip.cosines) == pytest.approx(2**-0.5)
    assert clip.summary() == "cosine min 0.707107, mean 0.853553"
    assert faces.items == 2 and faces.equal == 1 and faces.unmatched_faces == 1
    assert sorted(faces.ious) == [pytest.approx(1 / 3), 1.0] and min(faces.cosines) == pytest.approx(1.0)
    assert "face count equal 1/2" in faces.summary() and "box IoU min 0.3333" in faces.summary()
    assert ocr.items == 2 and ocr.equal == 1 and ocr.malformed == 1
    assert ocr.summary() == (
        "texts equal 1/2 (50.0%); lines identical 2/3 (66.7%), box offset max 0.00 px; 1 malformed answers"
    )
    assert "box offset max 5.00 px" in faces.summary() and max(faces.offsets) == 5.0
    assert math.isnan(bench.cosine([1.0, 0.0], [1.0, 0.0, 0.0]))
    assert bench.agreements(answers, ["A"], ["ocr"]) == []


def test_ocr_lines_are_paired_by_box_and_counted_identical_by_text() -> None:
    base = _ocr_answer(("SALE", (10, 10, 90, 30)), ("open 9-5", (10, 40, 120, 60)), ("tel", (10, 70, 50, 90)))
    # reordered, one line 1.5 px off (still the same line), one text misread, one line missed, one extra
    other = _ocr_answer(
        ("open 9-5", (11.5, 40, 121.5, 60)), ("SALE", (10, 10, 90, 30)), ("te1", (10, 70, 50, 90)),
        ("noise", (150, 10, 190, 20)),
    )  # fmt: skip
    identical, lines, offsets = bench.match_ocr_lines(base, other)
    assert (identical, lines) == (2, 4)  # SALE and "open 9-5"; the larger answer has 4 lines
    assert sorted(offsets) == [0.0, 0.0, pytest.approx(1.5)]
    assert bench.match_ocr_lines(base, _ocr_answer()) == (0, 3, [])  # every line missed
    assert bench.match_ocr_lines(_ocr_answer(), _ocr_answer()) == (0, 0, [])
    far = _ocr_answer(("SALE", (10, 25, 90, 45)))  # overlaps SALE by IoU 0.2: another line, not identical
    assert bench.match_ocr_lines(_ocr_answer(("SALE", (10, 10, 90, 30))), far)[0] == 0
    lines_px = bench.ocr_lines(base)
    assert lines_px[1][1] == {"x1": 10.0, "y1": 40.0, "x2": 120.0, "y2": 60.0}  # fractions back to pixels

    agreement = bench.Agreement("fast", "ocr")
    agreement.add(json.dumps(base).encode(), json.dumps(other).encode())
    agreement.add(json.dumps(base).encode(), json.dumps(base).encode())
    assert (agreement.identical_lines, agreement.lines, agreement.identical_line_share) == (5, 7, 5 / 7)
    assert "lines identical 5/7 (71.4%), box offset max 1.50 px" in agreement.summary()
    broken = dict(base, ocr=dict(base["ocr"], box=[0.1] * 7))  # boxes and texts disagree
    agreement.add(json.dumps(base).encode(), json.dumps(broken).encode())
    assert agreement.malformed == 1 and agreement.items == 2
    assert bench.Agreement("x", "ocr").identical_line_share is None
    plain = {"ocr": {"text": ["a", "b"], "box": []}}  # no boxes: lines pair in reading order
    assert bench.match_ocr_lines(plain, {"ocr": {"text": ["a", "c", "d"], "box": []}}) == (1, 3, [])


def test_face_box_offset_is_the_largest_coordinate_difference() -> None:
    a = {"x1": 10.0, "y1": 20.0, "x2": 50.0, "y2": 70.0}
    assert bench.box_offset(a, a) == 0.0
    assert bench.box_offset(a, {"x1": 11.0, "y1": 18.5, "x2": 50.0, "y2": 70.25}) == 1.5
    agreement = bench.Agreement("fast", "faces")
    agreement.add(_faces(((10, 20, 50, 70), [1.0, 0.0])), _faces(((11, 18.5, 50, 70.25), [0.99, 0.1])))
    assert agreement.offsets == [1.5] and agreement.equal == 1
    assert "box offset max 1.50 px, embedding cosine min 0.994" in agreement.summary()


# ------------------------------------------------------------------------ reports


def _rows() -> list[dict]:
    base = bench.Cell("stock", "ocr", 1, latencies=[0.5, 0.5], wall_s=1.0, cpu_s=1.0, rss_bytes=2**30)
    ours = bench.Cell("ours", "ocr", 1, latencies=[0.25] * 4, wall_s=1.0)
    return [base.row(base), ours.row(base)]


def test_csv_writer(tmp_path: Path) -> None:
    bench.write_csv(tmp_path / "r.csv", _rows())
    with open(tmp_path / "r.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == bench.CSV_FIELDS
    assert rows[1]["target"] == "ours" and float(rows[1]["throughput_ratio"]) == 2.0
    assert rows[1]["rss_mb"] == "" and rows[0]["rss_mb"] == "1024.0"


def test_markdown_tables_and_file(tmp_path: Path) -> None:
    tables = bench.markdown_tables(_rows(), ["stock", "ours"], ["ocr"], [1])
    assert "### Throughput ratio against stock" in tables
    assert "| ours | ocr | 2.00× |" in tables
    assert "| 1 | ours | 4.00 | 2.00× | 250.0 | 250.0 | 250.0 | 0.50× | 0/4 | – | – | – |" in tables
    assert "| 1 | stock | 2.00 | 1.00× | 500.0 |" in tables and "| 1024 | 1.0 | 500 |" in tables
    targets = [bench.Target("stock", "http://a:3003", (1,)), bench.Target("ours", "http://b:3003")]
    bench.write_markdown(tmp_path / "r.md", bench.environment(), {"tasks": "ocr"}, targets, tables, "", {})
    text = (tmp_path / "r.md").read_text()
    for needle in (
        "# immich-trt bench",
        "- cpu: ",
        "- cores: ",
        "- python: ",
        "- onnxruntime: ",
        "- date: ",
        "| stock | http://a:3003 | yes |",
    ):
        assert needle in text


def _job_mixes() -> tuple[bench.JobMix, bench.JobMix]:
    def queues(target: str, scale: float) -> dict[str, bench.Cell]:
        return {
            "clip-visual": bench.Cell(target, "clip-visual", 2, latencies=[0.1 * scale] * 10, wall_s=1.0 * scale),
            "ocr": bench.Cell(target, "ocr", 1, latencies=[0.4 * scale] * 10, wall_s=5.0 * scale),
        }

    base = bench.JobMix("stock", queues("stock", 1.0), assets=10, wall_s=5.0, cpu_s=5.0, rss_bytes=2**30)
    ours = bench.JobMix("ours", queues("ours", 0.5), assets=10, wall_s=2.5, cpu_s=2.5, rss_bytes=2**29)
    ours.queues["ocr"].errors = 1
    return base, ours


def test_job_mix_rows_and_tables() -> None:
    base, ours = _job_mixes()
    rows = base.rows(base) + ours.rows(base)
    assert [(r["target"], r["task"], r["concurrency"]) for r in rows] == [
        ("stock", "job-mix", 3), ("stock", "clip-visual", 2), ("stock", "ocr", 1),
        ("ours", "job-mix", 3), ("ours", "clip-visual", 2), ("ours", "ocr", 1),
    ]  # fmt: skip
    mix = rows[3]
    assert (mix["assets"], mix["requests"], mix["errors"], mix["seconds"]) == (10, 21, 1, 2.5)
    assert mix["assets_per_s"] == 4.0 and rows[0]["assets_per_s"] == 2.0 and mix["assets_ratio"] == 2.0
    assert mix["cpu_s_per_asset"] == 0.25 and mix["cpu_per_asset_ratio"] == 0.5
    assert mix["rss_mb"] == 512.0 and mix["rss_ratio"] == 0.5
    ocr = rows[5]
    assert ocr["throughput_rps"] == 4.0 and ocr["throughput_ratio"] == 2.0  # 10 answered in 2.5 s against 2/s
    assert ocr["p95_ms"] == 200.0 and ocr["p95_ratio"] == 0.5 and ocr["errors"] == 1
    assert ocr["rss_mb"] is None and ocr["cpu_s"] is None and ocr["client_cpu_s"] is None  # shared: on job-mix only
    tables = bench.job_mix_tables(rows, ["stock", "ours"], (("clip-visual", 2), ("ocr", 1)))
    lines = tables.splitlines()
    assert lines[0] == (
        "| target | assets/s | × stock | clip-visual p95 ms | × stock | ocr p95 ms | × stock | CPU s/asset "
        "| peak RSS MB | RSS × stock | errors |"
    )
    assert lines[2] == "| stock | 2.00 | 1.00× | 100.0 | 1.00× | 400.0 | 1.00× | 0.500 | 1024 | 1.00× | 0/20 |"
    assert lines[3] == "| ours | 4.00 | 2.00× | 50.0 | 0.50× | 200.0 | 0.50× | 0.250 | 512 | 0.50× | 1/21 |"
    assert "| ours | ocr | 1 | 4.00 | 2.00× | 200.0 | 200.0 | 200.0 | 1/11 |" in lines


# -------------------------------------------------------------------------- CLI


def test_cli_rejects_bad_arguments(tmp_path: Path, capsys) -> None:
    assert main(["bench", "--target", "nourl", "--images", str(tmp_path)]) == 2
    assert main(["bench", "--target", "a=http://127.0.0.1:9", "--tasks", "ocr"]) == 2  # no --images
    assert (
        main(["bench", "--target", "a=http://127.0.0.1:9", "--target", "a=http://127.0.0.1:9", "--tasks", "clip-text"])
        == 2
    )
    assert (
        main(["bench", "--target", "a=http://127.0.0.1:9", "--images", str(tmp_path), "--tasks", "ocr"]) == 2
    )  # no images
    assert "bench:" in capsys.readouterr().err


def test_cli_rejects_bad_job_mix_arguments(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.jpg").write_bytes(_jpeg(64, 48))
    start = ["bench", "--target", "a=http://127.0.0.1:9", "--no-progress", "--out", str(tmp_path / "out")]
    for extra, line in [
        (["--job-mix", "clip-text=1"], "bench: job mix 'clip-text=1': 'clip-text' is not a job; choose from "
         "clip-visual,faces,ocr"),
        (["--job-mix", "faces=0,ocr=1"], "bench: job mix 'faces=0,ocr=1': faces needs a concurrency >= 1, as in faces=2"),
        (["--job-mix", "ocr=1,ocr=2"], "bench: job mix 'ocr=1,ocr=2': ocr is given twice"),
        (["--job-mix-assets", "0"], "bench: --job-mix-assets must be >= 1"),
    ]:  # fmt: skip
        assert main(start + ["--images", str(tmp_path)] + extra) == 2, extra
        assert capsys.readouterr().err.strip() == line
    assert main(start + ["--scenario", "job-mix"]) == 2
    assert capsys.readouterr().err.strip() == "bench: --images is needed for the job mix (--scenario job-mix)"
    with pytest.raises(SystemExit) as exit_info:
        main(start + ["--images", str(tmp_path), "--scenario", "mix"])
    assert exit_info.value.code == 2
    assert "argument --scenario: invalid choice: 'mix'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any request is sent


class StandInServer:
    """A stand-in ML server on loopback, in a thread of its own: ``/NAME/predict`` answers for
    target NAME after a delay per task, with answers derived from the image (or text). It
    records every request in arrival order (target, task, SHA-1 of the image, arrival and
    answer time on ``time.perf_counter``), the most requests in flight per (target, task) and
    per target, and the most targets served at once. ``fail``: (target, task, digest) answered 500."""

    def __init__(self, delays: dict[str, float], fail: frozenset = frozenset()) -> None:
        self.delays = delays
        self.fail = fail
        self.log: list[tuple[str, str, str, float, float]] = []
        self.in_flight: Counter = Counter()
        self.max_in_flight: Counter = Counter()
        self.targets_at_once = 0

    async def _predict(self, request):
        from aiohttp import web

        arrived = time.perf_counter()
        target = request.match_info["target"]
        form = await request.post()
        entries = json.loads(form["entries"])
        if "clip" in entries:
            task = "clip-text" if "textual" in entries["clip"] else "clip-visual"
        else:
            task = "faces" if "facial-recognition" in entries else "ocr"
        digest = hashlib.sha1(form["image"].file.read() if "image" in form else form["text"].encode()).hexdigest()
        keys = ((target, task), target)
        for key in keys:
            self.in_flight[key] += 1
            self.max_in_flight[key] = max(self.max_in_flight[key], self.in_flight[key])
        serving = sum(1 for key, n in self.in_flight.items() if n and isinstance(key, str))
        self.targets_at_once = max(self.targets_at_once, serving)
        try:
            await asyncio.sleep(self.delays[task])
        finally:
            for key in keys:
                self.in_flight[key] -= 1
        self.log.append((target, task, digest, arrived, time.perf_counter()))
        if (target, task, digest) in self.fail:
            return web.json_response({"detail": "stand-in failure"}, status=500)
        vector = json.dumps([int(c, 16) / 15.0 for c in digest[:8]])
        if task.startswith("clip"):
            return web.json_response({"clip": vector})
        if task == "faces":
            box = {"x1": 1.0, "y1": 2.0, "x2": 30.0, "y2": 40.0}
            return web.json_response({"facial-recognition": [{"boundingBox": box, "embedding": vector, "score": 0.9}]})
        return web.json_response({"ocr": {"text": ["receipt", digest[:6]], "box": [], "boxScore": [], "textScore": []}})

    def __enter__(self) -> StandInServer:
        from aiohttp import web

        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            app = web.Application()
            app.router.add_post("/{target}/predict", self._predict)
            runner = web.AppRunner(app, access_log=None)
            self._loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        assert ready.wait(10), "the stand-in server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def segments(self) -> list[tuple[str, list[tuple]]]:
        """The log cut where the target changes: (target, its consecutive requests)."""
        out: list[tuple[str, list[tuple]]] = []
        for entry in self.log:
            if out and out[-1][0] == entry[0]:
                out[-1][1].append(entry)
            else:
                out.append((entry[0], [entry]))
        return out


def _images(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:02d}.jpg").write_bytes(_jpeg(64 + 8 * i, 48))
    return folder


JOB_MIX_DELAYS = {"clip-visual": 0.04, "faces": 0.04, "ocr": 0.08, "clip-text": 0.01}


def test_job_mix_runs_immichs_queues_at_once_then_the_tasks(tmp_path: Path, capsys) -> None:
    images, out, k, rounds = _images(tmp_path / "images", 6), tmp_path / "out", 6, 2
    with StandInServer(JOB_MIX_DELAYS) as server:
        argv = [
            "bench", "--target", f"A={server.url}/A/,pid={os.getpid()}", "--target", f"B={server.url}/B/",
            "--images", str(images), "--tasks", "ocr", "--concurrency", "1", "--requests-per-level", "2",
            "--rounds", str(rounds), "--warmup", "1", "--out", str(out), "--no-progress",
        ]  # fmt: skip
        assert main(argv) == 0
    stdout = capsys.readouterr().out

    # arrival order: warm-ups (task by task, targets in turn), job-mix rounds A B A B, then the per-task rounds
    segments = server.segments()
    assert [(t, len(entries)) for t, entries in segments] == (
        [("A", 1), ("B", 1)] * 3 + [("A", 3 * k), ("B", 3 * k)] * rounds + [("A", 1), ("B", 1)] * rounds
    )
    assert [entries[0][1] for _, entries in segments[:6]] == ["clip-visual"] * 2 + ["faces"] * 2 + ["ocr"] * 2
    digests = {entry[2] for _, entries in segments[6 : 6 + 2 * rounds] for entry in entries}
    assert len(digests) == k
    for _, entries in segments[6 : 6 + 2 * rounds]:  # every queue sends each of the K assets once a round
        assert Counter((task, digest) for _, task, digest, *_ in entries) == {
            (task, d): 1 for task in ("clip-visual", "faces", "ocr") for d in digests
        }
    assert all(entry[1] == "ocr" for _, entries in segments[6 + 2 * rounds :] for entry in entries)
    # each queue at its concurrency, the three at once, one target at a time
    for target in "AB":
        assert [server.max_in_flight[(target, t)] for t in ("clip-visual", "faces", "ocr")] == [2, 2, 1]
        assert server.max_in_flight[target] == 5
    assert server.targets_at_once == 1

    with open(out / "jobmix.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == bench.JOB_MIX_CSV_FIELDS
    assert [(r["target"], r["task"], r["concurrency"]) for r in rows] == [
        (t, task, c) for t in "AB" for task, c in (("job-mix", "5"), ("clip-visual", "2"), ("faces", "2"), ("ocr", "1"))
    ]
    for target in "AB":
        mix, *queues = [r for r in rows if r["target"] == target]
        assert (mix["assets"], mix["requests"], mix["errors"]) == (str(k * rounds), str(3 * k * rounds), "0")
        seconds = float(mix["seconds"])
        assert float(mix["assets_per_s"]) == pytest.approx(k * rounds / seconds, rel=2e-3)
        # the wall time of a round spans its first arrival to its last answer at the server, and little more
        served = sum(es[-1][4] - es[0][3] for t, es in segments[6 : 6 + 2 * rounds] if t == target)
        assert served <= seconds < served + 0.5 * rounds
        by_task = {r["task"]: r for r in queues}
        for row in queues:
            assert (row["requests"], row["errors"]) == (str(k * rounds), "0")
            assert float(row["throughput_rps"]) == pytest.approx(k * rounds / float(row["seconds"]), rel=2e-3)
        # OCR, one at a time, is the longest queue: it ends the round; CLIP's two workers end long before
        assert float(by_task["ocr"]["seconds"]) >= k * rounds * JOB_MIX_DELAYS["ocr"]
        assert float(by_task["clip-visual"]["seconds"]) < float(by_task["ocr"]["seconds"]) <= seconds
        assert float(by_task["ocr"]["p50_ms"]) >= 1000 * JOB_MIX_DELAYS["ocr"]
    a_mix = rows[0]
    assert float(a_mix["rss_mb"]) > 10 and float(a_mix["cpu_s"]) > 0 and float(a_mix["assets_ratio"]) == 1.0
    assert float(a_mix["cpu_s_per_asset"]) == pytest.approx(float(a_mix["cpu_s"]) / (k * rounds), abs=1e-3)
    assert rows[4]["rss_mb"] == "" and rows[4]["cpu_s"] == "" and float(rows[4]["assets_ratio"]) > 0

    with open(out / "results.csv", newline="") as handle:
        assert [(r["target"], r["task"], r["requests"]) for r in csv.DictReader(handle)] == [
            ("A", "ocr", "2"), ("B", "ocr", "2")
        ]  # fmt: skip
    text = (out / "results.md").read_text()
    order = [
        "# immich-trt bench",
        "## Job mix",
        "| target | assets/s | × A | clip-visual p95 ms | × A | faces p95 ms",
        "### Agreement (job mix)",
        "## Setup",
        "- scenario: both",
        "## Per task",
        "### ocr",
        "### Agreement\n",
    ]
    positions = [text.index(needle) for needle in order]
    assert positions == sorted(positions)
    assert f"- job mix: clip-visual c=2, faces c=2, ocr c=1 at once over {k} assets, {rounds} rounds" in text
    assert f"| B | clip-visual | {k} | cosine min 1.000000, mean 1.000000 |" in text
    assert f"| B | faces | {k} | face count equal {k}/{k}; {k} matched faces: box IoU min 1.0000" in text
    assert f"| B | ocr | {k} | texts equal {k}/{k} (100.0%); lines identical {2 * k}/{2 * k} (100.0%) |" in text
    assert "### Errors" not in text
    assert stdout.index("Job mix") < stdout.index("| target | assets/s |") < stdout.index("### ocr")
    assert "written to" in stdout and "jobmix.csv" in stdout and "results.csv" in stdout


def test_job_mix_alone_with_a_mix_of_its_own_and_a_failure(tmp_path: Path, capsys) -> None:
    images, out = _images(tmp_path / "images", 6), tmp_path / "out"
    previews, _ = bench.load_previews(images)
    failing = hashlib.sha1(previews[2].data).hexdigest()
    with StandInServer(JOB_MIX_DELAYS, fail=frozenset({("B", "ocr", failing)})) as server:
        argv = [
            "bench", "--target", f"A={server.url}/A/", "--target", f"B={server.url}/B/", "--images", str(images),
            "--scenario", "job-mix", "--job-mix", "faces=3,ocr=1", "--job-mix-assets", "8", "--rounds", "1",
            "--warmup", "0", "--out", str(out), "--no-progress",
        ]  # fmt: skip
        assert main(argv) == 0
    capsys.readouterr()
    # 8 assets over 6 previews: the first two come again; no CLIP request, faces 3 at a time
    sent = Counter((target, task) for target, task, *_ in server.log)
    assert sent == {("A", "faces"): 8, ("A", "ocr"): 8, ("B", "faces"): 8, ("B", "ocr"): 8}
    assert Counter(d for t, task, d, *_ in server.log if (t, task) == ("A", "faces")) == Counter(
        hashlib.sha1(previews[i % 6].data).hexdigest() for i in range(8)
    )
    assert [server.max_in_flight[("A", t)] for t in ("faces", "ocr")] == [3, 1]
    assert server.max_in_flight["A"] == 4
    with open(out / "jobmix.csv", newline="") as handle:
        rows = {(r["target"], r["task"]): r for r in csv.DictReader(handle)}
    assert (rows[("A", "job-mix")]["assets"], rows[("A", "job-mix")]["errors"]) == ("8", "0")
    assert (rows[("B", "job-mix")]["assets"], rows[("B", "job-mix")]["errors"]) == ("7", "1")  # asset 2 failed OCR
    assert (rows[("B", "ocr")]["requests"], rows[("B", "ocr")]["errors"]) == ("8", "1")
    assert float(rows[("B", "job-mix")]["assets_per_s"]) == pytest.approx(
        7 / float(rows[("B", "job-mix")]["seconds"]), rel=2e-3
    )
    assert not (out / "results.csv").exists() and not (out / "throughput.png").exists()
    text = (out / "results.md").read_text()
    assert "## Job mix" in text and "## Per task" not in text and "- scenario: job-mix" in text
    assert "| B | ocr | 5 | texts equal 5/5 (100.0%); lines identical 10/10 (100.0%) |" in text  # none for image 2
    assert "| B | faces | 6 | face count equal 6/6" in text
    assert "- B: HTTP 500 × 1" in text


def test_bench_end_to_end_against_a_live_server(model_cache: Path, tmp_path: Path, capsys) -> None:
    from immich_trt.tools.testing import LiveServer

    images = tmp_path / "images"
    images.mkdir()
    square = np.zeros((480, 640, 3), np.uint8)
    square[192:224, 320:352] = 255  # one face for the test pack's detector
    Image.fromarray(square).save(images / "square.png")
    (images / "photo.jpg").write_bytes(_jpeg(2000, 1600))  # previewed to 1800x1440
    out = tmp_path / "out"
    with LiveServer(model_cache, tmp_path, env={"IMMICH_TRT_RUNTIME": "onnxruntime"}) as server:
        argv = [
            "bench", "--target", f"A={server.url},pid={server.process.pid}", "--target", f"B={server.url}/",
            "--images", str(images), "--concurrency", "1,2", "--requests-per-level", "4", "--rounds", "2",
            "--warmup", "1", "--out", str(out), "--no-progress",
        ]  # fmt: skip
        assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "### Throughput ratio against A" in stdout and "Agreement" in stdout
    assert stdout.index("Job mix") < stdout.index("### Throughput ratio against A")
    with open(out / "jobmix.csv", newline="") as handle:
        mix_rows = list(csv.DictReader(handle))
    assert [(r["target"], r["task"], r["concurrency"]) for r in mix_rows] == [
        (t, task, c) for t in "AB" for task, c in (("job-mix", "5"), ("clip-visual", "2"), ("faces", "2"), ("ocr", "1"))
    ]
    for row in mix_rows:  # 2 previews, 2 rounds: each queue sent 4 requests per target
        expected = ("4", "12", "0") if row["task"] == "job-mix" else ("", "4", "0")
        assert (row["assets"], row["requests"], row["errors"]) == expected
    assert float(mix_rows[0]["rss_mb"]) > 50 and float(mix_rows[0]["cpu_s_per_asset"]) > 0
    assert float(mix_rows[4]["assets_per_s"]) > 0 and mix_rows[4]["rss_mb"] == ""
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 4 * 2
    assert {(r["target"], r["task"], r["concurrency"]) for r in rows} == {
        (t, task, c) for t in "AB" for task in bench.TASKS for c in ("1", "2")
    }
    for row in rows:
        assert (row["requests"], row["errors"]) == ("4", "0")
        assert float(row["throughput_rps"]) > 0
        assert 0 < float(row["p50_ms"]) <= float(row["p95_ms"]) <= float(row["p99_ms"]) < 60_000
        assert float(row["throughput_ratio"]) > 0
        if row["target"] == "A":
            assert float(row["rss_mb"]) > 50 and float(row["cpu_s"]) >= 0 and float(row["rss_ratio"]) == 1.0
        else:
            assert row["rss_mb"] == "" and row["cpu_s"] == ""
    text = (out / "results.md").read_text()
    assert "### Agreement" in text
    job_mix = text[text.index("## Job mix") : text.index("## Setup")]
    assert "| B | clip-visual | 2 | cosine min 1.000000, mean 1.000000 |" in job_mix
    assert "| B | faces | 2 | face count equal 2/2; 1 matched faces: box IoU min 1.0000" in job_mix
    assert "| B | ocr | 2 | texts equal 2/2 (100.0%); lines identical" in job_mix
    assert "| B | clip-visual | 2 | cosine min 1.000000, mean 1.000000 |" in text
    assert "| B | clip-text | 8 | cosine min 1.000000" in text
    assert "| B | faces | 2 | face count equal 2/2; 1 matched faces: box IoU min 1.0000" in text
    assert "| B | ocr | 2 | texts equal 2/2 (100.0%); lines identical" in text
    assert "images: 2 from `images/`" in text and "1220x960 px on average" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "throughput.png").exists()
    else:
        assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
