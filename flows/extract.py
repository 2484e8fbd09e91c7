"""Extract typed fields with a JSON Schema: `python -m flows.extract INPUT --schema SCHEMA [options]`."""

from __future__ import annotations

import argparse
import sys

from prefect import flow

from flows._cli import common_parser, config_from_args, run_cli
from flows._job import cli_main, run_job
from tokenmill.tasks.extract import prepare_extract
from tokenmill.tasks.runner import JobConfig


@flow(name="extract", log_prints=False)
def extract_flow(config: JobConfig, progress: bool = True) -> dict:
    """Extract `config.schema`'s fields from `config.input` into OUT/results.parquet's `extracted` column."""
    return run_job(prepare_extract, config, progress)


def parser() -> argparse.ArgumentParser:
    p = common_parser("python -m flows.extract", "Extract the fields of a JSON Schema from each row's text, "
                      "grammar-constrained so every ok row is valid JSON matching the schema. Writes "
                      "OUT/results.parquet with an `extracted` struct column and `raw_output`, and OUT/usage.parquet.")
    p.add_argument("--schema", required=True,
                   help="a JSON Schema file (.json), or a job spec (.yaml) with a `schema` key")
    p.set_defaults(max_tokens=192)
    return p


def main(args: argparse.Namespace) -> int:
    return cli_main(args, config_from_args(args, schema=args.schema), prepare_extract, extract_flow)


if __name__ == "__main__":
    sys.exit(run_cli("python -m flows.extract", main, parser()))
