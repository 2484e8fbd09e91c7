"""Generated outputs shared across runs and output folders (the results cache), and the lock
that gives one run at a time an output folder.

Results are found again by row key (model hash + rendered prompt + generation parameters),
so the same prompt is never sent to the model twice, whichever folder asked first. Stored
records keep the raw model output: reuse re-parses it, so a parser fix never costs a
regeneration. What one output folder holds is indexed by tokenmill.io.index.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from pathlib import Path

from tokenmill.contract import LOCK_FILE
from tokenmill.errors import InputError
from tokenmill.io.index import WAL_PAGES, WRITER_CACHE_KIB, bulk, select_many
from tokenmill.models.resolve import cache_root

class ResultCache:
    """Generated outputs shared across runs and output folders, in one SQLite file. A run writes
    them a results part at a time (`write`, from tasks/sink.py), visible to other runs at once.
    Keys are looked up by their hash, as in the folder index (tokenmill/io/index.py: `key_hash`)."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "results.sqlite"
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS records (h INTEGER NOT NULL UNIQUE, key TEXT NOT NULL, "
                         "record TEXT NOT NULL)")
        self._migrate()
        self._writes: sqlite3.Connection | None = None  # write's, for a background thread

    def _migrate(self) -> None:
        """A cache of the older form (table `results`, keyed by the whole key) moves into
        `records`, once, in one transaction."""
        db = self._db
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'results'").fetchone() is None:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'results'").fetchone():
                old = db.execute("SELECT row_key, record FROM results")
                while batch := old.fetchmany(5_000):  # (records as JSON texts; the oldest were bytes)
                    texts = [(key, r.decode() if isinstance(r, bytes) else r) for key, r in batch]
                    for piece in bulk(texts):
                        db.execute(_INSERT, piece)
                db.execute("DROP TABLE results")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def get(self, key: str) -> dict | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        return dict(select_many(
            self._db, "SELECT key, record FROM records WHERE h IN (SELECT value FROM json_each(?))", keys))

    def empty(self) -> bool:
        return self._db.execute("SELECT 1 FROM records LIMIT 1").fetchone() is None

    def write(self, prepared: list[tuple[str]]) -> None:
        """Store reusable records, as `io.index.bulk` made them of (row key, stored record) pairs
        (`contract.stored_rows`), in one transaction.
        Callable from one other thread (tokenmill.io.background), on a connection of its own."""
        if not prepared:
            return
        if self._writes is None:
            self._writes = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._writes.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            self._writes.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
        with self._writes:
            self._writes.execute("BEGIN")
            for piece in prepared:
                self._writes.execute(_INSERT, piece)

    def close(self) -> None:
        if self._writes is not None:
            self._writes.close()
        self._db.close()


# (key hash, key, record) triples, many per statement; a record replaces the one stored
_INSERT = ("INSERT OR REPLACE INTO records (h, key, record) SELECT json_extract(value, '$[0]'), "
           "json_extract(value, '$[1]'), json_extract(value, '$[2]') FROM json_each(?)")


def default_cache_dir() -> Path:
    return cache_root() / "results"


class OutputLock:
    """One run per output folder at a time; a lock left by a dead run is taken over."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
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
