"""Chunks of rows as units of work that Prefect can see, feeding one shared worker pool.

A run's rows are cut into ranges of `--task-rows` input rows (default 10,000). Each range is one Prefect task run
(flows/_job.py) that opens its range at a `ChunkGate` and waits until every row of it is in the
output folder; its result (and its name) carry its row counts. One scheduler, in its own thread
(`ChunkRun`), reads, plans and feeds every row to the pool as today, but admits a row only once
its range's task has opened it. With `RUNNING` ranges open at once, the last rows of one range
and the first of the next decode together (continuous batching across chunks), and the input
is read no further ahead than the open ranges (back-pressure).

From the command line the scheduler starts before the flow does (`start_early`): while
Prefect's server starts, the first RUNNING ranges are open and generate, their finished rows
held in memory until the flow run's id comes (`adopt`: tasks/sink.py PendingRunId).

A retried chunk task (Prefect's `retries`) opens its range again: rows the range already
finished are not generated again, and the task just waits for the rest. A new run of the same
job is resumed from the output folder's index as before, so rows written are never redone.
"""

from __future__ import annotations

import contextvars
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from tokenmill.errors import TokenmillError
from tokenmill.tasks.sink import PendingRunId
from tokenmill.usage import RunStats

if TYPE_CHECKING:
    from tokenmill.tasks.runner import Job

# Chunk tasks open at once. A chunk's task ends only once its rows are counted (at the sink's
# next flush, up to a second after its last row) and the next starts only after Prefect's API
# calls for both: with two open, the scheduler waited at the gate for a tenth of a million-row
# run on the echo backend; with eight it rarely waits.
RUNNING = 8
WAIT = object()  # what a row source yields when it has nothing to admit right now


@dataclass
class RowRange:
    """Input rows [first, stop) of one chunk task."""

    number: int
    first: int
    stop: int
    done: int = 0  # its rows finished (kept across a retry of its task)
    counts: dict = field(default_factory=dict)  # status -> rows

    @property
    def rows(self) -> int:
        return self.stop - self.first

    @property
    def name(self) -> str:
        return f"rows {self.first}-{self.stop - 1} ({self.rows} rows)"

    def summary(self) -> dict:
        return {"first_row": self.first, "last_row": self.stop - 1, "rows": self.done, **self.counts}


def row_ranges(total: int, task_rows: int) -> list[RowRange]:
    return [RowRange(n, first, min(first + task_rows, total)) for n, first in enumerate(range(0, total, task_rows))]


class ChunkFailed(TokenmillError):
    """The shared scheduler stopped before a chunk's rows were done."""


class ChunkRun:
    """One job's scheduler in a thread, fed range by range by chunk tasks (`run_chunk`)."""

    def __init__(self, job: "Job", task_rows: int):
        self.job = job
        self.task_rows = task_rows
        self.ranges = row_ranges(job.table.rows, task_rows)
        self._cond = threading.Condition()
        self._open: set[int] = set()
        self._ended = False  # the scheduler thread has returned (or raised)
        self.error: BaseException | None = None
        self.stats: RunStats | None = None
        self._thread: threading.Thread | None = None
        self.stop = threading.Event()  # set when the flow stops (Ctrl-C): the scheduler stops too
        self.pending_id: PendingRunId | None = None  # started before its flow run: see start_early

    def start_early(self, progress: bool) -> None:
        """Start generating the first RUNNING ranges before the flow run exists; its id (and
        progress callback) come with `adopt`, and rows are written from then on."""
        self.pending_id = PendingRunId()
        with self._cond:
            self._open.update(r.number for r in self.ranges[:RUNNING])
        self.start(progress, None, None)

    def adopt(self, run_id: str | None, on_chunk: Callable[[RunStats], None] | None) -> None:
        """The flow run of an early start: its id for every row, its callback from now on."""
        if self.pending_id is not None:
            self.pending_id.set(run_id, on_chunk)

    def start(self, progress: bool, run_id: str | None, on_chunk: Callable[[RunStats], None] | None) -> None:
        def body() -> None:
            try:
                self.stats = self.job.run(progress=progress, run_id=run_id, on_chunk=on_chunk,
                                          rows=self._gated, on_rows=self._finished, stop=self.stop,
                                          pending_id=self.pending_id)
            except BaseException as exc:  # handed to the waiting chunk tasks and to finish()
                self.error = exc
            finally:
                with self._cond:
                    self._ended = True
                    self._cond.notify_all()

        # with the flow's context (Prefect's flow run and client), for the progress artifact
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(body,),
                                        name="tokenmill-scheduler", daemon=True)
        self._thread.start()

    def _gated(self, planned: Iterator[tuple[dict, Any, str | None]]) -> Iterator[Any]:
        """The planned rows, each once its range is open; WAIT while it is not."""
        size, last, is_open = self.task_rows, len(self.ranges) - 1, self._open
        for item in planned:
            number = min(item[0]["row"] // size, last)
            while number not in is_open:
                with self._cond:
                    self._cond.wait(0.05)
                if number not in is_open:
                    yield WAIT
            yield item

    def _finished(self, columns: dict) -> None:
        """The sink's callback with rows finished since its last call: counted into their ranges."""
        size, last = self.task_rows, len(self.ranges) - 1
        counts = Counter(zip([min(row // size, last) for row in columns["row"]], columns["status"]))
        with self._cond:
            for (number, status), n in counts.items():
                rng = self.ranges[number]
                rng.done += n
                rng.counts[status] = rng.counts.get(status, 0) + n
            self._cond.notify_all()

    def run_chunk(self, number: int) -> dict:
        """The body of one chunk task: open the range, wait until all its rows are finished."""
        rng = self.ranges[number]
        with self._cond:
            self._open.add(number)
            self._cond.notify_all()
            while rng.done < rng.rows and not self._ended:
                self._cond.wait(0.5)
        if rng.done < rng.rows:
            raise ChunkFailed(f"{rng.name}: the run stopped with {rng.rows - rng.done} of them unfinished"
                              + (f" ({self.error})" if self.error else ""))
        return rng.summary()

    def wait_stopped(self) -> None:
        """Until the scheduler's thread has ended (after a stop: with what was finished written)."""
        if self._thread is not None:
            self._thread.join()

    def finish(self, aborted: bool = False) -> RunStats:
        """After every chunk task: wait for the scheduler to merge the results; its stats.
        `aborted`: the flow is stopping; the scheduler keeps what is finished and stops too."""
        if aborted:
            self.stop.set()
            self.adopt(None, None)  # no flow run to wait for: rows keep the id the run started with
        with self._cond:
            self._open.update(r.number for r in self.ranges)  # (a range whose task never ran cannot block)
            self._cond.notify_all()
        self._thread.join()
        if self.error is not None and not aborted:
            raise self.error
        return self.stats
