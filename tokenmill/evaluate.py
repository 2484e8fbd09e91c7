"""Score extraction results against gold fields: per-field accuracy and exact match."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from tokenmill.errors import InputError
from tokenmill.io.readers import InputTable

_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]")


def parse_e2e_mr(mr: str) -> dict[str, str]:
    """E2E's meaning representation, `name[The Vaults], customer rating[5 out of 5]`, as camelCase fields."""
    fields = {}
    for slot, value in _SLOT.findall(mr or ""):
        words = slot.strip().split()
        fields[words[0] + "".join(w.capitalize() for w in words[1:])] = value.strip()
    return fields


def normalize(value) -> str | None:
    """Compare values loosely: case and spacing ignored, yes/no equal to true/false."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = " ".join(str(value).split()).casefold()
    return {"true": "yes", "false": "no"}.get(text, text) or None


def score_extraction(results: pl.DataFrame, gold: list[dict[str, str]], fields: list[str]) -> pl.DataFrame:
    """One row per input row: each field's correctness and whether all fields match."""
    rows = []
    for record in results.select("row", "status", "extracted").to_dicts():
        expected = gold[record["row"]]
        got = record["extracted"] or {}
        scores = {f: normalize(got.get(f)) == normalize(expected.get(f)) for f in fields}
        rows.append({"row": record["row"], "status": record["status"], **scores,
                     "exact_match": all(scores.values())})
    return pl.DataFrame(rows)


def summarize_scores(scores: pl.DataFrame, fields: list[str]) -> pl.DataFrame:
    """Per-field accuracy and overall exact match, over every scored row (errors count as wrong)."""
    return pl.DataFrame({"metric": [*fields, "exact_match"],
                         "accuracy": [scores[f].mean() for f in fields] + [scores["exact_match"].mean()],
                         "rows": [scores.height] * (len(fields) + 1)})


def load_gold(path: Path, column: str, limit: int | None) -> list[dict[str, str]]:
    table = InputTable.open(path, column, None, limit)
    gold = []
    for chunk in table.chunks(1000):
        gold.extend(parse_e2e_mr(v) for v in chunk[column].to_list())
    return gold


def evaluate_extract(out: Path, gold_path: Path, gold_column: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    results_path = out / "results.parquet"
    if not results_path.exists():
        raise InputError(f"{out} has no results.parquet; run python -m flows.extract first")
    results = pl.read_parquet(results_path)
    if "extracted" not in results.columns:
        raise InputError(f"{results_path} has no `extracted` column: it is not an extraction output")
    fields = [f.name for f in results.schema["extracted"].fields]
    gold = load_gold(gold_path, gold_column, int(results["row"].max()) + 1)
    scores = score_extraction(results, gold, fields)
    return scores, summarize_scores(scores, fields)
