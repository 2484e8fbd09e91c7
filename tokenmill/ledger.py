"""What has been generated already: in this output folder (resume) and across runs (cache).

Results are found again by row key (model hash + rendered prompt + generation parameters),
so a rerun, a grown input or a duplicate row never sends the same prompt to the model twice.
Stored records keep the raw model output: reuse re-parses it, so a parser fix never costs
a regeneration.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from pathlib import Path

import polars as pl

from tokenmill.errors import InputError
from tokenmill.io.parts import PARTS_DIR
from tokenmill.models.resolve import cache_root

RESULTS_FILE = "results.parquet"
REUSABLE = ("stop", "length")  # finish reasons whose raw output can be reused
# The fields a reused result takes from the stored record; the rest is recomputed.
STORED_FIELDS = ("row_key", "raw_output", "finish_reason", "error", "prompt_tokens", "cached_tokens",
                 "completion_tokens", "chunks", "calls", "latency_ms", "queue_ms", "prompt_ms", "decode_ms", "model", "produced",
                 "run_id", "confidence")


def _records(frame: pl.DataFrame) -> list[dict]:
    present = [c for c in STORED_FIELDS if c in frame.columns]
    return frame.select(present).filter(pl.col("row_key").is_not_null()).to_dicts()


class Ledger:
    """Results an output folder already holds: merged results of earlier runs plus parts of killed ones."""

    def __init__(self, records: dict[str, dict]):
        self._records = records

    @classmethod
    def load(cls, out: Path) -> "Ledger":
        files = [out / RESULTS_FILE] if (out / RESULTS_FILE).exists() else []
        files += sorted((out / PARTS_DIR).glob("*.parquet"))
        records: dict[str, dict] = {}
        for path in files:
            try:
                frame = pl.read_parquet(path)
            except Exception:  # a part cut short by a crash holds nothing we can trust
                continue
            for record in _records(frame):
                if record["finish_reason"] in REUSABLE or record["row_key"] not in records:
                    records[record["row_key"]] = record
        return cls(records)

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str, retry_errors: bool) -> dict | None:
        record = self._records.get(key)
        if record is None or (retry_errors and record["finish_reason"] not in REUSABLE):
            return None
        return record


class ResultCache:
    """Generated outputs shared across runs and output folders, in one SQLite file."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "results.sqlite"
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS results (row_key TEXT PRIMARY KEY, record TEXT NOT NULL)")

    def get(self, key: str) -> dict | None:
        row = self._db.execute("SELECT record FROM results WHERE row_key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, record: dict) -> None:
        if record.get("finish_reason") not in REUSABLE:
            return
        stored = {k: record.get(k) for k in STORED_FIELDS}
        self._db.execute("INSERT OR REPLACE INTO results VALUES (?, ?)", (record["row_key"], json.dumps(stored)))

    def close(self) -> None:
        self._db.close()


def default_cache_dir() -> Path:
    return cache_root() / "results"


class OutputLock:
    """One run per output folder at a time; a lock left by a dead run is taken over."""

    def __init__(self, out: Path):
        self.path = out / ".tokenmill.lock"
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None:
                    raise InputError(
                        f"output folder {self.path.parent} is in use by another run (pid {owner['pid']}, "
                        f"started {time.strftime('%H:%M:%S', time.localtime(owner['started']))}); "
                        "wait for it to finish or choose another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its run is gone
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, fh)
            self.held = True
            return
        raise InputError(f"cannot take the lock {self.path}; remove it if no run is using {self.path.parent}")

    def _owner(self) -> dict | None:
        """The live run holding the lock, or None when the lock is stale or unreadable."""
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if owner.get("host") != socket.gethostname():
            return owner  # cannot check a pid on another machine: assume it is alive
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return owner
        return owner

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
