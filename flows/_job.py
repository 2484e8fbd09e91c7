"""The Prefect side every row job shares: prepare, generate with progress, publish the run table.

Start-up order (`cli_main`), so a command pays for Prefect only when it has work, and the
model loads while Prefect's server starts:
1. the job is prepared without Prefect: input, options, model file, templates and the first
   row are checked, so a command that cannot run is refused in about a second;
2. a rerun with nothing left to generate finishes right there (no model, no Prefect);
3. otherwise the model worker starts loading in its own process, Prefect's temporary server
   starts in another (flows/_prefect_server.py; unless `PREFECT_API_URL` names a server), the
   scheduler starts on the first rows at once (`ChunkRun.start_early`: their results wait in
   memory for the flow run's id), and the flow run takes that run over once the server answers.
Prefect is imported only in step 3: the flows' modules build their Prefect flow objects on
first use (`lazy_flow`).

Generation (`generate`): one scheduler in a thread feeds the worker pool; each chunk of
--task-rows rows is a `generate-rows` task run that opens its rows to it and returns their
counts (tokenmill/tasks/chunks.py).
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import functools
import gc
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from flows._cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_ROW_ERRORS, quiet_prefect_console
from flows._prefect_server import PrefectStartError, TemporaryServer  # noqa: F401  (PrefectStartError: re-exported)
from tokenmill.tasks.chunks import RUNNING, ChunkRun
from tokenmill.tasks.runner import Job, JobConfig
from tokenmill.usage import RunStats

_prepared: dict[str, Job] = {}  # jobs cli_main prepared, handed to the flow run it starts
_early: dict[str, ChunkRun] = {}  # their runs, generating already while Prefect starts


def _config_key(config: JobConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)


@functools.cache
def _tasks():
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    @task(name="prepare", cache_policy=NO_CACHE)
    def prepare(prepare_job: Callable[[JobConfig], Job], config: JobConfig) -> Job:
        """Open the input and model and check the templates before any row is generated
        (already done, before Prefect started, when the run came from the command line)."""
        return _prepared.pop(_config_key(config), None) or prepare_job(config)

    @task(name="generate-rows", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=0)
    def generate_chunk(run: ChunkRun, number: int) -> dict:
        """One chunk of rows through the shared worker pool (tokenmill/tasks/chunks.py); returns
        its row counts. A retry waits for the rows still missing and generates none twice."""
        return run.run_chunk(number)

    return prepare, generate_chunk


def generate(job: Job, progress: bool) -> RunStats:
    """Every row through the worker pool, a Prefect task run per chunk of --task-rows rows
    (named by its rows, returning their counts), at most RUNNING of them open at once."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.runtime import flow_run

    _, generate_chunk = _tasks()
    artifact = create_progress_artifact(progress=0.0, description=f"rows of {job.config.input} done")

    def on_chunk(stats: RunStats) -> None:  # called in the scheduler's thread, with the flow's context
        if run.stop.is_set():  # stopping: Prefect's server may be gone with the same Ctrl-C
            return
        try:
            update_progress_artifact(artifact_id=artifact, progress=100.0 * stats.rows_total / max(job.table.rows, 1))
        except Exception:  # progress is for the UI: never a reason to stop generating
            pass

    run = _early.pop(_config_key(job.config), None)
    if run is None:
        run = ChunkRun(job, job.config.task_rows)
        restore = _stop_on_sigint(run, str(job.out))
        run.start(progress, flow_run.id, on_chunk)
    else:  # started by cli_main (its Ctrl-C handler stays): this flow run's id, and its context for on_chunk
        restore = _nothing_to_restore
        context = contextvars.copy_context()
        run.adopt(flow_run.id, lambda stats: context.run(on_chunk, stats))
    running: list = []
    try:
        for rng in run.ranges:
            if len(running) >= RUNNING:  # rows are read in order: the oldest chunk ends first
                running.pop(0).wait()
            running.append(generate_chunk.with_options(task_run_name=rng.name).submit(run, rng.number))
        for future in running:
            future.wait()
    except BaseException:
        run.finish(aborted=True)  # the scheduler writes what is finished, stops its workers, and ends
        raise
    finally:
        restore()
    stats = run.finish()
    update_progress_artifact(artifact_id=artifact, progress=100.0)
    return stats


def _nothing_to_restore() -> None:
    pass


PREFECT_GRACE_S = 5.0  # after Ctrl-C, how long Prefect may take to report the interruption


