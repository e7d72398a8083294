"""Short CI variant of ``bench/reliability.py``: Immich's four requests from 8 concurrent
clients against a live server (Triton runtime) for about 20 s, then 16 clients with the
``tritonserver`` process SIGKILLed twice under them: no request may fail.

The long run (32 clients, 3 minutes) and its figures are in ``bench/RELIABILITY.md``.
RSS is checked loosely here only: a 20 s run after a 5 s warm-up is too short for a
growth figure to mean much (onnxruntime arenas and allocator caches are still settling).
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from conftest import SHARED_DATA, load_bench_script, requires_data

pytestmark = requires_data

PHOTOS = SHARED_DATA / "photos"
CLIENT_TIMEOUT_S = 60.0
#: With two outages, an OCR request queued behind 15 others may wait through both.
KILL_CLIENT_TIMEOUT_S = 150.0


reliability = load_bench_script("reliability")


@pytest.fixture(scope="module")
def server(model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """One server for the module (the fault test runs last and leaves it restarted)."""
    from immich_trt.tools.testing import LiveServer

    with LiveServer(
        model_cache, tmp_path_factory.mktemp("reliability-server"), {"IMMICH_TRT_INFER_TIMEOUT_S": "30"}
    ) as live:
        yield live


def _arguments(server, out: Path, *extra: str) -> list[str]:
    return [
        "--url", server.url, "--pid", str(server.process.pid), "--server-log", str(server.log_path),
        "--clients", "8", "--warmup", "5", "--images", str(PHOTOS), "--timeout", str(CLIENT_TIMEOUT_S),
        "--max-rss-growth", "100", "--out", str(out), *extra,
    ]  # fmt: skip


def _explain(report) -> str:
    return report.markdown()


def test_load_mixing_the_four_requests_has_no_5xx_and_stable_memory(server, tmp_path: Path) -> None:
    report = reliability.run(_arguments(server, tmp_path, "--duration", "20"))

    assert report.failures() == [], _explain(report)
    records = report.load.records
    assert not [r for r in records if r.status is not None and r.status >= 500], _explain(report)
    assert not [r for r in records if r.error in ("connection", "timeout", "other", "bad-answer")], _explain(report)
    rows = {row.task: row for row in report.rows()}
    for task in reliability.TASKS:
        assert rows[task].ok >= 3, _explain(report)  # every task answered a few times with 200
        assert rows[task].statuses["2xx"] == rows[task].requests
        assert rows[task].p50_ms is not None and rows[task].p99_ms is not None
        assert 0 < rows[task].p50_ms <= rows[task].p99_ms <= rows[task].max_any_ms < CLIENT_TIMEOUT_S * 1000
    assert report.measured_s == pytest.approx(20, abs=2)

    # RSS sampled every second, server and Triton apart; a loose bound only (short run)
    assert len(report.load.samples) >= 20
    assert all(s.triton_pids for s in report.load.samples)
    figures = {f.group: f for f in report.rss()}
    for group in ("server", "triton"):
        fig = figures[group]
        assert fig.start and fig.end and fig.peak >= fig.end
        assert abs(fig.growth_pct) < 100, _explain(report)
    print(report.rss_table())

    text = (tmp_path / "report.md").read_text()
    assert "## Verdict" in text and "PASS" in text
    assert (tmp_path / "requests.csv").read_text().count("\n") == len(records) + 1
    assert (tmp_path / "rss.csv").is_file()


def test_triton_killed_twice_under_load_loses_no_request(server, tmp_path: Path) -> None:
    """16 clients, Triton SIGKILLed twice: every request is answered 2xx (those in flight
    and those arriving meanwhile wait for the restarted Triton), within the client timeout."""
    report = reliability.run(
        _arguments(server, tmp_path, "--clients", "16", "--duration", "45", "--kill-triton-at", "3",
                   "--kill-triton-at", "22", "--timeout", str(KILL_CLIENT_TIMEOUT_S))
    )  # fmt: skip
    print(report.recovery_text())

    assert len(report.load.kills) == 2, _explain(report)
    recoveries = report.recoveries()
    for kill, recovery in zip(report.load.kills, recoveries):
        assert kill.pids and not kill.error, _explain(report)
        # the launcher started another Triton, and no request failed around the kill
        assert kill.new_triton_s is not None, _explain(report)
        assert not recovery.failures, _explain(report)
        assert recovery.recovered_s is not None and recovery.recovered_s <= 60, _explain(report)
        assert recovery.in_flight > 0 and recovery.spanning > 0, _explain(report)
        # no backend stub of the killed Triton left behind
        assert kill.stubs_left == (), _explain(report)
    assert recoveries[0].added_max_ms is not None and recoveries[0].added_max_ms > 0
    # zero failed requests in the whole run, nothing hung
    assert not [r for r in report.load.records if not r.ok], _explain(report)
    assert report.load.unfinished == 0
    assert max(r.latency_s for r in report.load.records) < KILL_CLIENT_TIMEOUT_S
    assert report.failures() == [], _explain(report)

    # the server itself lived through it and answers
    assert server.process.poll() is None
    with urllib.request.urlopen(f"{server.url}/ping", timeout=10) as response:
        assert response.status == 200
