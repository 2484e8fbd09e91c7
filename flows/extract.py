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
    p.add_argument("--examples", metavar="FILE",
                   help="few-shot examples: a YAML/JSON list or JSONL file of {text, output} (output valid against "
                        "the schema), or a job spec with an `examples` key (in a job spec: the list inline). They "
                        "go before the row's text, in the prompt prefix all rows share, so they are evaluated once "
                        "per run")
    p.add_argument("--no-grammar", dest="grammar", action="store_false",
                   help="generate without the schema's grammar: validate each reply and ask again with the "
                        "validator's message, up to --max-retries times (what a backend without grammar "
                        "support, such as gpt4all, always does)")
    p.add_argument("--max-retries", type=int, default=2,
                   help="without grammar: new tries after an invalid reply before the row is an error (default 2)")
    p.add_argument("--split-long", action=argparse.BooleanOptionalAction, default=False,
                   help="a text whose prompt does not fit --n-ctx minus --max-tokens is cut as summarize cuts it "
                        "(paragraphs, then sentences); each part is extracted with the grammar and the parts' "
                        "objects are merged field by field (--merge), then validated. The results' `chunks` and "
                        "`calls` count the parts. Without it such a row fails alone (default: off)")
    p.add_argument("--max-chunks", type=int, default=100,
                   help="with --split-long: most parts one text may be cut into (default 100)")
    p.add_argument("--merge", metavar="FIELD=RULE,...",
                   help="with --split-long: how parts' values of a field combine: first (the first non-null, "
                        "default), majority (the most common non-null), union (arrays: all items, default for "
                        "arrays). A field's `x-merge` in the schema wins")
    p.set_defaults(max_tokens=192)
    return p


def job_config(args: argparse.Namespace) -> JobConfig:
    """The job a parsed command line (or a job spec, see tokenmill.jobspec) asks for."""
    return config_from_args(args, schema=args.schema, examples=args.examples, grammar=args.grammar,
                            max_retries=args.max_retries, split_long=args.split_long, max_chunks=args.max_chunks,
                            merge=args.merge)


def main(args: argparse.Namespace) -> int:
    return cli_main(args, job_config(args), prepare_extract, extract, "extract")


if __name__ == "__main__":
    sys.exit(run_cli("python -m flows.extract", main, parser()))
