"""A simulation's output folder: one directory per committed step, renamed into place atomically.

OUT/steps/000004/ holds that step's events, llm_calls, memories and agents tables. It is written
as OUT/steps/.000004.tmp-PID/ (every file fsynced) and renamed: the rename is the commit, so a
step is wholly in or not at all, and a run killed mid-step loses that step only. Step 0 holds
the initial memories and places. The top-level tables (OUT/events.parquet, ...) merge every
committed step and are rewritten, atomically, after each one; a reader may use either.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import polars as pl

from tokenmill.errors import OutputError
from tokenmill.io.parts import write_atomic

STEPS_DIR = "steps"
TABLES = ("events", "llm_calls", "memories", "agents")
SCHEMAS = {
    "events": {"step": pl.Int64, "sim_time": pl.Datetime("us"), "agent": pl.String, "action": pl.String,
               "target": pl.String, "content": pl.String, "location": pl.String, "importance": pl.Int64,
               "note": pl.String},
    "llm_calls": {"step": pl.Int64, "agent": pl.String, "purpose": pl.String, "prompt_tokens": pl.Int64,
                  "cached_tokens": pl.Int64, "completion_tokens": pl.Int64, "latency_ms": pl.Float64,
                  "seed": pl.Int64, "status": pl.String, "error": pl.String, "finish_reason": pl.String,
                  "raw_output": pl.String, "turn": pl.String, "fresh": pl.Boolean, "shown": pl.List(pl.Int64)},
    "memories": {"agent": pl.String, "step": pl.Int64, "kind": pl.String, "text": pl.String,
                 "importance": pl.Int64, "index": pl.Int64},
    "agents": {"step": pl.Int64, "agent": pl.String, "location": pl.String, "memories": pl.Int64,
               "last_action": pl.String, "persona": pl.String, "goals": pl.List(pl.String)},
}
ORDER = {"events": ["step"], "llm_calls": ["step"], "memories": ["step"], "agents": ["step"]}


def frame(table: str, rows: list[dict]) -> pl.DataFrame:
    schema = SCHEMAS[table]
    return pl.DataFrame([{k: r.get(k) for k in schema} for r in rows], schema=schema)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StepStore:
    """The committed steps of one output folder."""

    def __init__(self, out: Path):
        self.out = out
        self.dir = out / STEPS_DIR

    def prepare(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {self.out}: {exc.strerror or exc}; choose another --out") from None
        for tmp in self.dir.glob(".*.tmp-*"):  # a step a killed run was writing: not committed
            shutil.rmtree(tmp, ignore_errors=True)

    def committed(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.dir.iterdir() if p.is_dir() and p.name.isdigit())

    def last(self) -> int:
        steps = self.committed()
        return steps[-1] if steps else -1

    def commit(self, step: int, tables: dict[str, pl.DataFrame]) -> None:
        final = self.dir / f"{step:06d}"
        tmp = self.dir / f".{step:06d}.tmp-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, df in tables.items():
                df.write_parquet(tmp / f"{name}.parquet")
                _fsync(tmp / f"{name}.parquet")
            _fsync(tmp)
            os.rename(tmp, final)  # the commit
            _fsync(self.dir)
        except (OSError, pl.exceptions.PolarsError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputError(f"cannot commit step {step} in {self.dir}: {exc}; steps already committed are kept; "
                              "free space or fix the folder, then run the same command again") from None

    def load(self, table: str, upto: int | None = None) -> pl.DataFrame:
        files = [self.dir / f"{s:06d}" / f"{table}.parquet" for s in self.committed() if upto is None or s <= upto]
        files = [f for f in files if f.exists()]
        if not files:
            return frame(table, [])
        return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")

    def merge(self, checkpoint_every: int) -> None:
        """Rewrite the top-level tables from every committed step."""
        for table in TABLES:
            df = self.load(table)
            if table == "agents":
                last = df["step"].max() if df.height else 0
                df = df.filter((pl.col("step") % checkpoint_every == 0) | (pl.col("step") == last))
            write_atomic(df, self.out / f"{table}.parquet")

    def fork_from(self, source: "StepStore", step: int) -> None:
        """Copy steps 0..step of another run here (each copied step is committed by a rename too)."""
        have = source.committed()
        if step not in have:
            last = have[-1] if have else None
            raise OutputError(f"--fork-from {step}: {source.out} has no committed step {step} "
                              f"(its last committed step is {last})")
        for s in have:
            if s > step:
                break
            if (self.dir / f"{s:06d}").exists():
                continue
            tmp = self.dir / f".{s:06d}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source.dir / f"{s:06d}", tmp)
            os.rename(tmp, self.dir / f"{s:06d}")
        _fsync(self.dir)


def read_run_info(out: Path) -> dict | None:
    path = out / "run.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise OutputError(f"{path} is unreadable; choose another --out") from None


def write_run_info(out: Path, info: dict) -> None:
    path = out / "run.json"
    tmp = path.with_name(f".run.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
    os.replace(tmp, path)
