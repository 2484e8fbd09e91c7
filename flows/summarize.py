"""Summarize a text column with a local model: `python -m flows.summarize INPUT [options]`."""

from __future__ import annotations

import argparse
import sys

from prefect import flow

from flows._cli import common_parser, config_from_args, run_cli
from flows._job import cli_main, run_job
from tokenmill.tasks.runner import JobConfig
from tokenmill.tasks.summarize import prepare_summarize


@flow(name="summarize", log_prints=False)
def summarize_flow(config: JobConfig, progress: bool = True) -> dict:
    """Summarize `config.input` into `OUT/results.parquet` and `OUT/usage.parquet`."""
    return run_job(prepare_summarize, config, progress)


def parser() -> argparse.ArgumentParser:
    p = common_parser("python -m flows.summarize", "Summarize each row's text with a local model. "
                      "Writes OUT/results.parquet (one row per input row) and OUT/usage.parquet (one row per run).")
    p.add_argument("--max-words", type=int, default=40, help="the summary length asked for in the prompt (default 40)")
    return p


def main(args: argparse.Namespace) -> int:
    return cli_main(args, config_from_args(args, max_words=args.max_words), prepare_summarize, summarize_flow)


if __name__ == "__main__":
    sys.exit(run_cli("python -m flows.summarize", main, parser()))
