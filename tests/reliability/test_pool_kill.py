"""A pool of two real model workers, one killed with SIGKILL mid-run: its in-flight rows go to a
fresh worker and the job ends with every row exactly once."""

from __future__ import annotations

import os
import signal
import time

import polars as pl

from tests.conftest import scitldr_rows
from tests.reliability.test_faults import _children, _parts, _start, _wait_for

ROWS = 12
WORDS = 40  # abstracts cut short (as in test_faults): the test needs rows in flight, not long prompts


def _workers(cli_pid: int) -> list[int]:
    found = []
    for child in _children(cli_pid):
        try:
            cmdline = open(f"/proc/{child}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if "multiprocessing" in cmdline and "resource_tracker" not in cmdline:
            found.append(child)
    return found


def test_one_of_two_workers_killed_mid_run_every_row_exactly_once(prefect_server, tmp_path):
    data = tmp_path / "in.parquet"
    pl.DataFrame([{**r, "text": " ".join(r["text"].split()[:WORDS])} for r in scitldr_rows(ROWS)]).write_parquet(data)
    out = tmp_path / "out"
    proc = _start(prefect_server, str(data), "--out", str(out), "--workers", "2", "--n-seq", "2", "--threads", "1",
                  "--max-tokens", "16", "--n-ctx", "1024", "--part-rows", "1", "--no-cache", "--no-progress")
    _wait_for(lambda: len(_workers(proc.pid)) == 2 and len(_parts(out)) >= 1, proc)
    victim = _workers(proc.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    results = pl.read_parquet(out / "results.parquet")
    assert results["row"].to_list() == list(range(ROWS))
    assert results["status"].to_list() == ["ok"] * ROWS
    usage = pl.read_parquet(out / "usage.parquet")
    assert usage["rows_generated"][-1] == ROWS  # each generated once: the dead worker's rows only by its successor
    assert usage["worker_restarts"][-1] >= 1, "the kill must have landed while the worker held rows"
    assert usage["device"][-1].startswith("2 workers")
    assert time.monotonic() - killed_at < 120
