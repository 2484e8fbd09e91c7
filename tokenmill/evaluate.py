"""Score extraction results against gold fields: per-field exact and normalized match, confusion.

Gold comes from a file (CSV, Parquet, JSONL) in one of three forms:
- a column of E2E meaning representations, `name[The Vaults], customer rating[5 out of 5]`;
- a column holding a JSON object per row (a JSON string or a struct);
- one column per field (`--gold-fields`), each holding that field's value.
Rows are matched by position, or by id (`--gold-id`: the gold file's id column, matched against
the results' `id` column, which `--id-column` of the job wrote).

Two matches per field: `exact` (the JSON values are equal) and `normalized` (case, spacing and
punctuation at the ends ignored; yes/no equal true/false; numbers compared as numbers, so
"5", "5.0" and 5 agree). A null in the gold is a field the text does not give: predicting null
there is right, anything else wrong. `field_accuracy` is the normalized match over every
(row, field); `present_accuracy` over the (row, field) pairs the gold fills. Error rows count
as wrong everywhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import polars as pl

from tokenmill.errors import InputError
from tokenmill.io.readers import scan_input

_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]")
ENUM_MAX_VALUES = 12  # a field whose gold takes at most this many values gets a confusion table


def parse_e2e_mr(mr: str) -> dict[str, str]:
    """E2E's meaning representation, `name[The Vaults], customer rating[5 out of 5]`, as camelCase fields."""
    fields = {}
    for slot, value in _SLOT.findall(mr or ""):
        words = slot.strip().split()
        fields[words[0] + "".join(w.capitalize() for w in words[1:])] = value.strip()
    return fields


