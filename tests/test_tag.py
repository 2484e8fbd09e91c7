"""flows.tag on real E2E rows: replies constrained to the labels, confidence from token probabilities."""

from __future__ import annotations

import polars as pl
import pytest

from tests.conftest import DATASETS
from tokenmill.evaluate import parse_e2e_mr
from tokenmill.tasks.tag import LabelParser, label_grammar, load_labels

LABELS = ["restaurant", "pub", "coffee shop"]


@pytest.fixture(scope="module")
def eat_rows(tmp_path_factory):
    """The first 24 E2E dev rows whose gold has an eatType, with that gold."""
    path = DATASETS / "e2e" / "dev.csv"
    if not path.exists():
        pytest.skip(f"shared dataset missing: {path}")
    df = pl.read_csv(path).with_columns(
        eatType=pl.col("mr").map_elements(lambda mr: parse_e2e_mr(mr).get("eatType"), return_dtype=pl.String))
    df = df.filter(pl.col("eatType").is_not_null()).unique(subset=["mr"], keep="first", maintain_order=True).head(24)
    out = tmp_path_factory.mktemp("tag") / "eat.parquet"
    df.select("ref", "eatType").write_parquet(out)
    return out


def test_labels_from_names_files_and_specs_are_checked(tmp_path):
    assert [lab["name"] for lab in load_labels("a, b ,c")] == ["a", "b", "c"]
    spec = tmp_path / "labels.yaml"
    spec.write_text("labels:\n  pub: serves drinks\n  restaurant: serves meals\n")
    assert load_labels(str(spec))[0] == {"name": "pub", "description": "serves drinks"}
    from tokenmill.errors import InputError

    for bad, needle in [("a", "at least two"), ("a,a", "twice"), ("a,,b", "non-empty")]:
        with pytest.raises(InputError, match=needle):
            load_labels(bad)
    assert LabelParser(LABELS, True)("pub, pub, restaurant") == ["pub", "restaurant"]
    with pytest.raises(ValueError, match="not one of"):
        LabelParser(LABELS, False)("bar")
    assert '"coffee shop"' in label_grammar(LABELS, False)


@pytest.fixture(scope="module")
def tagged(run_flow, eat_rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("tagout") / "out"
    result = run_flow("tag", str(eat_rows), "--column", "ref", "--labels", ",".join(LABELS), "--out", str(out),
                      "--no-cache")
    return result, out


def test_every_row_gets_one_of_the_labels_with_a_confidence(tagged):
    result, out = tagged
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(out / "results.parquet")
    assert df.height == 24 and (df["status"] == "ok").all()
    assert set(df["label"].to_list()) <= set(LABELS)
    conf = df["confidence"]
    assert conf.is_not_null().all() and (conf > 0).all() and (conf <= 1.0 + 1e-9).all()
    assert conf.n_unique() > 1  # the model's own probabilities, not a constant


def test_tagging_eattype_beats_a_random_label(tagged, eat_rows):
    _result, out = tagged
    df = pl.read_parquet(out / "results.parquet")
    gold = pl.read_parquet(eat_rows)["eatType"]
    right = (df["label"] == gold)
    majority = gold.value_counts()["count"].max() / gold.len()
    print(f"eatType accuracy {right.mean():.3f} (always the commonest label: {majority:.3f})")
    # measured with SmolLM2-135M: 0.417 on these 24 rows, below always answering the commonest label (0.792);
    # it never answers "pub". The test holds it above a uniform random choice among the three labels.
    assert right.mean() > 1 / len(LABELS)
    # (Measured: mean confidence 0.387 on right labels against 0.392 on wrong ones, all between 0.30 and
    # 0.47: SmolLM2-135M is close to uniform over the three labels, so no ordering is asserted.)


def test_multi_gives_lists_of_distinct_labels(run_flow, eat_rows, tmp_path):
    out = tmp_path / "multi"
    result = run_flow("tag", str(eat_rows), "--column", "ref", "--labels", ",".join(LABELS), "--multi", "--limit",
                      "3", "--out", str(out), "--no-cache")
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(out / "results.parquet")
    assert df.schema["label"] == pl.List(pl.String) and df.height == 3
    for labels in df["label"].to_list():
        assert labels and set(labels) <= set(LABELS) and len(labels) == len(set(labels))


def test_labels_with_descriptions_from_a_job_spec_reach_the_prompt(tmp_path, eat_rows):
    import subprocess
    import sys

    from tests.conftest import REPO

    spec = tmp_path / "tag.yaml"
    spec.write_text(f"task: tag\ninput: {eat_rows}\ncolumn: ref\nlabels:\n  restaurant: serves meals\n"
                    "  pub: serves drinks\n  coffee shop: serves coffee\n")
    done = subprocess.run([sys.executable, "-m", "flows.run", str(spec), "--show-prompt"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "- pub: serves drinks" in done.stdout and "Text: " in done.stdout
