"""Score a job's results against references: `python -m flows.eval extract OUT --gold FILE`.

A read-only report, not a Prefect flow: it generates nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

from flows._cli import EXIT_OK, run_cli
from tokenmill.evaluate import evaluate_extract


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.eval", description=(
        "Score extraction results (OUT/results.parquet's `extracted` column) against gold fields written "
        "the E2E way, `name[The Vaults], customer rating[5 out of 5]`, matched by row position. Prints "
        "per-field accuracy and exact match (all fields right) and writes OUT/eval.parquet (per row) and "
        "OUT/eval_summary.parquet. Rows with status error count as wrong."))
    p.add_argument("task", choices=["extract"], help="what kind of results to score")
    p.add_argument("out", metavar="OUT", help="the job's output folder")
    p.add_argument("--gold", required=True, help="the input file holding the gold fields (e.g. E2E dev.csv)")
    p.add_argument("--gold-column", default="mr", help="column with the gold fields (default mr)")
    return p


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    scores, summary = evaluate_extract(out, Path(args.gold), args.gold_column)
    scores.write_parquet(out / "eval.parquet")
    summary.write_parquet(out / "eval_summary.parquet")
    with pl.Config(tbl_rows=50, tbl_hide_dataframe_shape=True):
        print(summary)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run_cli("python -m flows.eval", main, parser()))
