"""Measure results against references, and run the direct-call baseline.

    python -m flows.eval extract OUT [OUT2] --gold FILE [--gold-column mr | --gold-fields a,b | --gold-id id]
    python -m flows.eval baseline INPUT --column ref --schema SCHEMA --out DIR [--limit N]
    python -m flows.eval summarize OUT [OUT2] --gold FILE --ref-column target [--gold-id id]

Read-only reports (baseline aside), not Prefect flows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

from flows._cli import EXIT_OK, run_cli
from tokenmill.evaluate import evaluate_extract, side_by_side

_TABLE = dict(tbl_rows=200, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, fmt_str_lengths=40,
              float_precision=3, tbl_width_chars=160)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.eval", description=(
        "Score results against references (extract: per-field exact and normalized match and a confusion "
        "table for fields with few values; summarize: ROUGE), or run the direct-call baseline that extraction "
        "is judged against. Give two output folders to compare them side by side."))
    sub = p.add_subparsers(dest="task", required=True, metavar="{extract,summarize,baseline}")

    e = sub.add_parser("extract", help="score OUT/results.parquet's `extracted` column against gold fields",
                       description=(
        "Score extraction results against gold fields. Prints per-field accuracy (exact: equal JSON values; "
        "normalized: case, spacing, end punctuation and number format ignored, yes/no equal to true/false), "
        "field_accuracy (normalized, over every row and field; a null gold is right only when null is "
        "predicted), `present` (over the fields the gold fills) and a confusion table for fields whose gold "
        "takes few values. Writes OUT/eval.parquet (per row), OUT/eval_summary.parquet and "
        "OUT/eval_confusion.parquet. Rows with status error count as wrong."))
    e.add_argument("out", metavar="OUT", nargs="+", help="output folder(s); two or more are compared side by side")
    e.add_argument("--gold", required=True, help="file holding the gold (CSV, Parquet, JSONL)")
    e.add_argument("--gold-column", default="mr",
                   help="column with the gold: a JSON object per row, or E2E fields `name[X], area[Y]` (default mr)")
    e.add_argument("--gold-fields", help="instead: comma-separated columns, one per field, each holding its value")
    e.add_argument("--gold-id", help="the gold's id column, matched against the results' `id` (the job's "
                                     "--id-column); default: match by row position")
    e.add_argument("--confusion", action="store_true", help="print the confusion tables too")

    b = sub.add_parser("baseline", help="one plain llama-cpp-python create_chat_completion per row", description=(
        "The direct-call baseline: for each row one llama-cpp-python create_chat_completion with the schema as "
        "response_format and a one-line instruction before the text, no batching and no prompt template. "
        "Writes OUT/results.parquet with an `extracted` column that `flows.eval extract` scores."))
    b.add_argument("input", metavar="INPUT", help="input file (CSV, Parquet, JSONL)")
    b.add_argument("--column", help="the text column")
    b.add_argument("--id-column", help="a column to copy into `id`")
    b.add_argument("--schema", required=True, help="JSON Schema file, or a job spec with a `schema` key")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--model", help="model file or reference (default: the embedded default model)")
    b.add_argument("--limit", type=int, help="first N rows only")
    b.add_argument("--max-tokens", type=int, default=160, help="per row (default 160)")
    b.add_argument("--n-ctx", type=int, default=2048, help="context size (default 2048)")
    b.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: every core)")
    b.add_argument("--instruction", help="the one-line instruction (default: the E2E restaurant one)")

    s = sub.add_parser("summarize", help="ROUGE of OUT/results.parquet's summaries against references",
                       description="ROUGE-1, ROUGE-2 and ROUGE-L F1 (rouge-score, stemmed) of each summary against "
                       "one or several references per row (the best-matching reference counts). Writes "
                       "OUT/eval.parquet and OUT/eval_summary.parquet.")
    s.add_argument("out", metavar="OUT", nargs="+", help="output folder(s); two or more are compared side by side")
    s.add_argument("--gold", required=True, help="file holding the references (CSV, Parquet, JSONL)")
    s.add_argument("--ref-column", required=True, action="append",
                   help="column with the reference: a string or a list of strings; repeat for several columns")
    s.add_argument("--gold-id", help="the gold's id column, matched against the results' `id`; default: row position")
    return p


def _print(title: str, frame: pl.DataFrame) -> None:
    print(title)
    with pl.Config(**_TABLE):
        print(frame)


def main_extract(args: argparse.Namespace) -> int:
    fields = [f.strip() for f in args.gold_fields.split(",")] if args.gold_fields else None
    summaries = {}
    for folder in args.out:
        out = Path(folder)
        scores, summary, confusion = evaluate_extract(out, Path(args.gold), args.gold_column, fields, args.gold_id)
        scores.write_parquet(out / "eval.parquet")
        summary.write_parquet(out / "eval_summary.parquet")
        confusion.write_parquet(out / "eval_confusion.parquet")
        summaries[folder] = summary
        _print(f"{folder}: {scores.height} rows", summary)
        if args.confusion and confusion.height:
            _print(f"{folder}: confusion (gold, predicted, count)", confusion)
    if len(summaries) > 1:
        _print("side by side (normalized)", side_by_side(summaries))
    return EXIT_OK


def main_baseline(args: argparse.Namespace) -> int:
    from tokenmill.baseline import INSTRUCTION, run_baseline

    result = run_baseline(args.input, args.column, args.schema, Path(args.out), model=args.model, limit=args.limit,
                          max_tokens=args.max_tokens, n_ctx=args.n_ctx, threads=args.threads,
                          instruction=args.instruction or INSTRUCTION, id_column=args.id_column)
    print(f"baseline: {result['rows']} rows ({result['ok']} parse as JSON objects, {result['schema_valid']} schema-valid), {result['prompt_tokens']} prompt + "
          f"{result['completion_tokens']} completion tokens, {result['wall_s']:.1f} s; results in {args.out}",
          file=sys.stderr)
    return EXIT_OK


def main_summarize(args: argparse.Namespace) -> int:
    from tokenmill.evaluate_summary import evaluate_summaries

    summaries = {}
    for folder in args.out:
        out = Path(folder)
        scores, summary = evaluate_summaries(out, Path(args.gold), args.ref_column, args.gold_id)
        scores.write_parquet(out / "eval.parquet")
        summary.write_parquet(out / "eval_summary.parquet")
        summaries[folder] = summary.rename({"f1": "normalized"})
        _print(f"{folder}: {scores.height} rows", summary)
    if len(summaries) > 1:
        _print("side by side (F1)", side_by_side(summaries))
    return EXIT_OK


def main(args: argparse.Namespace) -> int:
    return {"extract": main_extract, "baseline": main_baseline, "summarize": main_summarize}[args.task](args)


if __name__ == "__main__":
    sys.exit(run_cli("python -m flows.eval", main, parser()))
