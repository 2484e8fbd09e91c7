"""Run an OpenAI Batch API request file locally: `python -m flows.batch REQUESTS.jsonl [options]`."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from flows._cli import EXIT_FAILED, EXIT_OK, EXIT_ROW_ERRORS, common_parser, config_from_args, run_cli
from flows._job import cli_main, lazy_flow, run_job
from tokenmill.tasks.batch import prepare_batch
from tokenmill.tasks.batch_output import ERRORS_FILE, OUTPUT_FILE
from tokenmill.tasks.batch_requests import describe, read_requests
from tokenmill.tasks.planner import _default_out
from tokenmill.tasks.runner import JobConfig

PROG = "python -m flows.batch"

EXIT_STATUS_HELP = """exit status:
  0    every request was answered (OUT/output.jsonl); with --check: no problem found
  1    the job could not run, or the file is refused (one line says why, naming the line)
  2    bad command-line usage
  3    finished with failed requests: see OUT/errors.jsonl; with --check: some requests would fail alone
  130  interrupted (Ctrl-C); finished requests are kept: run the same command again to continue
"""


def batch(config: JobConfig, progress: bool = True) -> dict:
    """Answer every request of `config.input` into OUT/output.jsonl and OUT/errors.jsonl."""
    return run_job(prepare_batch, config, progress)


# `batch_flow`: the Prefect flow "batch", built on first use (see flows._job.lazy_flow)
__getattr__ = lazy_flow(batch, "batch", "batch_flow")


def parser() -> argparse.ArgumentParser:
    p = common_parser(
        PROG, textwrap.fill("Answer an OpenAI Batch API request file (.jsonl: custom_id, method, url, body) with a local model. "
        "url /v1/chat/completions (messages rendered with the model's own chat template) or /v1/completions. "
        "A request's body fields (max_tokens / max_completion_tokens, temperature, top_p, seed, stop, "
        "response_format json_object or json_schema) win over the options below, which fill in what it leaves out; "
        "the body's model is recorded, --model decides what runs. A request with a field tokenmill does not "
        "support fails alone with an OpenAI-style error naming it. Writes OUT/output.jsonl (answered requests, "
        "OpenAI's batch output format, input order), OUT/errors.jsonl (failed requests), OUT/results.parquet, "
        "OUT/usage.parquet and OUT/requests.parquet.", 100),
        dataset=False, input_metavar="REQUESTS", input_help="OpenAI batch input file (.jsonl), one request a line")
    p.add_argument("--check", action="store_true",
                   help="check the file and list every problem with its line number, without loading a model")
    for action in p._actions:  # the options a request's body overrides
        if action.dest in ("max_tokens", "temperature", "seed"):
            action.help = f"{action.help}; for requests whose body does not set it"
    p.epilog = EXIT_STATUS_HELP
    return p


def job_config(args: argparse.Namespace) -> JobConfig:
    """The job a parsed command line (or a job spec, see tokenmill.jobspec) asks for."""
    return config_from_args(args, column="request", id_column="custom_id")


def check(path: str) -> int:
    requests = read_requests(Path(path))
    for line in describe(requests.problems, requests.path):
        print(line)
    fatal = len(requests.fatal)
    failing = len(requests.problems) - fatal
    print(f"{path}: {len(requests.requests)} requests read; {fatal} problem{'s' * (fatal != 1)} refuse the file, "
          f"{failing} request{'s' * (failing != 1)} would fail alone", file=sys.stderr)
    if fatal or not requests.requests:
        return EXIT_FAILED
    return EXIT_ROW_ERRORS if failing else EXIT_OK


def main(args: argparse.Namespace) -> int:
    if args.check:
        return check(args.input)
    code = cli_main(args, job_config(args), prepare_batch, batch, "batch")
    if not args.show_prompt:
        out = Path(args.out) if args.out else _default_out(args.input, "batch")
        counts = [len((out / name).read_text(encoding="utf-8").splitlines()) if (out / name).exists() else 0
                  for name in (OUTPUT_FILE, ERRORS_FILE)]
        print(f"{out / OUTPUT_FILE}: {counts[0]} answered; {out / ERRORS_FILE}: {counts[1]} failed", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(run_cli(PROG, main, parser()))
