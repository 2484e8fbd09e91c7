"""`python -m flows.stats`: the per-run table, the totals line, the chart and one-line errors.

The output folders are built with the code a run uses (RunStats, Prices, append_row, results_schema),
without a model: the numbers are chosen here, so the table can be checked exactly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

from tokenmill.io.parts import append_row
from tokenmill.contract import CACHED, DUPLICATE, GENERATED, RESULTS_FILE, SKIPPED, results_schema
from tokenmill.usage import Prices, RunStats

REPO = Path(__file__).resolve().parents[1]


def _record(i: int, run_id: str, produced: str, prompt: int, completion: int, decode_ms: float,
            status: str = "ok") -> dict:
    return {"row": i, "id": i, "row_key": f"k{i}", "summary": None if status != "ok" else f"s{i}",
            "status": status, "error": None if status == "ok" else "empty text",
            "finish_reason": "stop" if status == "ok" else "error", "raw_output": f"s{i}",
            "produced": produced, "run_id": run_id, "prompt_tokens": prompt, "cached_tokens": 0,
            "completion_tokens": completion, "latency_ms": 10.0 + decode_ms, "queue_ms": 5.0, "prompt_ms": 5.0,
            "decode_ms": decode_ms, "model": "m"}


def _run(out: Path, records: list[dict], run_id: str, wall_s: float, with_cost: bool, device: str) -> dict:
    """Count `records` the way a run does and append its usage row; returns that row."""
    stats = RunStats(model="m", model_sha256="0" * 64, backend="llama", run_id=run_id, device=device)
    for rec in records:
        if rec["produced"] == GENERATED and rec["run_id"] == run_id:
            stats.add_generation(SimpleNamespace(prompt_tokens=rec["prompt_tokens"], cached_tokens=0,
                                                 completion_tokens=rec["completion_tokens"]))
        stats.add_result(rec)
    stats._t0 = time.perf_counter() - wall_s  # a run that took wall_s seconds
    extra = Prices().estimate(stats) if with_cost else {}
    row = stats.row(input="in.parquet", task="summarize", params="{}", **extra)
    append_row(out / "usage.parquet", row)
    schema = results_schema("summary", pl.String, pl.Int64)
    pl.DataFrame([{k: r.get(k) for k in schema} for r in records], schema=schema).write_parquet(out / RESULTS_FILE)
    return row


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("stats")
    a, b = base / "outA", base / "outB"
    a.mkdir(), b.mkdir()
    ra, rb, rc = "aaaa1111-0000-0000-0000-000000000001", "bbbb2222-0000-0000-0000-000000000002", \
        "cccc3333-0000-0000-0000-000000000003"
    # Folder A, run 1: four rows generated. Run 2 into the same folder: those four resumed, two new.
    first = [_record(i, ra, GENERATED, 100 + i, 20 + i, 200.0) for i in range(4)]
    rows = [_run(a, first, ra, 2.0, True, "cpu")]
    second = first + [_record(4, rb, GENERATED, 300, 40, 400.0), _record(5, rb, DUPLICATE, 300, 40, 400.0)]
    rows.append(_run(a, second, rb, 1.5, True, "cpu"))
    # Folder B, an older usage table without the cost columns: generated, cached and a skipped error row.
    third = [_record(0, rc, GENERATED, 50, 10, 100.0), _record(1, "old-run", CACHED, 60, 12, 100.0),
             _record(2, rc, GENERATED, 70, 14, 50.0), _record(3, rc, SKIPPED, 0, 0, 0.0, status="error")]
    rows.append(_run(b, third, rc, 0.5, False, "CUDA0"))
    return base, a, b, rows


def _stats(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "flows.stats", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_table_totals_and_chart(folders):
    base, a, b, rows = folders
    result = _stats(str(a), str(b), cwd=base)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = _cells(lines[0])
    assert header[:11] == ["out", "run", "started_at (UTC)", "rows", "generated", "reused", "errors",
                           "prompt_tokens", "completion_tokens", "wall_s", "tokens/s"]
    assert header[11:] == ["cost avoided (est.)", "backend", "device"]
    run_lines = [line for line in lines if line.startswith((str(a), str(b)))]
    assert len(run_lines) == 3, result.stdout

    for line, row in zip(run_lines, rows):
        cells = dict(zip(header, _cells(line)))
        assert cells["run"] == row["run_id"][:8]
        assert cells["started_at (UTC)"] == row["started_at"].strftime("%Y-%m-%d %H:%M:%S")
        assert int(cells["rows"]) == row["rows_total"]
        assert int(cells["generated"]) == row["rows_generated"]
        assert int(cells["reused"]) == row["rows_cached"] + row["rows_duplicate"] + row["rows_resumed"]
        assert int(cells["errors"]) == row["rows_error"]
        assert int(cells["prompt_tokens"]) == row["prompt_tokens"]
        assert int(cells["completion_tokens"]) == row["completion_tokens"]
        assert float(cells["wall_s"]) == pytest.approx(row["wall_s"], abs=0.051)
        assert float(cells["tokens/s"]) == pytest.approx(row["tokens_per_s"], abs=0.051)
        cost = row.get("cost_avoided_usd")
        assert cells["cost avoided (est.)"] == ("-" if cost is None else f"${cost:.6f}")
        assert (cells["backend"], cells["device"]) == (row["backend"], row["device"])
    # The numbers the fixture was built to produce, so a counting slip in RunStats would show too.
    assert [_cells(line)[3:7] for line in run_lines] == [["4", "4", "0", "0"], ["6", "1", "5", "0"],
                                                         ["4", "2", "1", "1"]]

    total = _cells(next(line for line in lines if line.startswith("total")))
    assert total[:2] == ["total", "3 runs"]
    prompt, completion = sum(r["prompt_tokens"] for r in rows), sum(r["completion_tokens"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    assert [int(v) for v in total[2:8]] == [14, 7, 6, 1, prompt, completion]
    assert float(total[8]) == pytest.approx(wall, abs=0.051)
    assert float(total[9]) == pytest.approx((prompt + completion) / wall, abs=0.051)
    assert total[10] == f"${sum(r['cost_avoided_usd'] for r in rows[:2]):.6f}"
    assert lines[-1].startswith("total")

    png = base / "stats.png"
    assert png.stat().st_size > 1024
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 500 and height > 500


def test_png_path_and_no_png(folders, tmp_path):
    base, a, b, _ = folders
    target = tmp_path / "chart.png"
    assert _stats(str(b), "--png", str(target), cwd=tmp_path).returncode == 0
    assert target.read_bytes()[:4] == b"\x89PNG"
    result = _stats(str(b), "--no-png", cwd=tmp_path)
    assert result.returncode == 0 and "cost avoided" not in result.stdout  # no run there recorded a cost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart.png"]


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("python -m flows.stats: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_and_corrupt_usage_are_one_line_errors(folders, tmp_path):
    base, a, _, _ = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_error(_stats(str(a), str(empty), "--no-png", cwd=tmp_path), str(empty), "usage.parquet")
    _assert_one_line_error(_stats(str(tmp_path / "nowhere"), cwd=tmp_path), str(tmp_path / "nowhere"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "usage.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    _assert_one_line_error(_stats(str(corrupt), cwd=tmp_path), str(corrupt), "usage.parquet")
    assert not (tmp_path / "stats.png").exists()
