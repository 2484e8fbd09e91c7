"""Summarize a text column with a local model: `python -m flows.summarize INPUT [options]`."""

from __future__ import annotations

import argparse
import sys

from flows._cli import common_parser, config_from_args, run_cli
from flows._job import cli_main, lazy_flow, run_job
from tokenmill.tasks.runner import JobConfig
from tokenmill.tasks.summarize import prepare_summarize


def summarize(config: JobConfig, progress: bool = True) -> dict:
    """Summarize `config.input` into `OUT/results.parquet` and `OUT/usage.parquet`."""
    return run_job(prepare_summarize, config, progress)


# `summarize_flow`: the Prefect flow "summarize", built on first use (see flows._job.lazy_flow)
__getattr__ = lazy_flow(summarize, "summarize", "summarize_flow")


def parser() -> argparse.ArgumentParser:
    p = common_parser("python -m flows.summarize", "Summarize each row's text with a local model. "
                      "Writes OUT/results.parquet (one row per input row) and OUT/usage.parquet (one row per run).")
    p.add_argument("--max-words", type=int, default=40, help="the summary length asked for in the prompt (default 40)")
    p.add_argument("--split-long", action=argparse.BooleanOptionalAction, default=True,
                   help="a text whose prompt does not fit --n-ctx minus --max-tokens is cut at paragraph, then "
                        "sentence boundaries; each part is summarized and the summaries are combined with "
                        "prompts/reduce/ (the results' `chunks` column counts the parts). With --no-split-long "
                        "such a row fails alone (default: on)")
    p.add_argument("--max-chunks", type=int, default=100,
                   help="most parts one text may be cut into; a longer text fails alone (default 100)")
    return p


def job_config(args: argparse.Namespace) -> JobConfig:
    """The job a parsed command line (or a job spec, see tokenmill.jobspec) asks for."""
    return config_from_args(args, max_words=args.max_words, split_long=args.split_long, max_chunks=args.max_chunks)


def main(args: argparse.Namespace) -> int:
    return cli_main(args, job_config(args), prepare_summarize, summarize, "summarize")


if __name__ == "__main__":
    sys.exit(run_cli("python -m flows.summarize", main, parser()))
