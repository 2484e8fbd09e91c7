"""`python -m flows.bench scale [--rows N]`: tokenmill's own cost per row, and its memory.

Runs `python -m flows.summarize` on the zero-cost echo backend (no model: see
tokenmill/models/echo.py) over N generated rows (default 1,000,000; 1% of them repeat an
earlier text, so dedupe is exercised), then the same command again with nothing left to do.
Prints rows/s against the target of 20,000 rows/s, and the peak resident memory of the
command's process and of its whole process tree (Prefect's temporary server included),
sampled every 0.2 s. A machine that is busy makes rows/s lower: the load average is printed
first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

TARGET_ROWS_S = 20_000
TARGET_RSS = 1 << 30
_WORDS = ("model reads each abstract and writes short summary what found data method result shows "
          "improves over baseline task language training paper propose approach").split()


def make_input(path: Path, rows: int, group: int = 100_000) -> None:
    """`rows` short distinct texts (about 120 characters), 1% repeating an earlier one, written
    in row groups so nothing holds them all."""
    with pq.ParquetWriter(path, pa.schema([("id", pa.int64()), ("text", pa.string())])) as writer:
        for start in range(0, rows, group):
            ids = range(start, min(rows, start + group))
            texts = []
            for i in ids:
                n = i - 7 if i % 100 == 99 else i  # every 100th row repeats the text of a row before it
                words = " ".join(_WORDS[(n * 7 + k * 3) % len(_WORDS)] for k in range(16))
                texts.append(f"Record {n}: {words}.")
            writer.write_table(pa.table({"id": list(ids), "text": texts}))


class TreeRss:
    """Peak resident memory of a process and of it plus its descendants, sampled."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every = pid, every
        self.peak_main = self.peak_tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as fh:
                        ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_main = max(self.peak_main, self._rss(self.pid))
            self.peak_tree = max(self.peak_tree, sum(self._rss(p) for p in self._tree()))
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def timed_command(argv: list[str], env: dict) -> tuple[float, int, str, TreeRss]:
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = TreeRss(proc.pid)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    rss.stop()
    lines = (err or out).strip().splitlines()
    return wall, proc.returncode, lines[-1] if lines else "", rss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.bench scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    p.add_argument("--task-rows", type=int, help="passed to the command (default: the command's own)")
    args = p.parse_args(argv)
    print(f"tokenmill bench: scale, {args.rows:,} rows on the echo backend; load average at start "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        data, out = folder / f"rows{args.rows}.parquet", folder / "out"
        t0 = time.perf_counter()
        if not data.exists():
            make_input(data, args.rows)
        print(f"  input: {data} ({data.stat().st_size / 2**20:.0f} MiB, made in {time.perf_counter() - t0:.1f} s)")
        env = {**os.environ, "TOKENMILL_CACHE_DIR": str(folder / "cache"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        argv_ = [sys.executable, "-m", "flows.summarize", str(data), "--backend", "echo", "--max-tokens", "16",
                 "--out", str(out), "--no-progress"] + (["--task-rows", str(args.task_rows)] if args.task_rows else [])
        for name in ("first run", "rerun, nothing to do"):
            wall, code, last, rss = timed_command(argv_, env)
            usage = pl.read_parquet(out / "usage.parquet").row(-1, named=True) if (out / "usage.parquet").exists() else {}
            job_s = usage.get("wall_s") or float("nan")
            print(f"  {name}: exit {code}, {wall:.1f} s wall (the job itself {job_s:.1f} s); "
                  f"{args.rows / wall:,.0f} rows/s over the whole command, {args.rows / job_s:,.0f} over the job "
                  f"({args.rows / job_s / TARGET_ROWS_S:.2f}x the {TARGET_ROWS_S:,} target)")
            print(f"    peak RSS: the command {rss.peak_main / 2**20:.0f} MiB "
                  f"({rss.peak_main / TARGET_RSS:.2f}x the 1 GiB target), with its child processes "
                  f"{rss.peak_tree / 2**20:.0f} MiB; generated {usage.get('rows_generated')}, "
                  f"duplicates {usage.get('rows_duplicate')}, resumed {usage.get('rows_resumed')}")
            print(f"    {last[:200]}", flush=True)
            if code != 0:
                return code
        results = pl.scan_parquet(out / "results.parquet")
        check = results.select(pl.len(), (pl.col("row").diff().fill_null(1) == 1).all().alias("ordered"),
                               (pl.col("status") == "ok").all().alias("ok")).collect().row(0)
        print(f"  results.parquet: {check[0]:,} rows, in input order: {check[1]}, all ok: {check[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
