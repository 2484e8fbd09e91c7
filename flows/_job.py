"""The Prefect side every row job shares: prepare, generate with progress, publish the run table."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows._cli import EXIT_OK, EXIT_ROW_ERRORS
from tokenmill.tasks.runner import Job, JobConfig
from tokenmill.usage import RunStats


@task(name="prepare", cache_policy=NO_CACHE)
def prepare(prepare_job: Callable[[JobConfig], Job], config: JobConfig) -> Job:
    """Open the input and model and check the templates before any row is generated."""
    return prepare_job(config)


@task(name="generate-rows", cache_policy=NO_CACHE)
def generate(job: Job, progress: bool) -> RunStats:
    """Run every row through the model worker; results land in OUT as they finish."""
    artifact = create_progress_artifact(progress=0.0, description=f"rows of {job.config.input} done")

    def on_chunk(stats: RunStats) -> None:
        update_progress_artifact(artifact_id=artifact, progress=100.0 * stats.rows_total / max(job.table.rows, 1))

    stats = job.run(progress=progress, run_id=flow_run.id, on_chunk=on_chunk)
    update_progress_artifact(artifact_id=artifact, progress=100.0)
    return stats


def publish_run_table(job: Job, stats: RunStats) -> None:
    lines = ["| metric | value |", "| --- | --- |"] + [
        f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
        for key, value in stats.row().items()
    ]
    create_markdown_artifact(key=f"{job.task.name}-run", markdown=f"# {job.task.name}: {job.config.input}\n\n"
                             + "\n".join(lines), description=f"tokenmill run, results in {job.out}")


def run_job(prepare_job: Callable[[JobConfig], Job], config: JobConfig, progress: bool) -> dict:
    """The body of every row-job flow."""
    job = prepare(prepare_job, config)
    stats = generate(job, progress)
    publish_run_table(job, stats)
    return {"out": str(job.out), "summary": stats.summary_line(str(job.out)), "rows_error": stats.rows_error,
            **{k: v for k, v in stats.row().items() if isinstance(v, (int, float, str))}}


def cli_main(args: argparse.Namespace, config: JobConfig, prepare_job: Callable[..., Job],
             flow_fn: Callable[..., dict]) -> int:
    """--show-prompt, or the flow with its one-line summary and exit status."""
    if args.show_prompt:
        job = prepare_job(config, create_out=False)
        print(job.first_prompt)
        print(f"({job.describe_prompt()})", file=sys.stderr)
        return EXIT_OK
    result = flow_fn(config, progress=not args.no_progress)
    print(result["summary"], file=sys.stderr)
    return EXIT_ROW_ERRORS if result["rows_error"] else EXIT_OK
