"""What an output folder has generated already, on disk: a SQLite index of row keys.

A rerun, a grown input or a duplicate row must never send the same prompt to the model twice,
and a 10-million-row folder must not be loaded into memory to find out. The index maps each
row key to its stored record (`contract.STORED_FIELDS`). It is derived data: the Parquet files
(results.parquet and parts/) are the truth, and the index remembers which of them it has read
(name, size, mtime). Any file it has not read, or that changed, is read into it at the start of
a run; a file it knew that is gone (a folder edited by hand) makes it start over from the files.

During a run the sink adds the new rows of each Parquet part once the part is on disk, in one
transaction with the part's name: the index never holds a row the files lack.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from itertools import compress
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import orjson
import pyarrow.parquet as pq

from tokenmill.contract import (INDEX_FILE, PARTS_DIR, RESULTS_FILE, REUSABLE, STORED_FIELDS, columns_of,
                                load_record, record_index, stored_rows)

# Records go into a rowid table (appended in order) with a separate index of keys. The keys are
# random hashes, so every part's records land all over that index's B-tree, and each commit
# rewrites most of its pages: the B-tree is kept small by indexing 63 bits of each key (its last 16 hex digits) as an
# integer (`key_hash`; 8 bytes, not 64 characters), with the full key stored and checked on
# every read. At a million rows this cut the index's write time to about half. A folder with
# an index of an older form gets a new one, read from its Parquet files (`_open`).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (h INTEGER NOT NULL UNIQUE, key TEXT NOT NULL, ok INTEGER NOT NULL, run_id TEXT,
                                    record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Many records in one statement (`bulk` of `contract.stored_rows(...)`: [key hash, key, record]
# triples). A record replaces a stored one unless it would turn a reusable result into
# an error (or the stored one is another key's whose hash is the same).
_UPSERT = ("INSERT INTO records (h, key, ok, run_id, record) "
           f"SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
           f"coalesce(json_extract(value, '$[2][{record_index('finish_reason')}]') IN {tuple(REUSABLE)!r}, 0), "
           f"json_extract(value, '$[2][{record_index('run_id')}]'), json_extract(value, '$[2]') "
           "FROM json_each(?) WHERE true ON CONFLICT(h) DO UPDATE SET key = excluded.key, ok = excluded.ok, "
           "run_id = excluded.run_id, record = excluded.record "
           "WHERE excluded.ok >= records.ok OR excluded.key != records.key")
WAL_PAGES = 10_000  # checkpoint the write-ahead log at about 40 MB, not SQLite's 4 MB: fewer syncs and page rewrites
WRITER_CACHE_KIB = 32_768  # a background writer's page cache (SQLite's default is 2 MiB): a million rows' key B-tree fits


class FolderIndex:
    """Row key -> stored record for one output folder (see the module doc)."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out / INDEX_FILE
        self._db = self._open()
        self._writes: sqlite3.Connection | None = None  # add_parts's, for a background thread

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            sql = _table_sql(db, "records")
            if sql is not None and "h INTEGER" not in sql:
                raise sqlite3.DatabaseError("an index of an older form")
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError:  # not a database (a crash mid-creation, a stray file), or old: start over
            db.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.executescript(_SCHEMA)
        _tune(db)
        return db

    # -- reading the folder's Parquet files ------------------------------------------------
    def _files_on_disk(self) -> list[Path]:
        files = [self.out / RESULTS_FILE] if (self.out / RESULTS_FILE).exists() else []
        return files + sorted((self.out / PARTS_DIR).glob("*.parquet"))

    def sync(self) -> int:
        """Read every Parquet file of the folder the index does not know yet; returns how many."""
        known = {name: (size, mtime) for name, size, mtime in self._db.execute("SELECT * FROM files")}
        present = {self._name(p): p for p in self._files_on_disk()}
        if any(name not in present for name in known):  # something was removed behind our back
            self._db.executescript("DELETE FROM records; DELETE FROM files; DELETE FROM state;")
            known = {}
        read = 0
        for name, path in present.items():
            stat = path.stat()
            if known.get(name) == (stat.st_size, stat.st_mtime_ns):
                continue
            self._db.execute("BEGIN")
            try:
                self._ingest(path)
                self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?)", (name, stat.st_size, stat.st_mtime_ns))
                self._db.execute("DELETE FROM state")  # the folder changed: the last run's summary no longer holds
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            read += 1
        return read

    def _name(self, path: Path) -> str:
        return str(path.relative_to(self.out))

    def _ingest(self, path: Path) -> None:
        """Add a Parquet file's records; a file cut short by a crash is skipped (its rows are
        generated again)."""
        try:
            file = pq.ParquetFile(path)
        except Exception:
            return
        columns = [c for c in STORED_FIELDS if c in file.schema_arrow.names]
        if "row_key" not in columns or "finish_reason" not in columns:
            return
        for batch in file.iter_batches(batch_size=20_000, columns=columns):
            values = batch.to_pydict()
            self._put(row for row in stored_rows(values) if row[0] is not None)

    # -- records ---------------------------------------------------------------------------
    def get(self, key: str) -> dict | None:
        found = self.get_many([key])
        return found.get(key)

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        """The stored records of those `keys` the index holds."""
        return dict(select_many(self._db, "SELECT key, record FROM records WHERE h IN (SELECT value FROM json_each(?))",
                                keys))

    def put_many(self, records: Iterable[dict]) -> None:
        self._put(rows(records))

    def _put(self, stored: Iterable[tuple[str, tuple]]) -> None:
        for piece in bulk(stored):
            self._db.execute(_UPSERT, piece)

    def put(self, record: dict) -> None:
        self.put_many([record])

    def empty(self) -> bool:
        return self._db.execute("SELECT 1 FROM records LIMIT 1").fetchone() is None

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM records").fetchone()[0]

    # -- the run's transaction -------------------------------------------------------------
    def add_parts(self, parts: list[tuple[Path, list[tuple[str]]]]) -> None:
        """Parts are on disk: add their new records (as `bulk` made them) and the parts
        themselves, in one transaction. Callable from one other thread
        (tokenmill.io.background), on a connection of its own, while this thread reads."""
        if self._writes is None:
            self._writes = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            _tune(self._writes)
            self._writes.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
        db = self._writes
        db.execute("BEGIN")
        try:
            for part, prepared in parts:
                stat = part.stat()
                for piece in prepared:
                    db.execute(_UPSERT, piece)
                db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?)",
                           (self._name(part), stat.st_size, stat.st_mtime_ns))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def merged(self, results: Path, state: dict | None) -> None:
        """Every part went into `results`: forget the parts, remember the results file and
        what the run that wrote it found (`state`, for a quick rerun; None: nothing to remember)."""
        stat = results.stat()
        self.rollback()
        self._db.execute("BEGIN")
        self._db.execute("DELETE FROM files")
        self._db.execute("INSERT INTO files VALUES (?, ?, ?)", (self._name(results), stat.st_size, stat.st_mtime_ns))
        self._db.execute("DELETE FROM state")
        if state is not None:
            self._db.execute("INSERT INTO state VALUES ('last_run', ?)", (json.dumps(state),))
        self._db.execute("COMMIT")

    def last_run(self) -> dict | None:
        """What the last complete run recorded, while the folder's files are as it left them."""
        row = self._db.execute("SELECT value FROM state WHERE name = 'last_run'").fetchone()
        return json.loads(row[0]) if row else None

    def close(self) -> None:
        self.rollback()
        if self._writes is not None:
            self._writes.close()
        self._db.close()


