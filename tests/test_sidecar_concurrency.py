"""Short CI variant of ``bench/sidecar_concurrency.py``: 20 s of every kind of sidecar
client at once (ingests, /predict in record mode, clustering, renames, merges and
splits, assignments, searches, duplicates), then ingests and renames with the server
SIGKILLed under them and restarted on the same data.

The 10-minute run and its figures are in ``bench/RELIABILITY.md``."""

from __future__ import annotations

from pathlib import Path

from conftest import SHARED_DATA, load_bench_script, requires_data

pytestmark = requires_data


concurrency = load_bench_script("sidecar_concurrency")


def test_concurrent_sidecar_use_loses_no_write_and_survives_sigkill(model_cache: Path, tmp_path: Path) -> None:
    report = concurrency.run([
        "--duration", "20", "--crash-duration", "10", "--crash-at", "5", "--cache", str(model_cache),
        "--images", str(SHARED_DATA / "photos"), "--timeout", "60", "--out", str(tmp_path / "out"),
        "--work-dir", str(tmp_path / "work"),
    ])  # fmt: skip
    text = report.markdown()

    # no 5xx, no connection error, no "database is locked" anywhere
    assert report.server_errors() == [], text
    assert report.locked() == [], text
    assert not [r for r in report.phase1.records if r.error.startswith(("connection", "timeout"))], text
    # every route of the mix was exercised and answered
    routes = {r.route for r in report.phase1.records if r.status == 200}
    for route in (
        "POST /v1/ingest", "POST /v1/faces/cluster", "POST /v1/persons/{id}/name", "POST /v1/faces/{id}/assign",
        "POST /v1/search/text", "POST /v1/search/ocr", "POST /v1/search/hybrid", "POST /v1/duplicates/find",
        "POST /predict faces", "POST /predict clip-visual", "POST /predict ocr", "POST /predict clip-text",
    ):  # fmt: skip
        assert route in routes, text
    # every acknowledged write read back, through the API and in the file
    assert report.phase1.ingests and report.phase1.renames and report.phase1.assigns, text
    assert report.api_problems == [] and report.sqlite_problems == [], text
    assert report.integrity == "ok"
    # the SIGKILL: writes acknowledged before it are all there after the restart
    crash = report.crash
    assert crash is not None and crash.pids and 4.5 < crash.killed_at_s < 7, text
    assert report.crash_client.ingests and report.crash_client.renames, text
    assert crash.api_problems == [] and crash.sqlite_problems == [], text
    assert crash.integrity == "ok"
    assert report.failures() == [], text
    assert "PASS" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "requests.csv").read_text().count("\n") == len(report.records()) + 1
