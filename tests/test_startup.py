"""Start-up: a command that cannot run, or has nothing left to do, never starts Prefect; a
temporary server that does not come up is one line saying what to do."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest

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


# the command of temporary_server_run: 3 rows on the echo backend (orchestration only, no model)
ECHO3 = ["flows.summarize", str(REPO / "data" / "articles.csv"), "--limit", "3", "--backend", "echo", "--no-cache"]


def test_rerun_with_nothing_to_do_finishes_without_prefect(temporary_server_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(temporary_server_run["out"], out)  # a finished run (its first run had a temporary server)
    before = pl.read_parquet(out / "results.parquet")
    home = tmp_path / "prefect-home"
    again = _run_without_server(home, *ECHO3, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "0 generated, 3 reused" in again.stderr and "no Prefect flow run" in again.stderr
    assert not _prefect_started(home)
    after = pl.read_parquet(out / "results.parquet")
    assert after.select("row", "row_key", "summary", "run_id").equals(before.select("row", "row_key", "summary", "run_id"))
    usage = pl.read_parquet(out / "usage.parquet")
    assert usage.height == 2 and usage["rows_generated"].to_list() == [3, 0] and usage["rows_resumed"][-1] == 3


def test_prefect_server_that_does_not_start_is_one_line_saying_what_to_do(tmp_path):
    home = tmp_path / "prefect-home"
    result = _run_without_server(home, "flows.summarize", str(REPO / "data" / "articles.csv"), "--limit", "1",
                                 "--max-tokens", "4", "--no-cache", "--out", str(tmp_path / "out"),
                                 PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    assert_one_line_error(result, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PREFECT_API_URL")


@pytest.fixture(scope="module")
def temporary_server_run(tmp_path_factory):
    """ECHO3 with no PREFECT_API_URL, watched: the most uvicorn processes under its PREFECT_HOME alive at once."""
    tmp = tmp_path_factory.mktemp("temporary-server")
    home, out = tmp / "prefect-home", tmp / "out"
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
        result = _run_without_server(home, *ECHO3, "--out", str(out))
    finally:
        done.set()
        watcher.join()
    return {"result": result, "home": home, "out": out, "at_once": at_once[0]}


def test_the_temporary_server_records_the_flow_run_and_ends_with_the_command(temporary_server_run):
    """No PREFECT_API_URL: the command starts Prefect's server itself (flows/_prefect_server.py),
    its flow run is in that server's database under the run's id, and the server is gone when
    the command is."""
    result, home, out = (temporary_server_run[k] for k in ("result", "home", "out"))
    assert result.returncode == 0, result.stderr
    at_once = temporary_server_run["at_once"]
    assert at_once == 1, f"expected one temporary server at a time, saw {at_once}"
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