def _table_sql(db: sqlite3.Connection, name: str) -> str | None:
    row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
    return row[0] if row else None


def _tune(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # derived data: a lost commit is read again from the files
    db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")


def rows(records: Iterable[dict]) -> list[tuple[str, tuple]]:
    """Index rows (`contract.stored_rows`) of records given as dicts."""
    records = list(records)
    return list(stored_rows(columns_of(records, STORED_FIELDS)))


def as_json(items: list) -> str:
    """Many rows as one JSON text, which a statement reads with SQLite's json_each: a bulk write or
    lookup is one call into SQLite, which releases the GIL for all of it. With executemany (one
    call per row, the GIL taken back after each) a background writer beside a busy Python thread
    ran about 6x slower than alone; this way, 1.5x. (Text, not bytes: newer SQLite reads a blob
    as its binary JSONB.)"""
    return orjson.dumps(items, default=str).decode()


def pieces(items: list, size: int = 5_000) -> Iterator[tuple[str]]:
    """`items` as the parameters of a few `json_each(?)` statements, `size` items each (a piece's
    text stays a few MB even when the items are long texts)."""
    for start in range(0, len(items), size):
        yield (as_json(items[start:start + size]),)


_H_MASK = (1 << 63) - 1  # SQLite's integers are signed 64-bit


def key_hash(key: str) -> int:
    """What the index and the cache look a row key up by: 63 of its last 64 bits (a row key is
    hex SHA-256), or of its SHA-256 for any other text."""
    try:
        return int(key[-16:], 16) & _H_MASK
    except ValueError:
        return int(hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[-16:], 16) & _H_MASK


def bulk(stored: Iterable[tuple[str, Any]]) -> list[tuple[str]]:
    """(key, record) pairs (`contract.stored_rows`) as the parameters of the bulk writes of the
    index and the cache: JSON texts (`pieces`) of (key hash, key, record). Made in the thread
    that has the records, so the background writer holds the GIL for nothing but SQLite's calls
    (a writer serializing in Python took the GIL from the scheduler for milliseconds at a time)."""
    return list(pieces([(key_hash(key), key, record) for key, record in stored]))


def select_many(db: sqlite3.Connection, query: str, keys: list[str]):
    """(key, record) rows of `query` for `keys`: its one parameter is the JSON array of their
    `key_hash`es (`json_each(?)`), and it returns (key, record) rows; a row of another key with
    the same hash is left out."""
    wanted = set(keys)
    for key, text in db.execute(query, (as_json([key_hash(k) for k in wanted]),)):
        if key in wanted:
            yield key, load_record(text, key)


class KeyFilter:
    """A Bloom filter of row keys: `select(keys)` keeps every key added before, and drops every
    other key but about 1-2% of them once 10 million are in (by chance). 16 MiB, whatever the
    number of keys. A run that starts with an empty index or cache asks them only about the keys it
    has added itself. Keys go in and are asked about a chunk at a time, in numpy; a key's three
    bits share one 64-bit word (one memory access, not three), chosen by Python's own string
    hash, so the filter is for one process's run, never stored."""

    def __init__(self, words_log2: int = 21):
        self._words = np.zeros(1 << words_log2, dtype=np.uint64)
        self._shift = np.uint64(words_log2)
        self._mask = np.uint64((1 << words_log2) - 1)

    def _where(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each key's word and the mask of its three bits in it."""
        h = np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys)).view(np.uint64)
        rest, six = h >> self._shift, np.uint64(63)
        one = np.uint64(1)
        bits = (one << (rest & six)) | (one << ((rest >> np.uint64(6)) & six)) | (one << ((rest >> np.uint64(12)) & six))
        return h & self._mask, bits

    def add_many(self, keys: list[str]) -> None:
        if keys:
            word, bits = self._where(keys)
            np.bitwise_or.at(self._words, word, bits)

    def select(self, keys: list[str]) -> list[str]:
        """Those of `keys` that may have been added."""
        if not keys:
            return []
        word, bits = self._where(keys)
        return list(compress(keys, ((self._words[word] & bits) == bits).tolist()))
