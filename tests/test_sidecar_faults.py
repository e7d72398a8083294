"""The server SIGKILLed in the middle of a folder ingest: the SQLite store is consistent
afterwards and the ingest resumes where it stopped, with nothing duplicated."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import SHARED_DATA, requires_data
from immich_trt.sidecar.folder import image_files
from immich_trt.tools.testing import LiveServer

PHOTOS = SHARED_DATA / "photos"


def assets(url: str) -> int:
    with urllib.request.urlopen(f"{url}/v1/status", timeout=30) as response:
        return json.loads(response.read())["assets"]


@requires_data
def test_server_killed_during_ingest_leaves_a_consistent_store_and_resumes(model_cache: Path, tmp_path: Path) -> None:
    env = {"IMMICH_TRT_RUNTIME": "onnxruntime"}
    ingest = [sys.executable, "-m", "immich_trt", "ingest", str(PHOTOS), "--quiet", "--concurrency", "2"]
    client_env = {**os.environ, "IMMICH_TRT_DATA_DIR": str(tmp_path / "client")}
    with LiveServer(model_cache, tmp_path, env=env) as server:
        client = subprocess.Popen([*ingest, "--url", server.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=client_env)
        deadline = time.monotonic() + 300
        while assets(server.url) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        server.process.kill()  # SIGKILL: no shutdown, requests in flight
        server.process.wait()
        client.kill()
        client.wait()

    db = sqlite3.connect(tmp_path / "data" / "sidecar.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    stored = db.execute("SELECT count(*) FROM assets").fetchone()[0]
    assert 3 <= stored < len(image_files(PHOTOS))
    # every task marked done has its rows: a face task always stored its faces with it
    assert db.execute(
        "SELECT count(*) FROM asset_tasks t WHERE task = 'clip' AND NOT EXISTS "
        "(SELECT 1 FROM assets a WHERE a.id = t.asset AND a.clip_embedding IS NOT NULL)"
    ).fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM faces WHERE thumbnail IS NULL").fetchone()[0] == 0
    db.close()

    with LiveServer(model_cache, tmp_path, env=env) as server:  # same data directory
        assert assets(server.url) == stored
        done = subprocess.run([*ingest, "--url", server.url], capture_output=True, text=True, timeout=900,
                              env=client_env)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["failed"] == 0, done.stderr  # the HEIC original included
        assert report["skipped"] == stored  # each asset was written in one transaction: all or nothing
        assert assets(server.url) == len(image_files(PHOTOS))
