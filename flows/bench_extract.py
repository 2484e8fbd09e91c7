"""Extraction and tagging on E2E dev against a direct call, in one sitting.

    python -m flows.bench_extract [extract] [--limit 60] [--examples-counts 0,2,4] [-- flows.extract options]
    python -m flows.bench_extract valid [--limit 200] [--schema jobs/e2e-fields.json] [--max-tokens 160]
    python -m flows.bench_extract tag [--limit 60]

Rows are the first --limit distinct meaning representations of the E2E dev split (as the
peers' W2 workload reads them), written to OUT/input.parquet with their gold.
- extract: the direct-call baseline (`flows.eval baseline`: one plain create_chat_completion
  per row, the schema as response_format, a one-line instruction), then `flows.extract` with
  0, 2, 4 ... of the job's few-shot examples; all scored by `flows.eval extract`. The baseline
  is scored on every reply that parses as a JSON object, schema-valid or not (llama-cpp-python's
  converter drops `enum` on nullable types, so few of its replies are schema-valid).
- valid: `flows.extract` alone; counts the rows that are schema-valid and says why the others failed.
- tag: `flows.tag --labels restaurant,pub,coffee shop` and `flows.summarize` on the same rows,
  one after the other: rows/s of each and their ratio, and eatType accuracy against the gold.
Load averages are printed before and after; absolute times move on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import yaml

from tokenmill.evaluate import evaluate_extract, parse_e2e_mr, side_by_side

REPO = Path(__file__).resolve().parents[1]
E2E = REPO.parent / "shared" / "datasets" / "e2e" / "dev.csv"
EAT = ["restaurant", "pub", "coffee shop"]
_TABLE = dict(tbl_rows=50, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, float_precision=3,
              tbl_width_chars=160, fmt_str_lengths=60)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.bench_extract", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="extract", choices=["extract", "valid", "tag"])
    p.add_argument("--input", default=str(E2E), help=f"E2E-style CSV with `ref` and `mr` (default {E2E})")
    p.add_argument("--limit", type=int, help="rows (default 60; valid: 200)")
    p.add_argument("--schema", help="schema or job spec (default jobs/restaurants.yaml; valid: jobs/e2e-fields.json)")
    p.add_argument("--examples", default=str(REPO / "jobs" / "restaurants-examples.yaml"),
                   help="few-shot examples; the first K of them are used for each K in --examples-counts")
    p.add_argument("--examples-counts", default="0,2,4", help="extract: numbers of examples to run (default 0,2,4)")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="/tmp/tokenmill-bench-extract", help="folder for every run's output")
    p.add_argument("--skip-baseline", metavar="DIR", help="extract: reuse a baseline output folder from earlier")
    p.add_argument("extra", nargs="*", help="after --: more flows.extract options (e.g. --prompt FILE)")
    return p


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def rows_file(args: argparse.Namespace, out: Path) -> Path:
    frame = pl.read_csv(args.input).unique(subset=["mr"], keep="first", maintain_order=True).head(args.limit)
    out.mkdir(parents=True, exist_ok=True)
    frame.select("ref", "mr").write_parquet(out / "input.parquet")
    return out / "input.parquet"


def run(module: str, *argv: str) -> tuple[float, int]:
    """Run `python -m module argv`: (wall seconds including start-up, exit code)."""
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO).returncode
    return time.perf_counter() - t0, rc


def usage(folder: Path) -> dict:
    return pl.read_parquet(folder / "usage.parquet").row(-1, named=True)


def bench_extract(args: argparse.Namespace, data: Path, out: Path, common: list[str]) -> None:
    counts = [int(c) for c in args.examples_counts.split(",") if c.strip()]
    examples = yaml.safe_load(Path(args.examples).read_text(encoding="utf-8"))["examples"]
    base, stats, summaries = Path(args.skip_baseline) if args.skip_baseline else out / "baseline", {}, {}
    if not args.skip_baseline:
        wall, rc = run("flows.eval", "baseline", str(data), "--column", "ref", "--schema", args.schema,
                       "--out", str(base), *common)
        res = pl.read_parquet(base / "results.parquet")
        stats["baseline"] = {"parsed": int((res["status"] == "ok").sum()), "schema_valid": int(res["schema_valid"].sum()),
                             "prompt_tok/row": res["prompt_tokens"].mean(), "shared_prefix_tok": None,
                             "evaluated_prompt_tok": int(res["prompt_tokens"].sum()),
                             "run_s": res["latency_ms"].sum() / 1000, "wall_s": wall}
    summaries["baseline"] = evaluate_extract(base, data)[1]
    for k in counts:
        name, folder = f"tokenmill_{k}ex", out / f"tokenmill_{k}ex"
        extra = []
        if k:
            path = out / f"examples_{k}.yaml"
            path.write_text(yaml.safe_dump({"examples": examples[:k]}, allow_unicode=True), encoding="utf-8")
            extra = ["--examples", str(path)]
        wall, rc = run("flows.extract", str(data), "--column", "ref", "--schema", args.schema, "--out", str(folder),
                       "--no-cache", "--no-progress", *common, *extra, *args.extra)
        if rc not in (0, 3):
            print(f"{name}: flows.extract exited {rc}", file=sys.stderr)
            continue
        res, use = pl.read_parquet(folder / "results.parquet"), usage(folder)
        prefix = int(res["cached_tokens"].max())  # each row reports the shared prefix, evaluated once, as cached
        stats[name] = {"parsed": int((res["status"] == "ok").sum()), "schema_valid": int((res["status"] == "ok").sum()),
                       "prompt_tok/row": res["prompt_tokens"].mean(), "shared_prefix_tok": prefix,
                       "evaluated_prompt_tok": use["prompt_tokens"] - use["cached_tokens"] + prefix,
                       "run_s": use["wall_s"], "wall_s": wall}
        summaries[name] = evaluate_extract(folder, data)[1]
    with pl.Config(**_TABLE):
        print(f"field accuracy (normalized), {args.limit} distinct E2E dev rows, schema {args.schema}, "
              f"--max-tokens {args.max_tokens}:")
        print(side_by_side(summaries).select(pl.exclude("ratio")))
        print("rows, cost and time (parsed: replies that parse as JSON objects; run_s: generation only, without "
              "start-up; wall_s: the whole command):")
        print(pl.DataFrame([{"run": n, **s} for n, s in stats.items()]))
    acc = {n: s.filter(pl.col("metric") == "field_accuracy")["normalized"][0] for n, s in summaries.items()}
    for name in list(summaries)[1:]:
        print(f"{name}: field accuracy {acc[name]:.3f} = {acc[name] / max(acc['baseline'], 1e-9):.2f}x the baseline's "
              f"{acc['baseline']:.3f}")
    if "tokenmill_0ex" in stats:
        zero = stats["tokenmill_0ex"]["prompt_tok/row"]
        for k in counts:
            if k and f"tokenmill_{k}ex" in stats:
                s = stats[f"tokenmill_{k}ex"]
                print(f"{k} examples: +{s['prompt_tok/row'] - zero:.0f} prompt tokens a row, all in the shared prefix "
                      f"(evaluated once): {s['evaluated_prompt_tok']} prompt tokens evaluated in the run against "
                      f"{stats['tokenmill_0ex']['evaluated_prompt_tok']} without; {s['run_s']:.1f} s against "
                      f"{stats['tokenmill_0ex']['run_s']:.1f} s")


def bench_valid(args: argparse.Namespace, data: Path, out: Path, common: list[str]) -> None:
    folder = out / "valid"
    wall, rc = run("flows.extract", str(data), "--column", "ref", "--schema", args.schema, "--out", str(folder),
                   "--no-cache", "--no-progress", *common, *args.extra)
    res, use = pl.read_parquet(folder / "results.parquet"), usage(folder)
    ok = int((res["status"] == "ok").sum())
    print(f"valid: {ok}/{res.height} rows schema-valid (schema {args.schema}, --max-tokens {args.max_tokens}); "
          f"{use['calls']} calls for {res.height} rows; {use['wall_s']:.1f} s run, {wall:.1f} s wall")
    cols = [c for c in ("finish_reason", "completion_tokens", "calls") if c in res.columns]
    print("completion tokens: max", res["completion_tokens"].max(), "mean", f"{res['completion_tokens'].mean():.1f}")
    with pl.Config(**_TABLE):
        bad = res.filter(pl.col("status") != "ok")
        if bad.height:
            print(bad.select("row", *cols, "error", "raw_output"))


def bench_tag(args: argparse.Namespace, data: Path, out: Path, common: list[str]) -> None:
    tag_out, sum_out = out / "tag", out / "summarize"
    tag_wall, rc = run("flows.tag", str(data), "--column", "ref", "--labels", ",".join(EAT), "--out", str(tag_out),
                       "--no-cache", "--no-progress", "--threads", str(args.threads), "--limit", str(args.limit))
    sum_wall, rc2 = run("flows.summarize", str(data), "--column", "ref", "--out", str(sum_out), "--no-cache",
                        "--no-progress", "--threads", str(args.threads), "--limit", str(args.limit))
    tag_use, sum_use = usage(tag_out), usage(sum_out)
    res = pl.read_parquet(tag_out / "results.parquet")
    gold = [parse_e2e_mr(mr).get("eatType") for mr in pl.read_parquet(data)["mr"].to_list()]
    labels = res.sort("row")["label"].to_list()
    scored = [(g, p) for g, p in zip(gold, labels) if g is not None]
    right = sum(g == p for g, p in scored)
    majority = max(EAT, key=lambda e: sum(g == e for g, _ in scored))
    with pl.Config(**_TABLE):
        print(pl.DataFrame({"gold": [g for g, _ in scored], "predicted": [p for _, p in scored]})
              .group_by("gold", "predicted").len("rows").sort("gold", "rows", descending=[False, True]))
    print(f"eatType accuracy: {right}/{len(scored)} = {right / max(len(scored), 1):.3f} on the rows whose gold has one "
          f"(always '{majority}': {sum(g == majority for g, _ in scored) / max(len(scored), 1):.3f})")
    for name, use, wall in (("tag", tag_use, tag_wall), ("summarize", sum_use, sum_wall)):
        print(f"{name}: {use['rows_total']} rows in {use['wall_s']:.1f} s run ({use['rows_total'] / use['wall_s']:.2f} "
              f"rows/s), {wall:.1f} s wall; {use['prompt_tokens']} prompt ({use['cached_tokens']} shared) + "
              f"{use['completion_tokens']} completion tokens")
    ratio = (tag_use["rows_total"] / tag_use["wall_s"]) / (sum_use["rows_total"] / sum_use["wall_s"])
    print(f"tag rows/s / summarize rows/s = {ratio:.2f}x (run time, start-up excluded); "
          f"wall incl. start-up {sum_wall / tag_wall:.2f}x")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.limit = args.limit or (200 if args.mode == "valid" else 60)
    args.schema = args.schema or str(REPO / "jobs" / ("e2e-fields.json" if args.mode == "valid" else "restaurants.yaml"))
    out = Path(args.out)
    data = rows_file(args, out)
    print("load average before:", load(), flush=True)
    common = ["--limit", str(args.limit), "--max-tokens", str(args.max_tokens), "--threads", str(args.threads)]
    {"extract": bench_extract, "valid": bench_valid, "tag": bench_tag}[args.mode](args, data, out, common)
    print("load average after:", load())
    return 0


if __name__ == "__main__":
    sys.exit(main())
