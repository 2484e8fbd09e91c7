"""Start-up: a command that cannot run, or has nothing left to do, never starts Prefect; a
temporary server that does not come up is one line saying what to do."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from tests.conftest import REPO, assert_one_line_error, processes_with_home


def _run_without_server(home: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    """The CLI with no PREFECT_API_URL, so Prefect would start its temporary server in `home`."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", **env_extra)
    return subprocess.run([sys.executable, "-m", *args, "--no-progress"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def _prefect_started(home: Path) -> bool:
    """Prefect's temporary server creates its database under PREFECT_HOME when it starts."""
    return home.exists() and any(home.rglob("*.db"))


def test_bad_input_is_refused_before_prefect_starts(tmp_path):
    home = tmp_path / "prefect-home"
    result = _run_without_server(home, "flows.extract", str(tmp_path / "missing.csv"),
                                 "--schema", str(REPO / "jobs" / "restaurants.yaml"))
    assert_one_line_error(result, "missing.csv")
    bad_schema = tmp_path / "bad.json"
    bad_schema.write_text('{"type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}')
    result = _run_without_server(home, "flows.extract", str(REPO / "data" / "articles.csv"), "--schema", str(bad_schema))
    assert_one_line_error(result, "pattern")
    assert not _prefect_started(home)


def test_rerun_with_nothing_to_do_finishes_without_prefect(run_flow, tmp_path):
    out = tmp_path / "out"
    first = run_flow("summarize", str(REPO / "data" / "articles.csv"), "--limit", "2", "--max-tokens", "8",
                     "--no-cache", "--out", str(out))
    assert first.returncode == 0, first.stderr
    before = pl.read_parquet(out / "results.parquet")
    home = tmp_path / "prefect-home"
    again = _run_without_server(home, "flows.summarize", str(REPO / "data" / "articles.csv"), "--limit", "2",
                                "--max-tokens", "8", "--no-cache", "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "0 generated, 2 reused" in again.stderr and "no Prefect flow run" in again.stderr
    assert not _prefect_started(home)
    after = pl.read_parquet(out / "results.parquet")
    assert after.select("row", "row_key", "summary").equals(before.select("row", "row_key", "summary"))
    usage = pl.read_parquet(out / "usage.parquet")
    assert usage.height == 2 and usage["rows_generated"].to_list() == [2, 0] and usage["rows_resumed"][-1] == 2


def test_prefect_server_that_does_not_start_is_one_line_saying_what_to_do(tmp_path):
    home = tmp_path / "prefect-home"
    result = _run_without_server(home, "flows.summarize", str(REPO / "data" / "articles.csv"), "--limit", "1",
                                 "--max-tokens", "4", "--no-cache", "--out", str(tmp_path / "out"),
                                 PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    assert_one_line_error(result, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PREFECT_API_URL")


def test_the_temporary_server_records_the_flow_run_and_ends_with_the_command(tmp_path):
    """No PREFECT_API_URL: the command starts Prefect's server itself (flows/_prefect_server.py),
    its flow run is in that server's database under the run's id, and the server is gone when
    the command is."""
    import sqlite3

    import threading

    home, out = tmp_path / "prefect-home", tmp_path / "out"
    at_once: list[int] = [0]  # the most uvicorn processes under this PREFECT_HOME seen alive at one time
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            alive = 0
            for pid in processes_with_home(home):
                try:
                    alive += b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    pass
            at_once[0] = max(at_once[0], alive)
            done.wait(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = _run_without_server(home, "flows.summarize", str(REPO / "data" / "articles.csv"), "--limit", "3",
                                     "--backend", "echo", "--no-cache", "--out", str(out))
    finally:
        done.set()
        watcher.join()
    assert result.returncode == 0, result.stderr
    assert at_once[0] == 1, f"expected one temporary server at a time, saw {at_once[0]}"
    run_id = pl.read_parquet(out / "usage.parquet")["run_id"][0]
    assert set(pl.read_parquet(out / "results.parquet")["run_id"]) == {run_id}
    (database,) = home.rglob("*.db")
    with sqlite3.connect(database) as db:
        state = db.execute("SELECT state_type FROM flow_run WHERE id = ?", (run_id,)).fetchone()
    assert state == ("COMPLETED",)
    deadline = time.monotonic() + 5  # (a process the kernel is still tearing down may show for a moment)
    while processes_with_home(home) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with_home(home) == []
