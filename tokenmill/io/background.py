"""One background thread for a run's bookkeeping writes (the folder index, the results cache).

SQLite does its B-tree work with the GIL released, so on a machine with a second core the
index and cache writes of a part cost the scheduler's thread almost nothing. Writes run in
the order submitted; at most `depth` wait, so a slow disk slows the run instead of filling
memory. An error in a write is raised again in the submitting thread at its next call.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator


class BackgroundWrites:
    def __init__(self, depth: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-writes")
        self._queue: deque[tuple[Future, Any]] = deque()
        self._depth = depth

    def submit(self, write: Callable[[], None], tag: Any = None) -> None:
        """Run `write` in the background; `tag` comes back from `done` once it has run."""
        if len(self._queue) >= self._depth:
            self._queue[0][0].result()  # wait for the oldest (raises its error)
        self._queue.append((self._pool.submit(write), tag))

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
        self._pool.shutdown(wait=True)
        self._queue.clear()
