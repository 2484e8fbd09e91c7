"""Read finished runs back from output folders: the per-run table and chart of `python -m flows.stats`.

Everything here is read-only. `OUT/usage.parquet` (one row per run, see `RunStats.row()`) gives
the table; `OUT/results.parquet` adds per-row data: for each run, the median decode speed of the
rows that run generated and that are still in the results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from tokenmill.errors import InputError
from tokenmill.contract import GENERATED, RESULTS_FILE, USAGE_FILE


# Without these a usage table cannot be reported; the other columns are shown as "-" when absent
# (usage.parquet written by an older tokenmill, before rows_generated or cost_avoided_usd existed).
REQUIRED = ("run_id", "started_at", "rows_total", "rows_error", "prompt_tokens", "completion_tokens", "wall_s")
REUSED = ("rows_cached", "rows_duplicate", "rows_resumed")


@dataclass
class RunReport:
    """One run of one output folder, as the table and the chart show it."""

    out: str
    run_id: str
    started_at: datetime | None
    rows_total: int
    rows_generated: int | None
    rows_reused: int | None  # cached + duplicate + resumed
    rows_error: int
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    completion_tokens_per_s: float
    cost_avoided_usd: float | None
    backend: str | None
    device: str | None
    row_decode_tps: float | None = None  # median over rows this run generated: completion tokens / decode time
    rows_timed: int = 0  # rows behind row_decode_tps

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Totals:
    runs: int
    rows_total: int
    rows_generated: int | None
    rows_reused: int | None
    rows_error: int
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float  # all tokens over all wall time, not a sum of rates
    cost_avoided_usd: float | None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _num(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _sum_known(values: list) -> Any:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def read_usage(out: str | Path) -> list[RunReport]:
    """The runs recorded in `out/usage.parquet`, oldest first; InputError naming `out` when unusable."""
    label = str(out)
    folder = Path(out)
    if not folder.exists():
        raise InputError(f"{label}: no such folder; pass output folders written by a tokenmill run (their --out)")
    if not folder.is_dir():
        raise InputError(f"{label} is not a folder; pass output folders written by a tokenmill run (their --out)")
    path = folder / USAGE_FILE
    if not path.is_file():
        raise InputError(f"{label} has no {USAGE_FILE}: not a tokenmill output folder, or no run there has finished")
    try:
        df = pl.read_parquet(path)
    except Exception as exc:  # polars, Arrow and OS errors alike: the file is unreadable
        raise InputError(f"{label}: {USAGE_FILE} cannot be read ({_one_line(exc)}); "
                         f"it is corrupt or not Parquet") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise InputError(f"{label}: {USAGE_FILE} is not a tokenmill usage table "
                         f"(missing columns: {', '.join(missing)})")
    if df.height == 0:
        raise InputError(f"{label}: {USAGE_FILE} records no runs")

    runs = []
    for r in df.to_dicts():
        def get(key: str) -> Any:
            return _num(r.get(key))

        wall = float(get("wall_s") or 0.0)
        prompt, completion = int(get("prompt_tokens") or 0), int(get("completion_tokens") or 0)
        tps = get("tokens_per_s")
        ctps = get("completion_tokens_per_s")
        reused = [get(k) for k in REUSED]
        started = r.get("started_at")
        if isinstance(started, datetime):
            started = started.astimezone(timezone.utc) if started.tzinfo else started.replace(tzinfo=timezone.utc)
        else:
            started = None
        runs.append(RunReport(
            out=label, run_id=str(r["run_id"]), started_at=started,
            rows_total=int(get("rows_total") or 0),
            rows_generated=None if get("rows_generated") is None else int(get("rows_generated")),
            rows_reused=_sum_known(reused),
            rows_error=int(get("rows_error") or 0),
            prompt_tokens=prompt, completion_tokens=completion, wall_s=wall,
            tokens_per_s=float(tps) if tps is not None else ((prompt + completion) / wall if wall > 0 else 0.0),
            completion_tokens_per_s=float(ctps) if ctps is not None else (completion / wall if wall > 0 else 0.0),
            cost_avoided_usd=None if get("cost_avoided_usd") is None else float(get("cost_avoided_usd")),
            backend=r.get("backend"), device=r.get("device"),
        ))
    runs.sort(key=lambda run: run.started_at or datetime.min.replace(tzinfo=timezone.utc))
    return runs


def read_row_speeds(out: str | Path) -> dict[str, tuple[float, int]]:
    """run_id -> (median decode tokens/s of one row, rows counted), from `out/results.parquet`.

    Only rows a run generated itself count (produced == "generated" with its run_id; reused rows
    keep the run that generated them). results.parquet holds the latest state of each input row,
    so a run whose rows were all regenerated later has no entry. A missing results.parquet, or one
    from an older tokenmill without these columns, gives no entries; a corrupt one is an error.
    """
    path = Path(out) / RESULTS_FILE
    if not path.is_file():
        return {}
    needed = ["run_id", "produced", "completion_tokens", "decode_ms"]
    try:
        schema = pl.read_parquet_schema(path)
        if any(c not in schema for c in needed):
            return {}
        speeds = (
            pl.scan_parquet(path).select(needed)
            .filter((pl.col("produced") == GENERATED) & (pl.col("decode_ms") > 0) & (pl.col("completion_tokens") > 0))
            .group_by("run_id")
            .agg((pl.col("completion_tokens") / (pl.col("decode_ms") / 1000)).median().alias("tps"),
                 pl.len().alias("n"))
            .collect()
        )
    except Exception as exc:
        raise InputError(f"{out}: {RESULTS_FILE} cannot be read ({_one_line(exc)}); "
                         f"it is corrupt or not Parquet") from None
    return {r["run_id"]: (float(r["tps"]), int(r["n"])) for r in speeds.to_dicts()}


def collect(outs: list[str | Path]) -> list[RunReport]:
    """Every run of every folder, folders in the order given (a folder named twice counts once)."""
    runs: list[RunReport] = []
    seen: set[Path] = set()
    for out in outs:
        key = Path(out).resolve()
        if key in seen:
            continue
        seen.add(key)
        folder_runs = read_usage(out)
        speeds = read_row_speeds(out)
        for run in folder_runs:
            if run.run_id in speeds:
                run.row_decode_tps, run.rows_timed = speeds[run.run_id]
        runs.extend(folder_runs)
    return runs


def totals(runs: list[RunReport]) -> Totals:
    prompt = sum(r.prompt_tokens for r in runs)
    completion = sum(r.completion_tokens for r in runs)
    wall = sum(r.wall_s for r in runs)
    return Totals(
        runs=len(runs), rows_total=sum(r.rows_total for r in runs),
        rows_generated=_sum_known([r.rows_generated for r in runs]),
        rows_reused=_sum_known([r.rows_reused for r in runs]),
        rows_error=sum(r.rows_error for r in runs), prompt_tokens=prompt, completion_tokens=completion,
        wall_s=wall, tokens_per_s=(prompt + completion) / wall if wall > 0 else 0.0,
        cost_avoided_usd=_sum_known([r.cost_avoided_usd for r in runs]),
    )


# --- the table ------------------------------------------------------------------------------------

COST_HEADER = "cost avoided (est.)"


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "int":
        return str(int(value))
    if kind == "f1":
        return f"{value:.1f}"
    if kind == "usd":
        return f"${value:.6f}"
    if kind == "time":
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def format_table(runs: list[RunReport]) -> list[str]:
    """Header, rule, one line per run, then the totals line; columns are separated by two or more spaces."""
    with_cost = any(r.cost_avoided_usd is not None for r in runs)
    # (header, kind, left-aligned?, value of a run, value of the totals line)
    t = totals(runs)
    cols: list[tuple[str, str, bool, Any, Any]] = [
        ("out", "str", True, lambda r: r.out, "total"),
        ("run", "str", True, lambda r: r.run_id[:8], f"{t.runs} runs"),
        ("started_at (UTC)", "time", True, lambda r: r.started_at, ""),
        ("rows", "int", False, lambda r: r.rows_total, t.rows_total),
        ("generated", "int", False, lambda r: r.rows_generated, t.rows_generated),
        ("reused", "int", False, lambda r: r.rows_reused, t.rows_reused),
        ("errors", "int", False, lambda r: r.rows_error, t.rows_error),
        ("prompt_tokens", "int", False, lambda r: r.prompt_tokens, t.prompt_tokens),
        ("completion_tokens", "int", False, lambda r: r.completion_tokens, t.completion_tokens),
        ("wall_s", "f1", False, lambda r: r.wall_s, t.wall_s),
        ("tokens/s", "f1", False, lambda r: r.tokens_per_s, t.tokens_per_s),
    ]
    if with_cost:
        cols.append((COST_HEADER, "usd", False, lambda r: r.cost_avoided_usd, t.cost_avoided_usd))
    cols += [
        ("backend", "str", True, lambda r: r.backend, ""),
        ("device", "str", True, lambda r: r.device, ""),
    ]
    grid = [[h for h, *_ in cols]]
    for r in runs:
        grid.append([_fmt(get(r), kind) for _, kind, _, get, _ in cols])
    grid.append([_fmt(total, kind) if total != "" else "" for _, kind, _, _, total in cols])
    widths = [max(len(row[i]) for row in grid) for i in range(len(cols))]

    def line(cells: list[str]) -> str:
        parts = [c.ljust(w) if left else c.rjust(w) for c, w, (_, _, left, _, _) in zip(cells, widths, cols)]
        return "  ".join(parts).rstrip()

    lines = [line(row) for row in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


# --- the chart ------------------------------------------------------------------------------------

def _run_label(run: RunReport, folders: int) -> str:
    name = Path(run.out).name or run.out
    return f"{name}\n{run.run_id[:8]}" if folders > 1 else run.run_id[:8]


def write_chart(runs: list[RunReport], path: str | Path) -> Path:
    """Two panels, one group of bars per run: throughput (tokens/s) and tokens processed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise InputError("drawing the chart needs matplotlib: pip install matplotlib, or pass --no-png") from None

    path = Path(path)
    folders = len({r.out for r in runs})
    n = len(runs)
    x = list(range(n))
    labels = [_run_label(r, folders) for r in runs]
    fig = Figure(figsize=(max(6.0, 1.2 * n + 2) + 3.2, 8.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    speed, tokens = fig.subplots(2, 1, sharex=True)
    thousands = FuncFormatter(lambda v, _: f"{v:,.0f}")
    outside = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8, "frameon": False}

    # Panel 1: each run's wall-clock throughput from usage.parquet; one row's speed from results.parquet.
    timed = [(i, r.row_decode_tps) for i, r in zip(x, runs) if r.row_decode_tps is not None]
    w = 0.27 if timed else 0.38
    shift = w if timed else w / 2
    bars = [
        speed.bar([i - shift for i in x], [r.tokens_per_s for r in runs], w, color="#4C72B0",
                  label="prompt + completion tokens\nper wall second (usage)"),
        speed.bar([i - shift + w for i in x], [r.completion_tokens_per_s for r in runs], w, color="#DD8452",
                  label="completion tokens\nper wall second (usage)"),
    ]
    if timed:
        bars.append(speed.bar([i + w for i, _ in timed], [v for _, v in timed], w, color="#BBBBBB", hatch="//",
                              edgecolor="#666666", label="one row's decode speed:\nmedian completion tokens\n"
                              "per decode second over\nthe rows the run generated\n(results.parquet)"))
    for b in bars:
        speed.bar_label(b, fmt="{:,.0f}", fontsize=8, padding=2)
    speed.set_ylabel("tokens / s")
    speed.set_title("Throughput per run")
    speed.yaxis.set_major_formatter(thousands)
    speed.margins(y=0.12)
    speed.legend(**outside)
    speed.grid(axis="y", alpha=0.3)

    # Panel 2: tokens the model processed in each run (reused rows cost none).
    prompt = [r.prompt_tokens for r in runs]
    completion = [r.completion_tokens for r in runs]
    tokens.bar(x, prompt, 0.6, color="#4C72B0", label="prompt tokens")
    top = tokens.bar(x, completion, 0.6, bottom=prompt, color="#DD8452", label="completion tokens")
    tokens.bar_label(top, labels=[f"{r.tokens:,}\n{_rows_note(r)}" for r in runs], fontsize=8, padding=2)
    tokens.set_ylabel("tokens")
    tokens.set_title("Tokens processed per run")
    tokens.yaxis.set_major_formatter(thousands)
    tokens.margins(y=0.2)
    tokens.legend(**outside)
    tokens.grid(axis="y", alpha=0.3)
    tokens.set_xticks(x, labels, fontsize=8)
    tokens.set_xlabel("run, oldest first per folder (rows reused from an earlier run or the cache add no tokens)")

    fig.suptitle("tokenmill runs", fontsize=12)
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise InputError(f"cannot write the chart to {path}: {exc.strerror or exc}; choose another --png") from None
    return path


def _rows_note(run: RunReport) -> str:
    if run.rows_generated is None:
        return f"{run.rows_total} rows"
    return f"{run.rows_generated}/{run.rows_total} rows gen."
