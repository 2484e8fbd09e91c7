"""The generic row job: input rows -> prompts -> model worker -> Parquet parts -> results.

A task (summarize, extract) supplies its template, its output column and how to turn
generated text into that column (`TaskSpec`); everything else lives here once, in three parts:
- the planner (tasks/planner.py): options, input, model, templates, output folder; each row's
  prompt, key and model calls;
- the scheduler (tasks/scheduler.py): feeds the model worker and reuses what is done already;
- the sink (tasks/sink.py): writes finished rows, merges them, records usage.
`Job` puts them together with the model worker and the output folder's lock and index.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import polars as pl
from typing import Callable

from tokenmill.contract import RESULTS_FILE, USAGE_FILE
from tokenmill.io.index import FolderIndex
from tokenmill.io.parts import append_row
from tokenmill.ledger import OutputLock, ResultCache, default_cache_dir
from tokenmill.models import registry
from tokenmill.models.memory import available_ram, check_fits, free_vram, memory_need
from tokenmill.pool import Worker
from tokenmill.tasks.planner import Planner, check_out_dir_task  # noqa: F401  (re-exported)
from tokenmill.tasks.scheduler import Scheduler
from tokenmill.tasks.sink import PendingRunId, ResultSink
from tokenmill.tasks.spec import JobConfig, TaskSpec, row_key  # noqa: F401  (re-exported)
from tokenmill.usage import Prices, RunStats
from tokenmill.worker_pool import make_workers, plan_workers, visible_gpus


class Job(Planner):
    """A prepared run (see Planner) that can start its model worker and run."""

    def __init__(self, config: JobConfig, task: TaskSpec, create_out: bool = True):
        super().__init__(config, task, create_out)
        self.prices = Prices(config.price_input_per_mtok, config.price_output_per_mtok)
        self.worker: Worker | None = None  # see start_worker

    def start_worker(self) -> None:
        """Start loading the model in its worker process now; `run` uses this worker. The
        command line calls it before Prefect starts, so the two overlap."""
        if self.worker is None:
            self.worker = self._new_worker()
            self.worker.start(wait=False)

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def _new_worker(self) -> Worker:
        """The model worker, or a pool of them (--workers; by default one per visible GPU), after
        checking that the model and its KV caches fit the free memory."""
        c, settings = self.config, self.settings()
        if c.runner == "ray":
            from tokenmill.ray_worker import RayWorker

            workers = c.workers or 1
            threads = settings.n_threads if c.n_threads or settings.n_threads <= 0 else max(1, settings.n_threads // workers)
            return RayWorker(dataclasses.replace(settings, n_threads=threads), c.ray_address, workers,
                             batch=2 * max(settings.n_seq, 1))
        local = not self.backend.in_process and self.backend.runtime == registry.DEFAULT_RUNTIME
        gpus = visible_gpus() if local else []
        if local:
            self.check_memory(settings, gpus)
        # an in-process backend (echo) counts tokens with this job's tokenizer, loaded once
        return make_workers(settings, c.workers, hang_timeout_s=c.hang_timeout_s, tokenizer=self.model_info,
                            threads_given=bool(c.n_threads), gpus=gpus, capacity=2 * max(settings.n_seq, 1))

    def check_memory(self, settings, gpus: list[str]) -> None:
        """Refuse, before anything loads, a run whose weights and KV caches do not fit (models/memory.py)."""
        path = Path(settings.model_path)
        if not path.is_file():
            return
        placements = plan_workers(self.config.workers, gpus, settings.n_threads, True, settings.n_gpu_layers)
        arch = self.model_info.architecture
        layers = int(self.model_info.metadata.get(f"{arch}.block_count", 0) or 0)
        need = memory_need(path.stat().st_size, self.model_info.kv_bytes_per_token, settings.n_ctx, len(placements),
                           [p.gpu for p in placements], settings.n_gpu_layers, layers)
        check_fits(need, self.config.n_ctx, settings.n_seq, available_ram(),
                   {gpu: free_vram(gpu) for gpu in need.gpus})

    def _open_cache(self) -> ResultCache | None:
        c = self.config
        return ResultCache(Path(c.cache_dir) if c.cache_dir else default_cache_dir()) if c.cache else None

    def _finished_before(self, index: FolderIndex) -> dict | None:
        """The last run's summary when it covered exactly this job and left nothing to retry:
        then a rerun has nothing to generate and need not read a single row."""
        last = index.last_run()
        if last and last.get("fingerprint") == self.fingerprint() and not last.get("retryable"):
            return last
        return None

    def has_pending_rows(self) -> bool:
        """Whether any row still needs the model (not done in OUT, not in the shared cache, not
        failing before generation). Stops at the first such row."""
        if not (self.out / RESULTS_FILE).exists() and not (self.out / "parts").exists():
            return True
        index = FolderIndex(self.out)
        cache = self._open_cache()
        try:
            index.sync()
            if self._finished_before(index) is not None:
                return False
            for info, _plan, error in self.planned_rows():
                if error is not None:
                    continue
                record = index.get(info["row_key"])
                if record is not None and (record["finish_reason"] in ("stop", "length") or not self.config.retry_errors):
                    continue
                if cache is None or cache.get(info["row_key"]) is None:
                    return True
            return False
        finally:
            index.close()
            if cache:
                cache.close()

    def run(self, progress: bool = True, run_id: str | None = None,
            on_chunk: Callable[[RunStats], None] | None = None, rows: Callable | None = None,
            on_rows: Callable[[dict], None] | None = None, stop=None, pending_id: PendingRunId | None = None
            ) -> RunStats:
        """Generate every row not already done, writing parts as they finish; merge; record usage.
        `rows` gates the planned rows (tasks/chunks.py); `on_rows` gets the rows finished since
        its last call, as columns `row` and `status`;
        `stop` (a threading.Event) ends the run as Ctrl-C would; `pending_id`: the run's id
        comes later (tasks/sink.py), rows are written once it has."""
        stats = RunStats(model=self.model_info.name, model_sha256=self.model_sha, backend=self.backend.name,
                         device="none (no rows generated)")
        if run_id:
            stats.run_id = run_id
        lock = OutputLock(self.out)
        lock.acquire()
        try:
            self._run_locked(stats, progress, on_chunk, rows, on_rows, stop, pending_id)
        finally:
            lock.release()
        return stats

    def _usage(self, stats: RunStats, restarts: int) -> dict:
        return stats.row(input=str(self.config.input), task=self.task.name, params=json.dumps(self.params),
                         worker_restarts=restarts, **self.prices.estimate(stats))

    def _run_locked(self, stats: RunStats, progress: bool, on_chunk: Callable[[RunStats], None] | None,
                    rows: Callable | None = None, on_rows: Callable[[dict], None] | None = None,
                    stop=None, pending_id: PendingRunId | None = None) -> None:
        index = FolderIndex(self.out)
        try:
            index.sync()
            if (last := self._finished_before(index)) is not None:
                if pending_id is not None:  # the usage row carries the run's id
                    pending_id.ready.wait()
                    stats.run_id = pending_id.run_id or stats.run_id
                self._nothing_to_do(stats, last, on_rows)
                return
            self._generate(stats, index, progress, on_chunk, rows, on_rows, stop, pending_id)
        finally:
            index.close()

    def _nothing_to_do(self, stats: RunStats, last: dict, on_rows: Callable[[dict], None] | None = None) -> None:
        """A rerun of a finished job: its rows are in results.parquet already, as they were."""
        self.stop_worker()
        if on_rows is not None:  # chunk tasks wait for their rows: they are all there
            on_rows(pl.read_parquet(self.out / RESULTS_FILE, columns=["row", "status"]).to_dict(as_series=False))
        for name in ("rows_total", "rows_ok", "rows_error", "rows_skipped"):
            setattr(stats, name, last[name])
        stats.rows_resumed = last["rows_total"] - last["rows_skipped"]
        stats.tokens_saved = last["tokens"]
        append_row(self.out / USAGE_FILE, self._usage(stats, 0))

    def _generate(self, stats: RunStats, index: FolderIndex, progress: bool,
                  on_chunk: Callable[[RunStats], None] | None, rows: Callable | None = None,
                  on_rows: Callable[[dict], None] | None = None, stop=None,
                  pending_id: PendingRunId | None = None) -> None:
        cache = self._open_cache()
        worker, self.worker = self.worker or self._new_worker(), None  # started by start_worker, or on first use
        sink = ResultSink(self, stats, index, cache, progress=progress, on_chunk=on_chunk, on_rows=on_rows,
                          run_id=pending_id)
        try:
            try:
                Scheduler(self, worker, index, cache, sink, stats, gate=rows, stop=stop).run()
            except BaseException:
                try:
                    sink.release()  # (a run stopping before it has its id keeps its provisional one)
                    sink.flush()  # rows already finished are worth keeping, whatever stopped the run
                finally:
                    sink.settle(raise_errors=False)
                raise
            finally:
                sink.close()
                worker.close()
            stats.device = worker.device if worker.device != "unknown" else stats.device
            stats.engine = worker.engine_stats
            state = {"fingerprint": self.fingerprint(), "rows_total": stats.rows_total, "rows_ok": stats.rows_ok,
                     "rows_error": stats.rows_error, "rows_skipped": stats.rows_skipped,
                     "retryable": stats.rows_error - stats.rows_skipped, "tokens": stats.tokens + stats.tokens_saved}
            sink.flush(wait=True)  # (a run's id that comes late goes into its usage row too)
            sink.finish(self._usage(stats, worker.restarts), state)
        finally:
            if cache:
                cache.close()
