"""flows.eval: extract scoring in its general form, ROUGE for summaries, the direct-call baseline."""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest

from tests.conftest import DATASETS, REPO, scitldr_rows
from tokenmill.evaluate import evaluate_extract, normalize

FIELDS = {"name": pl.String, "rating": pl.String, "price": pl.Float64, "kids": pl.Boolean}


def _results(folder, rows, id_dtype=pl.String):
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame([{"row": i, "id": r[0], "status": r[1], "extracted": r[2]} for i, r in enumerate(rows)],
                 schema={"row": pl.Int64, "id": id_dtype, "status": pl.String,
                         "extracted": pl.Struct(FIELDS)}).write_parquet(folder / "results.parquet")
    return folder


def _eval(*args):
    return subprocess.run([sys.executable, "-m", "flows.eval", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_normalized_match_ignores_case_spacing_number_format_and_yes_no():
    assert normalize("  The  Vaults. ") == normalize("the vaults")
    assert normalize("5") == normalize(5.0) == normalize("5.00")
    assert normalize(True) == normalize("yes") and normalize("false") == normalize(False)
    assert normalize("null") is None and normalize("") is None
    assert normalize("5 out of 5") != normalize("5")


def test_gold_as_jsonl_keyed_by_id_exact_normalized_and_confusion(tmp_path):
    gold = tmp_path / "gold.jsonl"
    gold.write_text("\n".join(json.dumps(r) for r in [
        {"key": "b", "fields": {"name": "Blue Spice", "rating": "high", "price": 20, "kids": True}},
        {"key": "a", "fields": {"name": "The Vaults", "rating": "low", "price": None, "kids": False}},
        {"key": "c", "fields": {"name": "Zizzi", "rating": "high", "price": 30, "kids": None}},
    ]) + "\n")
    out = _results(tmp_path / "out", [
        ("a", "ok", {"name": "the vaults", "rating": "low", "price": None, "kids": False}),  # case only
        ("b", "ok", {"name": "Blue Spice", "rating": "low", "price": 20.0, "kids": True}),  # rating wrong
        ("c", "error", None),  # an error row counts as wrong
    ])
    scores, summary, confusion = evaluate_extract(out, gold, "fields", None, "key")
    by = {r["metric"]: r for r in summary.to_dicts()}
    assert by["name"]["exact"] == pytest.approx(1 / 3) and by["name"]["normalized"] == pytest.approx(2 / 3)
    assert by["price"]["exact"] == pytest.approx(1 / 3)  # 20 vs 20.0 differ as JSON
    assert by["price"]["normalized"] == pytest.approx(2 / 3)
    assert by["rating"]["normalized"] == pytest.approx(1 / 3)
    assert by["field_accuracy"]["normalized"] == pytest.approx(7 / 12)
    assert by["valid_rows"]["normalized"] == pytest.approx(2 / 3)
    assert scores.filter(pl.col("id") == "b")["rating.gold"][0] == "high"
    rating = confusion.filter(pl.col("field") == "rating")
    assert dict(zip(zip(rating["gold"], rating["predicted"]), rating["count"])) == {
        ("high", "low"): 1, ("low", "low"): 1, ("high", "(null)"): 1}


def test_gold_as_field_columns_by_position_and_two_folders_side_by_side(tmp_path):
    gold = tmp_path / "gold.csv"
    pl.DataFrame({"name": ["Cotto", "Strada"], "rating": ["5 out of 5", None], "price": [None, 12.5],
                  "kids": ["yes", "no"]}).write_csv(gold)
    good = _results(tmp_path / "good", [("0", "ok", {"name": "Cotto", "rating": "5 out of 5", "price": None,
                                                     "kids": True}),
                                        ("1", "ok", {"name": "Strada", "rating": None, "price": 12.5, "kids": False})])
    bad = _results(tmp_path / "bad", [("0", "ok", {"name": "Strada", "rating": None, "price": None, "kids": None}),
                                      ("1", "ok", {"name": None, "rating": None, "price": 1.0, "kids": None})])
    done = _eval("extract", good, bad, "--gold", gold, "--gold-fields", "name,rating,price,kids", "--confusion")
    assert done.returncode == 0, done.stderr
    assert "side by side" in done.stdout and "ratio" in done.stdout
    assert pl.read_parquet(good / "eval_summary.parquet").filter(
        pl.col("metric") == "field_accuracy")["normalized"][0] == 1.0
    assert pl.read_parquet(bad / "eval_summary.parquet").filter(
        pl.col("metric") == "field_accuracy")["normalized"][0] == pytest.approx(2 / 8)
    assert (good / "eval.parquet").exists() and (bad / "eval_confusion.parquet").exists()


def test_a_gold_column_missing_is_one_line_naming_it(tmp_path):
    gold = tmp_path / "gold.csv"
    pl.DataFrame({"x": [1]}).write_csv(gold)
    out = _results(tmp_path / "out", [("0", "ok", {"name": "A", "rating": None, "price": None, "kids": None})])
    done = _eval("extract", out, "--gold", gold, "--gold-column", "mr")
    assert done.returncode == 1 and "'mr'" in done.stderr and "Traceback" not in done.stderr


def test_rouge_best_reference_counts_and_errors_score_zero(tmp_path):
    rows = scitldr_rows(3)
    gold = tmp_path / "gold.jsonl"
    gold.write_text("\n".join(json.dumps({"pid": r["paper_id"], "target": ["unrelated words here", r["reference"]]})
                              for r in rows) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    pl.DataFrame({"row": [0, 1, 2], "id": [r["paper_id"] for r in rows], "status": ["ok", "ok", "error"],
                  "summary": [rows[0]["reference"], "completely different text about cooking", None]}
                 ).write_parquet(out / "results.parquet")
    done = _eval("summarize", out, "--gold", gold, "--ref-column", "target", "--gold-id", "pid")
    assert done.returncode == 0, done.stderr
    scores = pl.read_parquet(out / "eval.parquet")
    assert scores["rouge1"][0] == pytest.approx(1.0) and scores["rougeL"][0] == pytest.approx(1.0)
    assert 0 <= scores["rouge1"][1] < 0.3 and scores["rouge1"][2] == 0.0
    assert scores["references"].to_list() == [2, 2, 2]
    assert "rouge2" in done.stdout


def test_baseline_direct_call_writes_scoreable_results(tmp_path):
    """The direct-call baseline on 3 real E2E rows with the real model: valid rows, scored by eval."""
    e2e = DATASETS / "e2e" / "dev.csv"
    if not e2e.exists():
        pytest.skip(f"shared dataset missing: {e2e}")
    out = tmp_path / "base"
    done = _eval("baseline", e2e, "--column", "ref", "--schema", REPO / "jobs" / "restaurants.yaml", "--out", out,
                 "--limit", "3", "--max-tokens", "160")
    assert done.returncode == 0, done.stderr
    df = pl.read_parquet(out / "results.parquet")
    assert df.height == 3 and (df["status"] == "ok").sum() >= 2 and (df["prompt_tokens"] > 20).all()
    ok = df.filter(pl.col("status") == "ok")
    assert all(json.loads(raw)["name"] == ext["name"] for raw, ext in zip(ok["raw_output"], ok["extracted"]))
    _scores, summary, _ = evaluate_extract(out, e2e)
    assert summary.filter(pl.col("metric") == "name")["normalized"][0] >= 0.5  # "Alimentum" is in every text
