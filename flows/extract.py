"""Extract typed fields with a JSON Schema: `python -m flows.extract INPUT --schema SCHEMA [options]`."""

from __future__ import annotations

import argparse
import sys

from flows._cli import common_parser, config_from_args, run_cli
from flows._job import cli_main, lazy_flow, run_job
from tokenmill.tasks.extract import prepare_extract
from tokenmill.tasks.runner import JobConfig


def extract(config: JobConfig, progress: bool = True) -> dict:
    """Extract `config.schema`'s fields from `config.input` into OUT/results.parquet's `extracted` column."""
    return run_job(prepare_extract, config, progress)


# `extract_flow`: the Prefect flow "extract", built on first use (see flows._job.lazy_flow)
__getattr__ = lazy_flow(extract, "extract", "extract_flow")


def parser() -> argparse.ArgumentParser:
    p = common_parser("python -m flows.extract", "Extract the fields of a JSON Schema from each row's text, "
                      "grammar-constrained so every ok row is valid JSON matching the schema. Writes "
                      "OUT/results.parquet with an `extracted` struct column and `raw_output`, and OUT/usage.parquet.")
    p.add_argument("--schema", required=True,
                   help="a JSON Schema file (.json), or a job spec (.yaml) with a `schema` key")
    p.add_argument("--no-grammar", dest="grammar", action="store_false",
                   help="generate without the schema's grammar: validate each reply and ask again with the "
                        "validator's message, up to --max-retries times (what a backend without grammar "
                        "support, such as gpt4all, always does)")
    p.add_argument("--max-retries", type=int, default=2,
                   help="without grammar: new tries after an invalid reply before the row is an error (default 2)")
    p.set_defaults(max_tokens=192)
    return p


def job_config(args: argparse.Namespace) -> JobConfig:
    """The job a parsed command line (or a job spec, see tokenmill.jobspec) asks for."""
    return config_from_args(args, schema=args.schema, grammar=args.grammar, max_retries=args.max_retries)


def main(args: argparse.Namespace) -> int:
    return cli_main(args, job_config(args), prepare_extract, extract, "extract")


if __name__ == "__main__":
    sys.exit(run_cli("python -m flows.extract", main, parser()))