def normalize(value: Any) -> str | None:
    """Compare values loosely: case, spacing and end punctuation ignored, yes/no equal to
    true/false, numbers by value ("5.0" == 5)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return json.dumps(sorted(normalize(v) or "" for v in value))
    text = " ".join(str(value).split()).casefold().strip(" .,;:!'\"")
    try:
        number = float(text.replace(",", "")) if text and text[0] in "+-.0123456789" else None
    except ValueError:
        number = None
    if number is not None:
        return format(number, "g")
    if text in ("", "null", "none", "n/a"):
        return None
    return {"true": "yes", "false": "no"}.get(text, text)


def _exact(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True)


def load_gold(path: Path, column: str | None, fields: list[str] | None, id_column: str | None) -> pl.DataFrame:
    """The gold as a frame: `key` (row position or id) and `gold` (a dict of fields per row)."""
    frame = scan_input(path)
    names = frame.collect_schema().names()
    wanted = fields or [column or "mr"]
    missing = [c for c in [*wanted, *([id_column] if id_column else [])] if c not in names]
    if missing:
        raise InputError(f"gold file {path} has no column {missing[0]!r}; its columns: {', '.join(names)}")
    df = frame.select(([pl.col(id_column).alias("__id")] if id_column else []) + wanted).collect()
    gold = []
    if fields:
        gold = df.select(fields).to_dicts()
    else:
        for i, value in enumerate(df[wanted[0]].to_list()):
            gold.append(_gold_value(value, path, wanted[0], i))
    keys = df["__id"].to_list() if id_column else list(range(df.height))
    return pl.DataFrame({"key": keys, "gold": [json.dumps(g, ensure_ascii=False) for g in gold]})


def _gold_value(value: Any, path: Path, column: str, index: int) -> dict:
    if isinstance(value, dict):
        return value
    if value is None:
        return {}
    text = str(value).strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise InputError(f"gold file {path}, row {index}, column {column!r}: not valid JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise InputError(f"gold file {path}, row {index}, column {column!r}: a JSON object is needed")
        return parsed
    return parse_e2e_mr(text)


def read_results(out: Path) -> tuple[pl.DataFrame, list[str]]:
    results_path = out / "results.parquet"
    if not results_path.exists():
        raise InputError(f"{out} has no results.parquet; run python -m flows.extract (or flows.eval baseline) first")
    results = pl.read_parquet(results_path)
    if "extracted" not in results.columns:
        raise InputError(f"{results_path} has no `extracted` column: it is not an extraction output")
    return results, [f.name for f in results.schema["extracted"].fields]


def score_extraction(results: pl.DataFrame, gold: pl.DataFrame, fields: list[str], by_id: bool) -> pl.DataFrame:
    """One row per result row: per field the gold, the prediction, exact and normalized match."""
    lookup = dict(zip(gold["key"].to_list(), gold["gold"].to_list()))
    rows = []
    for record in results.select("row", "id", "status", "extracted").to_dicts():
        key = record["id"] if by_id else record["row"]
        if key not in lookup:
            raise InputError(f"the gold has no row for result {'id' if by_id else 'row'} {key!r}")
        expected = json.loads(lookup[key])
        got = (record["extracted"] or {}) if record["status"] == "ok" else {}
        ok = record["status"] == "ok"
        out = {"row": record["row"], "id": str(record["id"]), "status": record["status"]}
        for f in fields:
            g, p = expected.get(f), got.get(f)
            out[f"{f}.gold"] = None if g is None else str(g)
            out[f"{f}.pred"] = None if p is None else str(p)
            out[f"{f}.exact"] = ok and _exact(g) == _exact(p)
            out[f"{f}.norm"] = ok and normalize(g) == normalize(p)
        rows.append(out)
    return pl.DataFrame(rows)


def summarize_scores(scores: pl.DataFrame, fields: list[str]) -> pl.DataFrame:
    """Per field: exact and normalized accuracy, accuracy where the gold has a value; then overall."""
    out = []
    for f in fields:
        present = scores.filter(pl.col(f"{f}.gold").is_not_null())
        out.append({"metric": f, "exact": scores[f"{f}.exact"].mean(), "normalized": scores[f"{f}.norm"].mean(),
                    "present": present[f"{f}.norm"].mean() if present.height else None, "rows": scores.height})
    norm = pl.concat_list([pl.col(f"{f}.norm") for f in fields])
    all_norm = scores.select(norm.list.eval(pl.element().cast(pl.Int64)).list.sum().alias("n"))["n"].sum()
    present_cells = sum(scores[f"{f}.gold"].is_not_null().sum() for f in fields)
    present_right = sum((scores[f"{f}.gold"].is_not_null() & scores[f"{f}.norm"]).sum() for f in fields)
    exact_cells = sum(scores[f"{f}.exact"].sum() for f in fields)
    cells = max(scores.height * len(fields), 1)
    out.append({"metric": "field_accuracy", "exact": exact_cells / cells, "normalized": all_norm / cells,
                "present": present_right / max(present_cells, 1), "rows": scores.height})
    out.append({"metric": "all_fields_right", "exact": scores.select(pl.all_horizontal(
        [pl.col(f"{f}.exact") for f in fields]))[:, 0].mean(), "normalized": scores.select(pl.all_horizontal(
        [pl.col(f"{f}.norm") for f in fields]))[:, 0].mean(), "present": None, "rows": scores.height})
    out.append({"metric": "valid_rows", "exact": (scores["status"] == "ok").mean(),
                "normalized": (scores["status"] == "ok").mean(), "present": None, "rows": scores.height})
    return pl.DataFrame(out, schema={"metric": pl.String, "exact": pl.Float64, "normalized": pl.Float64,
                                     "present": pl.Float64, "rows": pl.Int64})


def enum_fields(gold: pl.DataFrame, fields: list[str]) -> list[str]:
    """The fields whose values over the whole gold file are few (at most ENUM_MAX_VALUES)."""
    values: dict[str, set] = {f: set() for f in fields}
    for text in gold["gold"].to_list():
        record = json.loads(text)
        for f in fields:
            values[f].add(normalize(record.get(f)))
    return [f for f in fields if len(values[f] - {None}) <= ENUM_MAX_VALUES]


def confusion(scores: pl.DataFrame, fields: list[str]) -> pl.DataFrame:
    """Counts of (gold, predicted) normalized values for `fields` (see enum_fields)."""
    frames = []
    for f in fields:
        gold = scores[f"{f}.gold"].map_elements(normalize, return_dtype=pl.String)
        pred = scores[f"{f}.pred"].map_elements(normalize, return_dtype=pl.String)
        frame = pl.DataFrame({"gold": gold.fill_null("(null)"), "predicted": pred.fill_null("(null)")})
        frames.append(frame.group_by("gold", "predicted").len("count").with_columns(field=pl.lit(f))
                      .select("field", "gold", "predicted", "count").sort("field", "gold", "count",
                                                                           descending=[False, False, True]))
    schema = {"field": pl.String, "gold": pl.String, "predicted": pl.String, "count": pl.UInt32}
    return pl.concat(frames) if frames else pl.DataFrame(schema=schema)


def evaluate_extract(out: Path, gold_path: Path, gold_column: str | None = "mr", gold_fields: list[str] | None = None,
                     gold_id: str | None = None) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(per-row scores, summary, confusion) of OUT's results against the gold."""
    results, fields = read_results(out)
    gold = load_gold(gold_path, gold_column, gold_fields, gold_id)
    scores = score_extraction(results, gold, fields, by_id=gold_id is not None)
    return scores, summarize_scores(scores, fields), confusion(scores, enum_fields(gold, fields))


def side_by_side(summaries: dict[str, pl.DataFrame], column: str = "normalized") -> pl.DataFrame:
    """One row per metric, one column per output folder (the `column` score)."""
    names = list(summaries)
    table = summaries[names[0]].select("metric", pl.col(column).alias(names[0]))
    for name in names[1:]:
        table = table.join(summaries[name].select("metric", pl.col(column).alias(name)), on="metric",
                           how="full", coalesce=True, maintain_order="left")
    if len(names) == 2:
        table = table.with_columns((pl.col(names[1]) / pl.col(names[0])).alias("ratio"))
    return table
