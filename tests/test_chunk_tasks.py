"""Chunks of rows as Prefect task runs feeding one shared pool (tokenmill/tasks/chunks.py), on the
zero-cost echo backend: task runs named by their rows with their counts as results, a retried
chunk generating nothing twice, every row once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request

import polars as pl
import pytest

from tests.conftest import REPO
from tokenmill.tasks.chunks import ChunkRun, row_ranges
from tokenmill.tasks.runner import JobConfig
from tokenmill.tasks.summarize import prepare_summarize

ROWS = 250


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("chunks") / "in.parquet"
    pl.DataFrame({"text": [f"text {i} about {['cats', 'dogs', 'owls'][i % 3]}." for i in range(ROWS)]}).write_parquet(path)
    return path


def test_row_ranges_cover_every_row_once():
    ranges = row_ranges(25, 10)
    assert [(r.first, r.stop) for r in ranges] == [(0, 10), (10, 20), (20, 25)]
    assert ranges[2].name == "rows 20-24 (5 rows)"


def test_a_retried_chunk_generates_nothing_twice_and_chunks_share_the_pool(rows, tmp_path):
    job = prepare_summarize(JobConfig(input=str(rows), out=str(tmp_path / "o"), backend="echo", max_tokens=8,
                                      cache=False, workers=2, task_rows=100))
    run = ChunkRun(job, 100)
    run.start(progress=False, run_id="run-1", on_chunk=None)
    both = [threading.Thread(target=run.run_chunk, args=(n,)) for n in (0, 1)]  # two chunks open at once
    for t in both:
        t.start()
    for t in both:
        t.join(60)
    first = run.run_chunk(0)
    assert first == {"first_row": 0, "last_row": 99, "rows": 100, "ok": 100}
    assert run.run_chunk(0) == first  # a retry: nothing regenerated, the same counts
    assert run.run_chunk(2)["rows"] == 50
    stats = run.finish()
    assert stats.rows_generated == ROWS and stats.rows_total == ROWS
    results = pl.read_parquet(tmp_path / "o" / "results.parquet")
    assert results["row"].to_list() == list(range(ROWS))


def _task_runs(api_url: str, flow_run_id: str) -> list[dict]:
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200}
    request = urllib.request.Request(f"{api_url}/task_runs/filter", method="POST", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_the_flow_run_shows_chunk_task_runs_with_their_rows(prefect_server, rows, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": prefect_server["home"]}
    done = subprocess.run([sys.executable, "-m", "flows.summarize", str(rows), "--out", str(out), "--backend", "echo",
                           "--workers", "2", "--task-rows", "100", "--max-tokens", "8", "--no-cache", "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert pl.read_parquet(out / "results.parquet")["row"].to_list() == list(range(ROWS))
    run_id = pl.read_parquet(out / "usage.parquet")["run_id"][-1]
    task_runs = _task_runs(prefect_server["url"], run_id)
    chunks = sorted((t["name"], t["state"]["type"]) for t in task_runs if t["name"].startswith("rows "))
    assert chunks == [("rows 0-99 (100 rows)", "COMPLETED"), ("rows 100-199 (100 rows)", "COMPLETED"),
                      ("rows 200-249 (50 rows)", "COMPLETED")]
