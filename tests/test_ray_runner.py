"""`--runner ray`: flows.summarize on a local Ray cluster (2 CPUs, 2 workers) through prefect-ray
gives the rows the local runner gives: the same row keys, every row ok, one output folder."""

from __future__ import annotations

import os
import subprocess
import sys

import polars as pl
import pytest

from tests.conftest import REPO, scitldr_rows

pytest.importorskip("prefect_ray", reason="--runner ray needs prefect[ray]")

ROWS = 6
FAST = ["--max-tokens", "8", "--n-ctx", "1024", "--n-seq", "2", "--no-cache", "--no-progress"]


def _run(prefect_server, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": prefect_server["home"],
           "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "flows.summarize", *args, *FAST], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_summarize_on_a_local_ray_cluster_matches_the_local_runner(prefect_server, tmp_path):
    data = tmp_path / "in.parquet"
    pl.DataFrame(scitldr_rows(ROWS)).write_parquet(data)
    local = _run(prefect_server, str(data), "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    ray = _run(prefect_server, str(data), "--out", str(tmp_path / "ray"), "--runner", "ray", "--workers", "2")
    assert ray.returncode == 0, ray.stderr
    a, b = (pl.read_parquet(tmp_path / d / "results.parquet") for d in ("local", "ray"))
    assert b["row"].to_list() == list(range(ROWS)) and b["status"].to_list() == ["ok"] * ROWS
    assert b["row_key"].to_list() == a["row_key"].to_list()
    assert sorted(p.name for p in (tmp_path / "ray").glob("*.parquet")) == ["results.parquet", "usage.parquet"]
    usage = pl.read_parquet(tmp_path / "ray" / "usage.parquet")
    assert usage["device"][-1] == "ray: 2 workers on a local Ray cluster"
    again = _run(prefect_server, str(data), "--out", str(tmp_path / "ray"), "--runner", "ray", "--workers", "2")
    assert again.returncode == 0 and "nothing to generate" in again.stderr  # resume, as a local run would
