"""One background thread for a run's bookkeeping writes (the folder index, the results cache).

SQLite does its B-tree work with the GIL released, so on a machine with a second core the
index and cache writes of a part cost the scheduler's thread almost nothing. Writes run in
the order submitted; at most `depth` wait, so a slow disk slows the run instead of filling
memory. Writes that queued up while the thread was busy are done together, in one call of
`write_many` (one transaction: the index's random keys make each commit rewrite pages all
over its B-tree, so fewer, larger commits cost less per row). An error in a write is raised
again in the submitting thread at its next call.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Iterator


class BackgroundWrites:
    def __init__(self, write_many: Callable[[list[Any]], None], depth: int = 4):
        self._write_many = write_many
        self._queue: deque[tuple[Future, Any]] = deque()  # submitted and not yet collected: (done?, tag)
        self._todo: list[tuple[Any, Future]] = []  # submitted and not yet started
        self._depth = depth
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="tokenmill-writes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._todo and not self._closing:
                    self._wake.wait()
                if not self._todo:
                    return
                batch, self._todo = self._todo, []
            try:
                self._write_many([job for job, _future in batch])
            except BaseException as exc:
                for _job, future in batch:
                    future.set_exception(exc)
            else:
                for _job, future in batch:
                    future.set_result(None)

    def submit(self, job: Any, tag: Any = None) -> None:
        """Write `job` in the background (`write_many` gets it with any others waiting then);
        `tag` comes back from `done` once it is written."""
        if len(self._queue) >= self._depth:
            self._queue[0][0].result()  # wait for the oldest (raises its error)
        future: Future = Future()
        self._queue.append((future, tag))
        with self._wake:
            self._todo.append((job, future))
            self._wake.notify()

    def done(self) -> list[Any]:
        """The tags of the writes finished since the last call, oldest first (an error in one
        is raised here)."""
        finished = []
        while self._queue and self._queue[0][0].done():
            future, tag = self._queue.popleft()
            future.result()
            finished.append(tag)
        return finished

    def wait(self) -> list[Any]:
        """Every submitted write finished; their tags."""
        finished = []
        while self._queue:
            future, tag = self._queue.popleft()
            future.result()
            finished.append(tag)
        return finished

    def pending(self) -> Iterator[Any]:
        """The tags of the writes not yet collected by `done` or `wait` (no list per call: the
        scheduler asks for every row it looks up)."""
        return (tag for _future, tag in self._queue)

    def close(self) -> None:
        """Let submitted writes finish, without raising their errors (the run is ending anyway)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        self._queue.clear()
