"""Never lose or repeat work: resume after kill -9, rerun, duplicates, grown input, re-parse, cache."""

from __future__ import annotations

import subprocess
import sys
import time

import polars as pl
import pytest

from tests.conftest import REPO, run_echo, scitldr_rows


def _usage(out) -> list[dict]:
    return pl.read_parquet(out / "usage.parquet").to_dicts()


def _write(rows: list[dict], path):
    pl.DataFrame(rows).write_parquet(path)
    return path


# The bookkeeping does not depend on what the model says: these run on the zero-cost echo
# backend, in this process (tests/test_echo_backend.py). Kills of the real engine, at random
# moments, are in tests/reliability/test_faults.py.
ECHO = {"max_tokens": 16, "chunk_size": 4}

_DIE_AFTER_TWO_PARTS = """
import os, sys
from tokenmill.tasks import sink
from tokenmill.tasks.runner import JobConfig
from tokenmill.tasks.summarize import prepare_summarize
sink.MAX_PART_ROWS, sink.CALLBACK_S = 4, 0  # a part, and a callback, every 4 rows
job = prepare_summarize(JobConfig(input=sys.argv[1], out=sys.argv[2], backend="echo", cache=False,
                                  max_tokens=16, chunk_size=4))
parts = []
job.run(progress=False, on_chunk=lambda stats: parts.append(1) or len(parts) < 2 or os._exit(9))
"""


def test_resume_after_kill_loses_no_rows(tmp_path):
    data = _write(scitldr_rows(40), tmp_path / "in.parquet")
    out = tmp_path / "out"
    # the run dies as under kill -9 (no cleanup, no merge, its lock left behind) after two parts
    died = subprocess.run([sys.executable, "-c", _DIE_AFTER_TWO_PARTS, str(data), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert died.returncode == 9, died.stderr
    written = pl.concat([pl.read_parquet(p) for p in (out / "parts").glob("*.parquet")]).sort("row")
    assert written["row"].to_list() == list(range(8))
    assert not (out / "results.parquet").exists() and (out / ".tokenmill.lock").exists()

    run_echo("summarize", data, out, **ECHO)
    results = pl.read_parquet(out / "results.parquet")
    assert results["row"].to_list() == list(range(40))
    assert results["status"].to_list() == ["ok"] * 40
    run = _usage(out)[-1]
    assert run["rows_generated"] == 32 and run["rows_resumed"] == 8
    kept = results.filter(pl.col("row") < 8).select("row", "row_key", "summary", "run_id")
    assert kept.equals(written.select("row", "row_key", "summary", "run_id"))  # reused, not redone
    assert not list((out / "parts").glob("*.parquet")) if (out / "parts").exists() else True



@pytest.fixture
def finished_job(tmp_path):
    """12 rows summarized once into an output folder."""
    data = _write(scitldr_rows(12), tmp_path / "in.parquet")
    out = tmp_path / "out"
    first = run_echo("summarize", data, out, **ECHO)
    assert first.rows_generated == 12 and first.rows_error == 0
    return data, out


def test_rerunning_a_finished_job_generates_nothing(finished_job):
    data, out = finished_job
    before = pl.read_parquet(out / "results.parquet")
    started = time.monotonic()
    run_echo("summarize", data, out, **ECHO)
    assert time.monotonic() - started < 60
    run = _usage(out)[-1]
    assert run["rows_generated"] == 0 and run["rows_resumed"] == 12 and run["prompt_tokens"] == 0
    assert run["device"].startswith("none (no rows")  # no worker was needed
    after = pl.read_parquet(out / "results.parquet")
    assert after.select("row_key", "summary", "run_id").equals(before.select("row_key", "summary", "run_id"))


def test_changing_the_parser_reparses_without_generating(finished_job):
    data, out = finished_job
    # as a model that wraps its replies in whitespace would have left them
    stored = pl.read_parquet(out / "results.parquet")
    stored.with_columns(raw_output="\n " + pl.col("raw_output") + "  ").write_parquet(out / "results.parquet")
    run_echo("summarize", data, out, strip=False, **ECHO)
    assert _usage(out)[-1]["rows_generated"] == 0
    results = pl.read_parquet(out / "results.parquet")
    assert results["raw_output"].str.starts_with("\n ").all()
    assert results["summary"].to_list() == results["raw_output"].to_list()
    run_echo("summarize", data, out, **ECHO)  # stripping again: parsed again, still nothing generated
    assert _usage(out)[-1]["rows_generated"] == 0
    results = pl.read_parquet(out / "results.parquet")
    assert results["summary"].to_list() == [r.strip() for r in results["raw_output"].to_list()]


def test_appended_rows_are_the_only_ones_generated(finished_job, tmp_path):
    data, out = finished_job
    grown = _write(scitldr_rows(24), tmp_path / "grown.parquet")
    run_echo("summarize", grown, out, **ECHO)
    assert _usage(out)[-1]["rows_generated"] == 12
    results = pl.read_parquet(out / "results.parquet")
    assert results["row"].to_list() == list(range(24)) and results["status"].to_list() == ["ok"] * 24
    assert results["produced"].to_list() == ["generated"] * 24  # the first 12 keep how they were made
    assert results["run_id"].n_unique() == 2


def test_duplicate_texts_are_generated_once(tmp_path):
    unique = scitldr_rows(14)
    rows = unique + [unique[i] for i in (0, 3, 3, 7, 10, 13)]  # 6 of 20 rows (30 %) repeat a text
    data = _write(rows, tmp_path / "dups.parquet")
    out = tmp_path / "out"
    run_echo("summarize", data, out, **ECHO)
    run = _usage(out)[-1]
    assert run["rows_generated"] == 14 and run["rows_duplicate"] == 6 and run["calls"] == 14
    results = pl.read_parquet(out / "results.parquet")
    assert results["row"].to_list() == list(range(20))
    by_key = results.group_by("row_key").agg(pl.col("summary").n_unique().alias("n"), pl.len().alias("rows"))
    assert by_key.height == 14 and (by_key["n"] == 1).all()
    assert results.filter(pl.col("produced") == "duplicate")["row"].to_list() == list(range(14, 20))


def test_shared_cache_reuses_results_across_output_folders(tmp_path):
    data = _write(scitldr_rows(6), tmp_path / "in.parquet")
    cache = tmp_path / "cache"
    run_echo("summarize", data, tmp_path / "a", cache_dir=str(cache), **ECHO)
    run_echo("summarize", data, tmp_path / "b", cache_dir=str(cache), **ECHO)
    run = _usage(tmp_path / "b")[-1]
    assert run["rows_generated"] == 0 and run["rows_cached"] == 6
    assert run["tokens_saved"] > 0
    a = pl.read_parquet(tmp_path / "a" / "results.parquet")
    b = pl.read_parquet(tmp_path / "b" / "results.parquet")
    assert a["summary"].equals(b["summary"]) and b["produced"].to_list() == ["cached"] * 6
    assert (b["run_id"] == a["run_id"][0]).all()  # the records of the run that generated them
