"""Summarize a text column with a local model: `python -m flows.summarize INPUT [options]`."""

from __future__ import annotations

import argparse
import sys

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows._cli import EXIT_OK, EXIT_ROW_ERRORS, common_parser, config_from_args, run_cli
from tokenmill.tasks.runner import Job, JobConfig
from tokenmill.tasks.summarize import prepare_summarize
from tokenmill.usage import RunStats


@task(name="prepare-summarize", cache_policy=NO_CACHE)
def prepare(config: JobConfig) -> Job:
    """Open the input and model and check the templates before any row is generated."""
    return prepare_summarize(config)


@task(name="generate-rows", cache_policy=NO_CACHE)
def generate(job: Job, progress: bool) -> RunStats:
    """Run every row through the model worker; results land in OUT as they finish."""
    return job.run(progress=progress, run_id=flow_run.id)


def publish_run_table(job: Job, stats: RunStats) -> None:
    row = stats.row()
    lines = ["| metric | value |", "| --- | --- |"] + [
        f"| {key} | {value:.2f} |" if isinstance(value, float) else f"| {key} | {value} |" for key, value in row.items()
    ]
    create_markdown_artifact(
        key="summarize-run", markdown=f"# summarize: {job.config.input}\n\n" + "\n".join(lines),
        description=f"tokenmill run, results in {job.out}",
    )


@flow(name="summarize", log_prints=False)
def summarize_flow(config: JobConfig, progress: bool = True) -> dict:
    """Summarize `config.input` into `OUT/results.parquet` and `OUT/usage.parquet`."""
    job = prepare(config)
    stats = generate(job, progress)
    publish_run_table(job, stats)
    return {"out": str(job.out), "summary": stats.summary_line(str(job.out)), "rows_error": stats.rows_error,
            **{k: v for k, v in stats.row().items() if isinstance(v, (int, float, str))}}


def parser() -> argparse.ArgumentParser:
    p = common_parser("python -m flows.summarize", "Summarize each row's text with a local model. "
                      "Writes OUT/results.parquet (one row per input row) and OUT/usage.parquet (one row per run).")
    p.add_argument("--max-words", type=int, default=40, help="the summary length asked for in the prompt (default 40)")
    return p


def main(args: argparse.Namespace) -> int:
    result = summarize_flow(config_from_args(args, max_words=args.max_words), progress=not args.no_progress)
    print(result["summary"], file=sys.stderr)
    return EXIT_ROW_ERRORS if result["rows_error"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(run_cli("python -m flows.summarize", main, parser()))
