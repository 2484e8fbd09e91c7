"""Tag each row with one of given labels (or several): `python -m flows.tag INPUT --labels a,b,c [--multi]`."""

from __future__ import annotations

import argparse
import sys

from flows._cli import common_parser, config_from_args, run_cli
from flows._job import cli_main, lazy_flow, run_job
from tokenmill.tasks.runner import JobConfig
from tokenmill.tasks.tag import prepare_tag


def tag(config: JobConfig, progress: bool = True) -> dict:
    """Tag `config.input`'s rows into OUT/results.parquet's `label` and `confidence` columns."""
    return run_job(prepare_tag, config, progress)


# `tag_flow`: the Prefect flow "tag", built on first use (see flows._job.lazy_flow)
__getattr__ = lazy_flow(tag, "tag", "tag_flow")


def parser() -> argparse.ArgumentParser:
    p = common_parser("python -m flows.tag", "Tag each row's text with one of the given labels (or several with "
                      "--multi). The reply is constrained to the labels by a grammar. Writes OUT/results.parquet "
                      "with a `label` column (a list with --multi) and `confidence`: the model's probability of "
                      "its reply among the replies the labels allow, from its own token probabilities.")
    p.add_argument("--labels", required=True,
                   help="comma-separated labels (a,b,c), or a YAML/JSON file: a list of names, a list of "
                        "{name, description}, or a mapping of name to description (in a job spec: inline). "
                        "Descriptions go in the prompt")
    p.add_argument("--multi", action="store_true", help="allow several labels per row (each at most once)")
    p.set_defaults(max_tokens=32)
    return p


def job_config(args: argparse.Namespace) -> JobConfig:
    """The job a parsed command line (or a job spec, see tokenmill.jobspec) asks for."""
    return config_from_args(args, labels=args.labels, multi=args.multi)


def main(args: argparse.Namespace) -> int:
    return cli_main(args, job_config(args), prepare_tag, tag, "tag")


if __name__ == "__main__":
    sys.exit(run_cli("python -m flows.tag", main, parser()))
