"""Score summaries against references with ROUGE (rouge-score): `python -m flows.eval summarize`.

Each row's summary is scored against each of its references (one or several columns, each a
string or a list of strings) and the best-matching reference counts, per metric: ROUGE-1,
ROUGE-2 and ROUGE-L F1 with stemming. Rows with status error score 0.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tokenmill.errors import InputError
from tokenmill.io.readers import scan_input

METRICS = ("rouge1", "rouge2", "rougeL")


def load_references(path: Path, columns: list[str], id_column: str | None) -> dict:
    frame = scan_input(path)
    names = frame.collect_schema().names()
    for column in [*columns, *([id_column] if id_column else [])]:
        if column not in names:
            raise InputError(f"gold file {path} has no column {column!r}; its columns: {', '.join(names)}")
    df = frame.select(([pl.col(id_column).alias("__id")] if id_column else []) + columns).collect()
    keys = df["__id"].to_list() if id_column else list(range(df.height))
    refs = {}
    for key, record in zip(keys, df.select(columns).to_dicts()):
        texts = []
        for value in record.values():
            texts += [str(v) for v in value if v] if isinstance(value, list) else ([str(value)] if value else [])
        refs[key] = texts
    return refs


def evaluate_summaries(out: Path, gold_path: Path, ref_columns: list[str], gold_id: str | None = None):
    """(per-row scores, summary) of OUT/results.parquet's `summary` column against the references."""
    from rouge_score import rouge_scorer

    path = out / "results.parquet"
    if not path.exists():
        raise InputError(f"{out} has no results.parquet; run python -m flows.summarize first")
    results = pl.read_parquet(path)
    if "summary" not in results.columns:
        raise InputError(f"{path} has no `summary` column: it is not a summarize output")
    refs = load_references(gold_path, ref_columns, gold_id)
    scorer = rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)
    rows = []
    for record in results.select("row", "id", "status", "summary").to_dicts():
        key = record["id"] if gold_id else record["row"]
        if key not in refs:
            raise InputError(f"the gold has no row for result {'id' if gold_id else 'row'} {key!r}")
        best = dict.fromkeys(METRICS, 0.0)
        if record["status"] == "ok" and record["summary"]:
            for ref in refs[key]:
                scores = scorer.score(ref, record["summary"])
                for m in METRICS:
                    best[m] = max(best[m], scores[m].fmeasure)
        rows.append({"row": record["row"], "id": str(record["id"]), "status": record["status"],
                     "references": len(refs[key]), **best})
    scores = pl.DataFrame(rows)
    summary = pl.DataFrame({"metric": list(METRICS), "f1": [scores[m].mean() for m in METRICS],
                            "rows": [scores.height] * len(METRICS)})
    return scores, summary
