"""Large inputs: rows stream through an on-disk index and a windowed merge, a finished job's
rerun reads no row, and the machine's busy cores and calibration decide the defaults.
Orchestration runs on the zero-cost echo backend in this process; calibration on the real model."""

from __future__ import annotations

import multiprocessing
import os
import time

import polars as pl
import pytest

from tests.conftest import run_echo
from tokenmill.contract import INDEX_FILE, PARTS_DIR, RESULTS_FILE
from tokenmill.io import parts as parts_module
from tokenmill.tasks import planner as planner_module
from tokenmill.tasks import sink as sink_module


def _input(path, n: int, repeat_every: int = 10):
    """n rows; every `repeat_every`-th row repeats the text of the row 3 before it."""
    texts = [f"Row {i - 3 if i % repeat_every == repeat_every - 1 else i}: a short text about item "
             f"{(i - 3 if i % repeat_every == repeat_every - 1 else i) * 7 % 1000}." for i in range(n)]
    pl.DataFrame({"id": list(range(n)), "text": texts}).write_parquet(path, row_group_size=500)
    return texts


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of at most 700 rows and a merge that sorts 1,000 rows at a time: a few thousand
    rows then take many parts and many merge windows, as millions would."""
    monkeypatch.setattr(sink_module, "MAX_PART_ROWS", 700)
    monkeypatch.setattr(parts_module, "MERGE_WINDOW", 1000)


def test_many_parts_merge_in_input_order_and_duplicates_are_generated_once(tmp_path, small_parts):
    texts = _input(tmp_path / "in.parquet", 6000)
    stats = run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=8)
    df = pl.read_parquet(tmp_path / "out" / RESULTS_FILE)
    assert df["row"].to_list() == list(range(6000)) and df["id"].to_list() == list(range(6000))
    distinct = len(set(texts))
    assert stats.rows_generated == distinct and stats.rows_duplicate == 6000 - distinct == 600
    by_text = {}
    for text, key in zip(texts, df["row_key"].to_list()):
        assert by_text.setdefault(text, key) == key  # one key, one generation per distinct text
    assert df.filter(pl.col("produced") == "duplicate")["row"].to_list() == list(range(9, 6000, 10))
    assert not (tmp_path / "out" / PARTS_DIR).exists()


def test_a_finished_job_reruns_without_reading_a_row(tmp_path, monkeypatch):
    _input(tmp_path / "in.parquet", 3000)
    run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=8)
    before = pl.read_parquet(tmp_path / "out" / RESULTS_FILE)

    def no_rows(self):
        raise AssertionError("the rerun read the input's rows")

    monkeypatch.setattr(planner_module.Planner, "planned_chunks", no_rows)
    started = time.perf_counter()
    stats = run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=8)
    assert time.perf_counter() - started < 5
    assert (stats.rows_total, stats.rows_generated, stats.rows_resumed) == (3000, 0, 3000)
    assert pl.read_parquet(tmp_path / "out" / RESULTS_FILE).equals(before)
    usage = pl.read_parquet(tmp_path / "out" / "usage.parquet")
    assert usage["rows_resumed"].to_list() == [0, 3000]


def test_a_changed_input_or_option_reads_the_rows_again_and_generates_only_new_ones(tmp_path):
    _input(tmp_path / "in.parquet", 1000)
    run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=8)
    _input(tmp_path / "in.parquet", 1200)  # 200 rows appended
    stats = run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=8)
    assert stats.rows_generated == 180 and stats.rows_resumed == 1000
    stats = run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=9)  # new keys
    assert stats.rows_generated == 1080


def test_the_index_is_rebuilt_from_the_parquet_files_when_it_is_lost(tmp_path):
    _input(tmp_path / "in.parquet", 2000)
    run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=8)
    (tmp_path / "out" / INDEX_FILE).unlink()
    stats = run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=8)
    assert (stats.rows_generated, stats.rows_resumed) == (0, 2000)
    (tmp_path / "out" / INDEX_FILE).write_bytes(b"not a database")
    stats = run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=8)
    assert (stats.rows_generated, stats.rows_resumed) == (0, 2000)


def test_rows_finished_before_a_crash_are_kept_and_not_generated_again(tmp_path, small_parts, monkeypatch):
    """The run dies after 2,500 rows: the parts it wrote are read into the index by the next run."""
    _input(tmp_path / "in.parquet", 5000, repeat_every=10**9)
    from tokenmill.tasks.scheduler import Scheduler

    real = Scheduler._complete
    seen = []

    def dying(self, completion):
        if len(seen) == 2500:
            raise KeyboardInterrupt
        seen.append(completion.index)
        real(self, completion)

    monkeypatch.setattr(Scheduler, "_complete", dying)
    with pytest.raises(KeyboardInterrupt):
        run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=8)
    kept = pl.scan_parquet(str(tmp_path / "out" / PARTS_DIR / "*.parquet")).select(pl.len()).collect().item()
    assert kept == 2500  # everything finished was written on the way out
    monkeypatch.setattr(Scheduler, "_complete", real)
    stats = run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=8)
    assert (stats.rows_generated, stats.rows_resumed) == (2500, 2500)
    df = pl.read_parquet(tmp_path / "out" / RESULTS_FILE)
    assert df["row"].to_list() == list(range(5000)) and df["row_key"].n_unique() == 5000


def test_duplicates_are_found_while_the_index_is_written_in_the_background(tmp_path, small_parts, monkeypatch):
    """Index writes run in a background thread (io/background.py); slow ones must not let a
    duplicate through while its original is between the part and the index."""
    from tokenmill.io.index import FolderIndex

    # every odd row from 800 on repeats the row 800 before it: about one part back
    texts = [f"Row {i - 800 if i >= 800 and i % 2 else i}: a short text." for i in range(4000)]
    pl.DataFrame({"id": list(range(4000)), "text": texts}).write_parquet(tmp_path / "in.parquet")
    real = FolderIndex.add_parts

    def slow(self, parts):
        time.sleep(0.05)
        real(self, parts)

    monkeypatch.setattr(FolderIndex, "add_parts", slow)
    stats = run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=8)
    assert stats.rows_generated == len(set(texts)) and stats.rows_duplicate == 4000 - len(set(texts))


def test_a_failed_index_write_fails_the_run_and_the_next_run_recovers_from_the_parts(tmp_path, small_parts, monkeypatch):
    from tokenmill.io.index import FolderIndex

    _input(tmp_path / "in.parquet", 3000, repeat_every=10**9)
    real = FolderIndex.add_parts
    calls = []

    def failing(self, parts):
        calls.append(parts)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real(self, parts)

    monkeypatch.setattr(FolderIndex, "add_parts", failing)
    with pytest.raises(OSError, match="disk full"):
        run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=8)
    monkeypatch.setattr(FolderIndex, "add_parts", real)
    stats = run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=8)
    assert stats.rows_resumed >= 1400 and stats.rows_generated + stats.rows_resumed == 3000
    df = pl.read_parquet(tmp_path / "out" / RESULTS_FILE)
    assert df["row"].to_list() == list(range(3000)) and df["row_key"].n_unique() == 3000


def _burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_the_default_thread_count_leaves_out_cores_busy_elsewhere():
    from tokenmill.models.machine import busy_cores_elsewhere, free_cores

    cores = os.cpu_count() or 1
    burners = [multiprocessing.Process(target=_burn, args=(60.0,)) for _ in range(cores)]
    for b in burners:
        b.start()
    try:
        time.sleep(0.5)
        assert busy_cores_elsewhere() > cores - 0.6
        assert free_cores() == 1
    finally:  # busy until both checks are done, then stopped
        for b in burners:
            b.terminate()
            b.join(30)


def test_calibration_is_stored_and_used_unless_options_override(tmp_path, monkeypatch):
    """A short real probe (2 slot counts, 1 thread count) on the default model."""
    from flows.calibrate import calibrate
    from tokenmill.tasks.runner import JobConfig
    from tokenmill.tasks.summarize import prepare_summarize

    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path / "cache"))
    lines = []
    best = calibrate(None, slots=(1, 2), threads=(1,), steps=8, echo=lines.append)
    assert len(best["table"]) == 2 and all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in best["table"])
    assert best["n_seq"] in (1, 2) and best["threads"] == 1
    assert any("stored in" in line for line in lines)
    data = tmp_path / "in.parquet"
    _input(data, 3)
    job = prepare_summarize(JobConfig(input=str(data), out=str(tmp_path / "out")))
    settings = job.settings()
    assert (settings.n_seq, settings.n_threads) == (best["n_seq"], 1)
    job = prepare_summarize(JobConfig(input=str(data), out=str(tmp_path / "out"), n_seq=5, n_threads=2))
    assert (job.settings().n_seq, job.settings().n_threads) == (5, 2)


def test_stored_records_are_compact_and_records_stored_as_objects_are_still_read(tmp_path):
    """The index and the cache keep records as arrays without their key (a third of the bytes);
    a cache written before that (JSON objects, in the older table keyed by the whole key) still
    serves its results."""
    import sqlite3

    import orjson

    from tokenmill.contract import STORED_FIELDS

    data = tmp_path / "in.parquet"
    pl.DataFrame({"text": [f"row {i} text" for i in range(30)]}).write_parquet(data)
    cache = tmp_path / "cache"
    run_echo("summarize", data, tmp_path / "a", cache_dir=str(cache))
    first = pl.read_parquet(tmp_path / "a" / RESULTS_FILE)
    with sqlite3.connect(cache / "results.sqlite") as db:
        stored = db.execute("SELECT key, record FROM records").fetchall()
        assert len(stored) == 30 and all(orjson.loads(record)[0] == 1 for _key, record in stored)
        assert all(isinstance(record, str) and key not in record for key, record in stored)
        # rewrite them as a cache of the older forms: table `results` keyed by the whole key,
        # records as JSON objects (half of them as bytes, the oldest form)
        db.execute("DELETE FROM records")
        db.execute("CREATE TABLE results (row_key TEXT PRIMARY KEY, record TEXT NOT NULL)")
        objects = [(key, orjson.dumps(dict(zip(STORED_FIELDS, [key, *orjson.loads(record)[1:]])))) for key, record in stored]
        db.executemany("INSERT INTO results VALUES (?, ?)", [(k, r if i % 2 else r.decode()) for i, (k, r) in enumerate(objects)])
    stats = run_echo("summarize", data, tmp_path / "b", cache_dir=str(cache))
    assert stats.rows_cached == 30 and stats.rows_generated == 0
    with sqlite3.connect(cache / "results.sqlite") as db:  # moved into the new table, once
        assert db.execute("SELECT count(*) FROM records").fetchone() == (30,)
        assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'results'").fetchone() is None
    again = pl.read_parquet(tmp_path / "b" / RESULTS_FILE)
    assert again.select("row_key", "summary", "raw_output").equals(first.select("row_key", "summary", "raw_output"))


def test_an_index_of_the_older_form_is_replaced_and_read_again_from_the_files(tmp_path):
    import sqlite3

    _input(tmp_path / "in.parquet", 300)
    run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=8)
    path = tmp_path / "out" / INDEX_FILE
    with sqlite3.connect(path) as db:  # the form before 2026-12-05: records in a WITHOUT ROWID table
        db.executescript("ALTER TABLE records RENAME TO new; CREATE TABLE records (key TEXT PRIMARY KEY, ok INTEGER "
                         "NOT NULL, run_id TEXT, record TEXT NOT NULL) WITHOUT ROWID; INSERT INTO records SELECT key, "
                         "ok, run_id, record FROM new; DROP TABLE new; DELETE FROM state;")
    stats = run_echo("summarize", tmp_path / "in.parquet", tmp_path / "out", max_tokens=8)
    assert (stats.rows_generated, stats.rows_resumed) == (0, 300)
    with sqlite3.connect(path) as db:
        (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'records'").fetchone()
        assert "WITHOUT ROWID" not in sql and db.execute("SELECT count(*) FROM records").fetchone() == (270,)  # 30 repeats


def test_a_parts_records_go_into_the_index_in_bulk_exactly_and_an_error_never_replaces_a_result(tmp_path):
    """add_parts writes many records per SQLite statement (json_each): every record comes back as
    it went in (long and non-ASCII texts, floats, nulls), and within one part as across parts a
    later error record does not replace a reusable result."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokenmill.io.index import FolderIndex, bulk, rows

    (tmp_path / PARTS_DIR).mkdir()
    part = tmp_path / PARTS_DIR / "p1.parquet"
    pq.write_table(pa.table({"x": [1]}), part)

    def record(i, reason="stop", text=None):
        return {"row_key": f"{i:064x}", "raw_output": text if text is not None else f"résumé ✓ {i} \"q\" \\ \x01",
                "finish_reason": reason, "error": None if reason != "error" else "boom", "prompt_tokens": i,
                "latency_ms": i / 3, "confidence": None, "run_id": "r1", "produced": "generated"}

    records = [record(i) for i in range(12_001)] + [record(5, "error"), record(7, "length", "x" * 100_000)]
    assert len(bulk(rows(records))) == 3  # more than one statement
    index = FolderIndex(tmp_path)
    index.add_parts([(part, bulk(rows(records)))])
    got = index.get_many([f"{i:064x}" for i in (0, 5, 7, 12_000)])
    assert got[f"{0:064x}"]["raw_output"] == "résumé ✓ 0 \"q\" \\ \x01" and got[f"{0:064x}"]["latency_ms"] == 0.0
    assert got[f"{5:064x}"]["finish_reason"] == "stop"  # the later error did not replace it
    assert got[f"{7:064x}"]["raw_output"] == "x" * 100_000 and got[f"{7:064x}"]["finish_reason"] == "length"
    assert got[f"{12_000:064x}"]["latency_ms"] == 12_000 / 3 and got[f"{12_000:064x}"]["prompt_tokens"] == 12_000
    assert len(index) == 12_001
    index.close()


