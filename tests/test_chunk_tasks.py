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
from tokenmill.tasks.chunks import RUNNING, ChunkRun, row_ranges
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


def _wait_for(condition, seconds: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_an_early_start_holds_its_rows_until_the_flow_runs_id_then_writes_them_with_it(rows, tmp_path):
    """What the command line does while Prefect's server starts: the first RUNNING ranges
    generate at once, nothing is written without the flow run's id, and every row gets it."""
    out = tmp_path / "o"
    size = ROWS // (RUNNING + 2)  # (ranges beyond the first RUNNING)
    job = prepare_summarize(JobConfig(input=str(rows), out=str(out), backend="echo", max_tokens=8, cache=False,
                                      task_rows=size))
    run = ChunkRun(job, size)
    run.start_early(progress=False)
    _wait_for(lambda: run.ranges[RUNNING - 1].done == size)  # RUNNING ranges generated before any flow run
    assert run.ranges[RUNNING].done == 0  # the next waits for its chunk task
    assert not list((out / "parts").glob("*.parquet")), "rows were written before the run had its id"
    run.adopt("flow-run-7", None)
    for number in range(len(run.ranges)):
        run.run_chunk(number)
    stats = run.finish()
    assert stats.run_id == "flow-run-7" and stats.rows_generated == ROWS
    results = pl.read_parquet(out / "results.parquet")
    assert results["row"].to_list() == list(range(ROWS)) and set(results["run_id"]) == {"flow-run-7"}
    assert pl.read_parquet(out / "usage.parquet")["run_id"].to_list() == ["flow-run-7"]


def test_an_early_start_whose_flow_never_comes_keeps_what_it_finished(rows, tmp_path):
    """Prefect failed to start (or Ctrl-C came first): the rows generated meanwhile are written
    with the run's own id, and the next run reuses them."""
    out = tmp_path / "o"
    size = ROWS // (RUNNING + 2)
    config = dict(input=str(rows), out=str(out), backend="echo", max_tokens=8, cache=False, task_rows=size)
    run = ChunkRun(prepare_summarize(JobConfig(**config)), size)
    run.start_early(progress=False)
    _wait_for(lambda: run.ranges[RUNNING - 1].done == size)
    run.finish(aborted=True)  # (it may finish a few more rows before it sees the stop)
    files = list((out / "parts").glob("*.parquet")) + list(out.glob("results.parquet"))
    kept = pl.concat([pl.read_parquet(p) for p in files])
    assert kept.height >= RUNNING * size and kept["row"].n_unique() == kept.height and kept["run_id"].n_unique() == 1
    again = prepare_summarize(JobConfig(**config)).run(progress=False)
    assert again.rows_resumed == kept.height and again.rows_generated == ROWS - kept.height