def _stop_on_sigint(run: ChunkRun, out: str) -> Callable[[], None]:
    """Ctrl-C stops the scheduler's thread at once (it keeps what is finished), whatever Prefect
    does with the KeyboardInterrupt that follows in this thread. Should Prefect then hang
    reporting the interruption (its temporary server got the same Ctrl-C, and its client
    retries), the process ends PREFECT_GRACE_S later, once the finished rows are on disk.
    Returns what undoes the handler."""
    try:
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if not run.stop.is_set():
                run.stop.set()
                threading.Thread(target=_exit_if_stuck, args=(run, out), daemon=True).start()
            if callable(previous):
                previous(signum, frame)
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (a deployment's flow run): Prefect's own handling applies
        return lambda: None
    return lambda: signal.signal(signal.SIGINT, previous)


def _exit_if_stuck(run: ChunkRun, out: str) -> None:
    run.wait_stopped()  # what was finished is written
    time.sleep(PREFECT_GRACE_S)
    print(f"tokenmill: interrupted; rows finished so far are kept in the output folder (--out {out}). Run the same "
          "command again to continue where it stopped.", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def publish_run_table(job: Job, stats: RunStats) -> None:
    from prefect.artifacts import create_markdown_artifact

    lines = ["| metric | value |", "| --- | --- |"] + [
        f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
        for key, value in stats.row().items()
    ]
    create_markdown_artifact(key=f"{job.task.name}-run", markdown=f"# {job.task.name}: {job.config.input}\n\n"
                             + "\n".join(lines), description=f"tokenmill run, results in {job.out}")


def _result(job: Job, stats: RunStats) -> dict:
    return {"out": str(job.out), "summary": stats.summary_line(str(job.out)), "rows_error": stats.rows_error,
            "engine": dict(stats.engine),
            **{k: v for k, v in stats.row().items() if isinstance(v, (int, float, str))}}


def run_job(prepare_job: Callable[[JobConfig], Job], config: JobConfig, progress: bool) -> dict:
    """The body of every row-job flow."""
    prepare, _ = _tasks()
    job = prepare(prepare_job, config)
    stats = generate(job, progress)
    publish_run_table(job, stats)
    return _result(job, stats)


@functools.cache
def _flow(fn: Callable[..., dict], name: str):
    from prefect import flow

    return flow(name=name, log_prints=False)(fn)


def lazy_flow(fn: Callable[..., dict], name: str, attribute: str) -> Callable[[str], Any]:
    """A module `__getattr__` (PEP 562) that turns `fn` into the Prefect flow `attribute` on
    first use: `from flows.summarize import summarize_flow` works, and the command line does
    not import Prefect before it knows there is work."""

    def __getattr__(key: str):
        if key == attribute:
            return _flow(fn, name)
        raise AttributeError(f"module {fn.__module__!r} has no attribute {key!r}")

    return __getattr__


def _start_prefect_server() -> TemporaryServer | None:
    """Start Prefect's temporary server (flows/_prefect_server.py) when no server is configured."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None  # a server of the user's own: nothing to start
    server = TemporaryServer()
    server.start()
    return server


def _use_server(server: TemporaryServer | None) -> None:
    """Once `server` answers, point this process at it for good (and its children): the
    environment, and Prefect's process-wide settings, which its own threads and exit handlers
    fall back on (else one of them would start a server of its own)."""
    if server is None:
        return
    os.environ["PREFECT_API_URL"] = server.wait()
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()


def cli_main(args: argparse.Namespace, config: JobConfig, prepare_job: Callable[..., Job],
             flow_body: Callable[..., dict], flow_name: str) -> int:
    """--show-prompt, or the job (in the Prefect flow `flow_name` made of `flow_body` when it
    has rows to generate) with its one-line summary and exit status."""
    if args.show_prompt:
        job = prepare_job(config, create_out=False)
        print(job.first_prompt)
        print(f"({job.describe_prompt()})", file=sys.stderr)
        return EXIT_OK
    job = prepare_job(config)
    if not job.has_pending_rows():
        stats = job.run(progress=not args.no_progress)
        print(stats.summary_line(str(job.out)) + "; nothing to generate, so no Prefect flow run was started",
              file=sys.stderr)
        return EXIT_ROW_ERRORS if stats.rows_error else EXIT_OK
    job.start_worker()  # the model loads in its own process from now on
    key, run, restore = _config_key(config), None, _nothing_to_restore
    try:
        server = _start_prefect_server()  # stopped at exit, after Prefect's own exit handlers
        if config.runner != "ray":  # (Ray's task runs need the flow run: they wait for it)
            run = ChunkRun(job, config.task_rows)
            restore = _stop_on_sigint(run, str(job.out))
            run.start_early(progress=not args.no_progress)  # rows generate while Prefect starts
            _early[key] = run
        flow = _flow(flow_body, flow_name)
        if not args.verbose:
            quiet_prefect_console()
        _use_server(server)
        _prepared[key] = job
        # Prefect's modules are loaded by now: their objects (hundreds of thousands) need not be
        # scanned by every full garbage collection while rows stream (objects still free by refcount)
        gc.freeze()
        result = flow(config, progress=not args.no_progress)
    except BaseException:
        if _early.pop(key, None) is not None:  # the flow never took its run over: keep what it finished
            run.finish(aborted=True)
        raise
    finally:
        _prepared.pop(key, None)
        _early.pop(key, None)
        restore()
        job.stop_worker()
    print(result["summary"], file=sys.stderr)
    return EXIT_ROW_ERRORS if result["rows_error"] else EXIT_OK

