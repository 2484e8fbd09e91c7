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

ROWS = 4  # two per worker
FAST = ["--max-tokens", "8", "--n-ctx", "1024", "--n-seq", "2", "--no-cache", "--no-progress"]


def _run(prefect_server, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": prefect_server["home"],
           "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "flows.summarize", *args, *FAST], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_summarize_on_a_local_ray_cluster_matches_the_local_runner(prefect_server, tmp_path):
    data, out = tmp_path / "in.parquet", tmp_path / "ray"
    pl.DataFrame(scitldr_rows(ROWS)).write_parquet(data)
    ray = _run(prefect_server, str(data), "--out", str(out), "--runner", "ray", "--workers", "2")
    assert ray.returncode == 0, ray.stderr
    b = pl.read_parquet(out / "results.parquet")
    assert b["row"].to_list() == list(range(ROWS)) and b["status"].to_list() == ["ok"] * ROWS
    assert sorted(p.name for p in out.glob("*.parquet")) == ["results.parquet", "usage.parquet"]
    usage = pl.read_parquet(out / "usage.parquet")
    assert usage["device"][-1] == "ray: 2 workers on a local Ray cluster"
    # the local runner, on the same folder, plans the very rows Ray wrote (the same row keys): it
    # reuses every one and generates nothing, as on a resume of its own run
    local = _run(prefect_server, str(data), "--out", str(out))
    assert local.returncode == 0, local.stderr
    assert f"0 generated, {ROWS} reused" in local.stderr and "nothing to generate" in local.stderr
    after = pl.read_parquet(out / "results.parquet")
    assert after.select("row", "row_key", "summary").equals(b.select("row", "row_key", "summary"))
    assert pl.read_parquet(out / "usage.parquet")["rows_resumed"].to_list()[-1] == ROWS
