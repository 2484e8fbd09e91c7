"""Extraction quality against the direct-call baseline, in one sitting.

    python -m flows.bench_extract [--limit 60] [--schema jobs/restaurants.yaml] [--skip-baseline DIR] \\
        [-- extra flows.extract options, e.g. --prompt FILE or --examples FILE]

Runs the same E2E dev rows through `python -m flows.extract` (tokenmill) and through
`python -m flows.eval baseline` (one plain create_chat_completion per row), scores both with
`flows.eval extract`, and prints the field accuracy of each and their ratio, with the load
average before the run (absolute times move on a shared machine: compare within one run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from tokenmill.evaluate import evaluate_extract, side_by_side

REPO = Path(__file__).resolve().parents[1]
E2E = REPO.parent / "shared" / "datasets" / "e2e" / "dev.csv"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.bench_extract", description=__doc__.split("\n\n")[2])
    p.add_argument("--input", default=str(E2E), help=f"E2E-style CSV with `ref` and `mr` (default {E2E})")
    p.add_argument("--limit", type=int, default=60, help="rows (default 60)")
    p.add_argument("--schema", default=str(REPO / "jobs" / "restaurants.yaml"), help="schema or job spec")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="/tmp/tokenmill-bench-extract", help="folder for both runs' outputs")
    p.add_argument("--skip-baseline", metavar="DIR", help="reuse a baseline output folder from earlier")
    p.add_argument("extra", nargs="*", help="after --: more flows.extract options")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    print("load average before:", " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    common = ["--limit", str(args.limit), "--max-tokens", str(args.max_tokens), "--threads", str(args.threads)]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.extract", args.input, "--column", "ref", "--schema", args.schema,
                    "--out", str(out / "tokenmill"), "--no-cache", "--no-progress", *common, *args.extra],
                   cwd=REPO, check=True)
    t_tm = time.perf_counter() - t0
    base = Path(args.skip_baseline) if args.skip_baseline else out / "baseline"
    t_base = None
    if not args.skip_baseline:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flows.eval", "baseline", args.input, "--column", "ref", "--schema",
                        args.schema, "--out", str(base), *common], cwd=REPO, check=True)
        t_base = time.perf_counter() - t0
    summaries = {}
    for name, folder in (("baseline", base), ("tokenmill", out / "tokenmill")):
        _scores, summary, _confusion = evaluate_extract(folder, Path(args.input))
        summaries[name] = summary
    import polars as pl

    with pl.Config(tbl_rows=50, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, float_precision=3):
        print(side_by_side(summaries))
    acc = {n: s.filter(pl.col("metric") == "field_accuracy")["normalized"][0] for n, s in summaries.items()}
    valid = {n: s.filter(pl.col("metric") == "valid_rows")["normalized"][0] for n, s in summaries.items()}
    print(f"field accuracy: tokenmill {acc['tokenmill']:.3f}, baseline {acc['baseline']:.3f}, ratio "
          f"{acc['tokenmill'] / max(acc['baseline'], 1e-9):.2f}x; valid rows: tokenmill {valid['tokenmill']:.3f}, "
          f"baseline {valid['baseline']:.3f}; wall: tokenmill {t_tm:.1f} s (incl. start-up)"
          + (f", baseline {t_base:.1f} s (incl. load)" if t_base else " (baseline reused)"))
    print("load average after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
