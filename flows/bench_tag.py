"""Tagging against summarizing on the same rows, in one sitting.

    python -m flows.bench_tag [--limit 48]

Takes the first E2E dev rows whose gold names an eatType, tags them with
`python -m flows.tag --labels restaurant,pub,coffee shop`, summarizes the same rows with
`python -m flows.summarize`, and prints tagging accuracy against the gold, each job's rows/s
(generation wall time from usage.parquet, without start-up) and their ratio, with the load average.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import polars as pl

from tokenmill.evaluate import parse_e2e_mr

REPO = Path(__file__).resolve().parents[1]
E2E = REPO.parent / "shared" / "datasets" / "e2e" / "dev.csv"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.bench_tag", description=__doc__.split("\n\n")[2])
    p.add_argument("--limit", type=int, default=48)
    p.add_argument("--out", default="/tmp/tokenmill-bench-tag")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = pl.read_csv(E2E).with_columns(
        eatType=pl.col("mr").map_elements(lambda mr: parse_e2e_mr(mr).get("eatType"), return_dtype=pl.String))
    df = df.filter(pl.col("eatType").is_not_null()).head(args.limit).select("ref", "eatType")
    rows = out / "rows.parquet"
    df.write_parquet(rows)
    print("load average before:", " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    common = [str(rows), "--column", "ref", "--no-cache", "--no-progress", "--threads", str(args.threads)]
    subprocess.run([sys.executable, "-m", "flows.tag", *common, "--labels", "restaurant,pub,coffee shop",
                    "--out", str(out / "tag")], cwd=REPO, check=True)
    subprocess.run([sys.executable, "-m", "flows.summarize", *common, "--out", str(out / "summarize")],
                   cwd=REPO, check=True)
    tagged = pl.read_parquet(out / "tag" / "results.parquet")
    accuracy = (tagged["label"] == df["eatType"]).mean()
    rates = {}
    for job in ("tag", "summarize"):
        usage = pl.read_parquet(out / job / "usage.parquet").row(-1, named=True)
        rates[job] = usage["rows_total"] / usage["wall_s"]
        print(f"{job}: {usage['rows_total']} rows in {usage['wall_s']:.1f} s = {rates[job]:.2f} rows/s; "
              f"{usage['prompt_tokens']} prompt ({usage['cached_tokens']} shared-prefix) + "
              f"{usage['completion_tokens']} completion tokens")
    print(f"eatType accuracy {accuracy:.3f} over {tagged.height} rows (always 'restaurant' would score "
          f"{(df['eatType'] == 'restaurant').mean():.3f}); mean confidence {tagged['confidence'].mean():.3f}; "
          f"tag/summarize rows/s ratio {rates['tag'] / rates['summarize']:.2f}x")
    print("load average after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