def test_keys_whose_hashes_collide_are_never_confused(tmp_path):
    """The index and the cache look keys up by 63 bits of them (io/index.py key_hash) and check the
    whole key: a key whose bits match another's is not found in its place, and replacing it only
    costs the other key a regeneration."""
    from tokenmill.io.index import FolderIndex, bulk, key_hash, rows
    from tokenmill.ledger import ResultCache

    a, b = "a" * 48 + "0123456789abcdef", "b" * 48 + "0123456789abcdef"
    assert key_hash(a) == key_hash(b) and key_hash("not hex") != key_hash("not hex either")
    record = {"row_key": a, "raw_output": "for a", "finish_reason": "stop", "run_id": "r"}
    (tmp_path / PARTS_DIR).mkdir()
    index = FolderIndex(tmp_path)
    index.put(record)
    assert index.get(b) is None and index.get_many([a, b]).keys() == {a}
    index.put({**record, "row_key": b, "raw_output": "for b"})
    assert index.get(a) is None and index.get(b)["raw_output"] == "for b"
    index.close()
    cache = ResultCache(tmp_path / "cache")
    cache.write(bulk(rows([record])))
    assert cache.get(b) is None and cache.get(a)["raw_output"] == "for a"
    cache.close()


def test_writes_that_queue_up_behind_a_slow_one_go_together_and_an_error_reaches_the_submitter():
    """io/background.py: while one write runs, later ones wait and then go to `write_many`
    together (one transaction for the index); their tags come back in order; an error is
    raised in the submitting thread."""
    import threading

    from tokenmill.io.background import BackgroundWrites

    calls, gate = [], threading.Event()

    def write_many(jobs):
        calls.append(list(jobs))
        gate.wait(10)
        if "bad" in jobs:
            raise OSError("disk full (simulated)")

    writes = BackgroundWrites(write_many, depth=4)
    writes.submit("a", "tag-a")
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    writes.submit("b", "tag-b")
    writes.submit("c", "tag-c")
    gate.set()
    assert writes.wait() == ["tag-a", "tag-b", "tag-c"] and calls == [["a"], ["b", "c"]]
    writes.submit("bad", "tag-bad")
    with pytest.raises(OSError, match="disk full"):
        writes.wait()
    writes.close()
