"""The scheduler: feeds a model worker the rows nobody has generated yet, and hands every row,
generated or reused, to the sink.

Rows are read, rendered and planned as the worker has room (`window` requests in flight), so
an input of any length streams through. For each row, in order of preference:
- its key is in flight already: it waits for that generation (a duplicate);
- this run already finished it: a duplicate of that result;
- the output folder holds it from an earlier run: reused as it is (resume);
- the shared results cache holds it: reused (`cached`);
- else its plan's calls go to the worker, and completions are fed back to the plan until it
  returns the row's final completion.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Callable, Iterator

from tokenmill.contract import CACHED, DUPLICATE, REUSABLE, SKIPPED
from tokenmill.io.index import FolderIndex, KeyFilter
from tokenmill.ledger import ResultCache
from tokenmill.models.base import GenerationRequest
from tokenmill.tasks.chunks import WAIT
from tokenmill.tasks.plans import Call
from tokenmill.tasks.records import from_completion
from tokenmill.tasks.sink import ResultSink
from tokenmill.tasks.spec import MAX_DEFAULT_SLOTS
from tokenmill.usage import RunStats

if TYPE_CHECKING:
    from tokenmill.pool import Worker
    from tokenmill.tasks.planner import Planner


class Scheduler:
    def __init__(self, planner: "Planner", worker: "Worker", index: FolderIndex, cache: ResultCache | None,
                 sink: ResultSink, stats: RunStats, gate: Callable[[Iterator], Iterator] | None = None,
                 stop=None):
        self.planner = planner
        self.worker = worker
        self.index = index
        self.cache = cache
        self.sink = sink
        self.stats = stats
        self.gate = gate  # holds rows back until their chunk task opens them (tasks/chunks.py: WAIT)
        self.stop = stop  # a threading.Event: the flow running this scheduler in a thread stops
        # more requests than the backend has slots, so a slot never waits for the next row (see pool.py)
        # (per worker of a pool: tokenmill/worker_pool.py)
        self.window = max(64, 4 * (planner.config.n_seq or MAX_DEFAULT_SLOTS)) * getattr(worker, "size", 1)
        self.waiting: dict[str, list[dict]] = {}  # row key -> input rows waiting for that generation
        self.plans: dict[str, Any] = {}  # row key -> its plan (tasks/plans.py), while calls are outstanding
        self.calls: dict[int, tuple[str, int]] = {}  # request index -> (row key, slot in its plan)
        self._ids = itertools.count()
        self._folder: dict[str, dict] = {}  # this read chunk's keys the folder's index held at lookup
        self._cached: dict[str, dict] = {}  # ... and those the shared cache held
        # Started empty, the index (and the cache) can hold only keys this run added: ask them
        # about those alone (`added`), not about every row.
        self.added = KeyFilter() if index.empty() else None
        self._added_since: set[str] = set()  # keys this run added since the last chunk's lookup (into `added` then)
        self._ours: set[str] | None = None  # this chunk's keys `added` may hold (None: any key may be known)
        self._cache_started_empty = cache is not None and self.added is not None and cache.empty()
        c, task = planner.config, planner.task
        # what every request of the job asks (a batch row's own options override it)
        self._request = {"max_tokens": c.max_tokens, "temperature": c.temperature, "seed": c.seed,
                         "stop": list(task.stop), "logprobs": task.confidence}
        self._schema = task.json_schema
        self._free = {**self._request, "grammar": None, "repeat_penalty": 1.0, "json_schema": None}

    def _rows(self) -> Iterator[tuple[dict, Any, str | None]]:
        """Planned rows, with what the output folder and the cache hold of each chunk's keys
        looked up at once (see _known)."""
        for chunk in self.planner.planned_chunks():
            keys = [info["row_key"] for info, _plan, error in chunk if error is None]
            added, since, self._added_since = self.added, self._added_since, set()
            if added is not None:
                added.add_many(list(since))
            ours = keys if added is None else added.select(keys)
            self._ours = None if added is None else set(ours)
            self.sink.before_lookup()
            self._folder = self.index.get_many(ours) if ours else {}
            missing = [k for k in (ours if self._cache_started_empty else keys) if k not in self._folder]
            self._cached = self.cache.get_many(missing) if self.cache is not None and missing else {}
            yield from chunk

    def _known(self, key: str) -> dict | None:
        """This folder's record of `key`: added by this run (still in the sink, or moved to the
        index since this chunk's lookup), or found by the lookup. A run that started with an
        empty folder knows only keys it added: most keys need no look at all."""
        ours = self._ours
        if ours is not None and key not in ours and key not in self._added_since:
            return None
        return self.sink.lookup(key) or self._folder.get(key)

    def run(self) -> None:
        worker, rows, exhausted = self.worker, self._rows(), False
        if self.gate is not None:
            rows = self.gate(rows)
        while True:
            while not exhausted and worker.in_flight < self.window:
                item = next(rows, None)
                if item is None:
                    exhausted = True
                    break
                if item is WAIT:  # nothing to admit now: see what the worker has finished
                    self.sink.flush_if_due()  # (a chunk task waits for its rows to be counted)
                    break
                self._admit(*item)
            if exhausted and not worker.in_flight:
                worker.end_input()
                return
            for completion in worker.poll():
                self._complete(completion)
            if self.stop is not None and self.stop.is_set():
                raise KeyboardInterrupt  # stopped like Ctrl-C: finished rows are flushed, the worker closed

    def _admit(self, info: dict, plan: Any, error: str | None) -> None:
        p, key = self.planner, info["row_key"]
        if error is not None:
            self.sink.emit(p._finish({**info, "raw_output": None, "finish_reason": "error", "error": error,
                                      "model": p.model_info.name, "run_id": self.stats.run_id}, info, SKIPPED))
            return
        if key in self.waiting:
            self.waiting[key].append(info)
            return
        if (record := self._known(key)) is not None:
            if record.get("run_id") == self.stats.run_id:
                self.sink.emit(p._finish(record, info, DUPLICATE))
                return
            if record["finish_reason"] in REUSABLE or not p.config.retry_errors:
                self.sink.emit(p._finish(record, info))  # resumed: as an earlier run left it
                return
        if (record := self._cached.get(key)) is not None:
            self._add(key)
            self.sink.emit(p._finish(record, info, CACHED), new=True)
            return
        self.waiting[key] = [info]
        self.plans[key] = plan
        self._submit(key, plan.start())

    def _add(self, key: str) -> None:
        self._added_since.add(key)

    def _submit(self, key: str, new_calls: list[Call]) -> None:
        for slot, call in enumerate(new_calls):
            index = next(self._ids)
            self.calls[index] = (key, slot)
            prompt, messages = str(call.prompt), getattr(call.prompt, "messages", None)
            if call.grammar is None and not call.options and call.repeat_penalty == 1.0:  # most rows
                request = GenerationRequest(index, prompt, messages=messages, **self._free)
            else:
                request = GenerationRequest(index=index, prompt=prompt, messages=messages, grammar=call.grammar,
                                            repeat_penalty=call.repeat_penalty,
                                            **{**self._request, "json_schema": self._schema if call.grammar else None,
                                               **call.options})
            self.worker.submit(request)

    def _complete(self, completion) -> None:
        key, slot = self.calls.pop(completion.index)
        self.stats.add_generation(completion)
        self.sink.tick()
        plan = self.plans.get(key)
        if plan is None:  # the row already ended (another of its calls failed)
            return
        outcome = plan.feed(slot, completion)
        if isinstance(outcome, list):
            self._submit(key, outcome)
            return
        del self.plans[key]
        rows_waiting = self.waiting.pop(key)
        p = self.planner
        record = from_completion(rows_waiting[0], outcome, p.model_info.name, self.stats.run_id)
        record.update(chunks=plan.chunks, calls=plan.calls)
        self.sink.generated(key)
        self._add(key)
        self.sink.emit(p._finish(record, rows_waiting[0]), new=True)
        for info in rows_waiting[1:]:
            self.sink.emit(p._finish(record, info, DUPLICATE))
