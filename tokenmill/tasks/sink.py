"""Where a run's finished rows go: Parquet parts as they finish, the output folder's index, the
shared results cache, progress; at the end results.parquet (merged in input order) and a row
of usage.parquet.

A part is written at least every FLUSH_S seconds while rows finish, and at most MAX_PART_ROWS
rows long: a slow model loses at most a second of finished rows when the run dies, and a fast
backend does not write thousands of tiny files. Memory holds one part's rows at most.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable

from tqdm import tqdm

from tokenmill.contract import RESULTS_FILE, USAGE_FILE
from tokenmill.io.index import FolderIndex
from tokenmill.io.parts import PartWriter, append_row
from tokenmill.ledger import ResultCache
from tokenmill.usage import RunStats

if TYPE_CHECKING:
    from tokenmill.tasks.planner import Planner

FLUSH_S = 1.0
MAX_PART_ROWS = 50_000
CALLBACK_S = 2.0  # on_chunk (Prefect's progress artifact) at most this often


class ResultSink:
    def __init__(self, planner: "Planner", stats: RunStats, index: FolderIndex, cache: ResultCache | None,
                 progress: bool = False, on_chunk: Callable[[RunStats], None] | None = None,
                 on_row: Callable[[dict], None] | None = None):
        self.planner = planner
        self.stats = stats
        self.index = index
        self.cache = cache
        self.on_chunk = on_chunk
        self.on_row = on_row  # sees every results row (tasks/chunks.py counts a chunk's rows)
        self.writer = PartWriter(planner.out, stats.run_id)
        self.buffer: list[dict] = []
        self.part_rows = min(MAX_PART_ROWS, planner.config.part_rows)
        self.pending: dict[str, dict] = {}  # row key -> new record of a row in `buffer`, not in the index yet
        self.recent: dict[str, dict] = {}  # records moved to the index since the scheduler last looked there
        self._flushed_at = self._called_at = time.monotonic()
        self.bar = tqdm(total=planner.table.rows, unit="row", file=sys.stderr, disable=not progress,
                        dynamic_ncols=True, mininterval=0.5)

    def tick(self) -> None:
        """After every model call: long texts take many before their row is done."""
        stats = self.stats
        if not self.bar.disable:
            self.bar.set_postfix_str(f"{stats.calls} calls, {stats.tokens / max(stats.wall_s, 1e-9):.0f} tok/s",
                                     refresh=False)

    def emit(self, result: dict, new: bool = False) -> None:
        """One finished results row. `new`: a record this folder does not hold yet (generated
        now, or found in the shared cache), so it goes into the folder's index."""
        self.buffer.append(result)
        self.stats.add_result(result)
        self.bar.update(1)
        if new and result.get("row_key") is not None:
            self.pending[result["row_key"]] = result
        if len(self.buffer) >= self.part_rows or time.monotonic() - self._flushed_at >= FLUSH_S:
            self.flush()
        if self.on_row is not None:
            self.on_row(result)

    def generated(self, record: dict) -> None:
        """A fresh generation: shared with later runs through the cache."""
        if self.cache is not None:
            self.cache.put(record)

    def lookup(self, key: str) -> dict | None:
        """A record this run added that the index may not show yet."""
        return self.pending.get(key) or self.recent.get(key)

    def flush(self) -> None:
        """Write the rows finished since the last part, then add them to the index."""
        now = time.monotonic()
        self._flushed_at = now
        if not self.buffer:
            return
        part = self.writer.write(self.planner._frame(self.buffer))
        self.index.add_part(part, self.pending.values())
        if self.cache is not None:
            self.cache.commit()
        self.buffer.clear()
        self.recent.update(self.pending)
        self.pending.clear()
        if self.on_chunk and now - self._called_at >= CALLBACK_S:
            self._called_at = now
            self.on_chunk(self.stats)

    def close(self) -> None:
        self.bar.close()

    def finish(self, usage: dict, state: dict | None) -> None:
        """Every row is in a part: merge them into results.parquet, note it in the index with
        `state` (for a quick rerun), and append the run's usage row."""
        self.flush()
        out = self.planner.out
        self.writer.merge(out / RESULTS_FILE, order_by="row")
        self.index.merged(out / RESULTS_FILE, state)
        append_row(out / USAGE_FILE, usage)
