"""Report finished runs: `python -m flows.stats OUT [OUT...] [--png PATH | --no-png]`.

Not a Prefect flow: stats only reads output folders (OUT/usage.parquet, OUT/results.parquet) and
prints a table, so there is nothing to orchestrate, retry or record. The reading and aggregating
live in tokenmill.stats; this module is the command line.
"""

from __future__ import annotations

import argparse
import sys

from flows._cli import EXIT_OK, run_cli
from tokenmill.stats import collect, format_table, write_chart

PROG = "python -m flows.stats"

DESCRIPTION = """\
Print one line per run recorded in each OUT/usage.parquet, then a totals line, and draw a chart.

columns:
  run                 the first 8 characters of the run id (the Prefect flow run id)
  rows                input rows the run finished; generated + reused + rows never sent (empty text) = rows
  reused              rows not generated: found in the shared cache, duplicates of another row, or
                      resumed from an earlier run into the same folder
  prompt_tokens, completion_tokens
                      tokens the model processed in this run (reused rows add none)
  tokens/s            (prompt + completion tokens) / wall_s; in the totals line, all tokens over all wall time
  cost avoided (est.) what a paid API would have charged for this run's tokens at the run's prices: an
                      estimate, not a bill (shown when usage.parquet records it)

chart (PNG, two panels, one group of bars per run):
  Throughput per run: each run's prompt + completion tokens, and its completion tokens alone, divided by
  the run's wall-clock time (usage.parquet; wall time includes loading the model and evaluating prompts).
  results.parquet stores no completion times and rows are decoded concurrently, so their latencies
  overlap: adding them up would understate throughput, and a tokens/s curve over the run cannot be
  rebuilt honestly. The grey hatched bar is per-row data instead: one row's decode speed (its completion
  tokens / its decode_ms), the median over the rows that run generated and that are still in
  results.parquet (absent when a later run regenerated them all). Set against the orange bar it shows
  what decoding rows together buys.
  Tokens per run: prompt and completion tokens stacked.
"""

EPILOG = """exit status:
  0    the table was printed (and the chart written)
  1    a folder, usage.parquet or the chart path is unusable (the reason is printed on one line)
  2    bad command-line usage
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outs", metavar="OUT", nargs="+", help="output folder of a tokenmill run (its --out)")
    png = p.add_mutually_exclusive_group()
    png.add_argument("--png", metavar="PATH", default="stats.png",
                     help="where to write the chart (default: stats.png in the current folder)")
    png.add_argument("--no-png", action="store_true", help="print the table only")
    p.add_argument("--debug", action="store_true", help="print tracebacks for errors")
    return p


def main(args: argparse.Namespace) -> int:
    runs = collect(args.outs)
    print("\n".join(format_table(runs)))
    sys.stdout.flush()
    if not args.no_png:
        path = write_chart(runs, args.png)
        print(f"chart: {path}", file=sys.stderr)
    return EXIT_OK


def run(argv: list[str] | None = None) -> int:
    """Tokenmill errors become one line on stderr, exit 1 (flows._cli.run_cli; Prefect is not imported)."""
    return run_cli(PROG, main, parser(), argv)


if __name__ == "__main__":
    sys.exit(run())
