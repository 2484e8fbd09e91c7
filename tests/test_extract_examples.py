"""Few-shot `--examples`: checked against the schema, rendered before the text, shared as a prompt prefix."""

from __future__ import annotations

import json

import polars as pl
import pytest

from tests.conftest import DATASETS, REPO
from tokenmill.errors import InputError
from tokenmill.examples import load_examples
from tokenmill.schema import load_schema

SPEC = REPO / "jobs" / "restaurants.yaml"
EXAMPLES = REPO / "jobs" / "restaurants-examples.yaml"


def test_examples_load_in_schema_order_and_bad_ones_name_the_example(tmp_path):
    schema, _ = load_schema(str(SPEC))
    examples = load_examples(str(EXAMPLES), schema)
    assert len(examples) == 4 and list(json.loads(examples[0]["json"])) == list(schema["properties"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "output": {"name": "A"}}) + "\n"
                   + json.dumps({"text": "y", "output": {"name": 5}}) + "\n")
    with pytest.raises(InputError, match=r"example 1: output does not fit the schema"):
        load_examples(str(bad), schema)  # example 1 lacks the required fields
    bad.write_text(json.dumps({"text": "y", "output": {}, "extra": 1}) + "\n")
    with pytest.raises(InputError, match="example 1: give exactly the keys text and output"):
        load_examples(str(bad), schema)


def test_examples_sit_in_the_prompt_before_the_text(run_cli_here, tmp_path, capsys):
    e2e = DATASETS / "e2e" / "dev.csv"
    if not e2e.exists():
        pytest.skip(f"shared dataset missing: {e2e}")
    result = run_cli_here("extract", str(e2e), "--column", "ref", "--schema", str(SPEC), "--examples", str(EXAMPLES),
                          "--show-prompt")
    assert result.returncode == 0, result.stderr
    prompt = result.stdout
    assert prompt.index("Maple House") < prompt.index("Alimentum")  # the last example, then the row's text


def test_inline_examples_in_a_job_spec_become_the_examples_option(tmp_path):
    from tokenmill.jobspec import load_job_spec

    spec = tmp_path / "job.yaml"
    spec.write_text(f"task: extract\ninput: {DATASETS / 'e2e' / 'dev.csv'}\ncolumn: ref\nschema: {SPEC}\n"
                    "examples:\n  - text: Cotto is a pub.\n    output: {name: Cotto, eatType: pub, food: null, "
                    "priceRange: null, customerRating: null, area: null, familyFriendly: null, near: null}\n")
    loaded = load_job_spec(spec)
    argv = loaded.argv()
    assert argv[argv.index("--examples") + 1] == str(spec)
    schema, _ = load_schema(str(SPEC))
    assert json.loads(load_examples(str(spec), schema)[0]["json"])["name"] == "Cotto"


def test_examples_are_evaluated_once_as_the_shared_prefix(run_flow, tmp_path):
    """Real model, 3 rows: every row after the first reuses the prefix holding the examples."""
    e2e = DATASETS / "e2e" / "dev.csv"
    if not e2e.exists():
        pytest.skip(f"shared dataset missing: {e2e}")
    from tokenmill.models.gguf_info import ModelInfo
    from tokenmill.models.resolve import default_model_path

    schema, _ = load_schema(str(SPEC))
    example_tokens = sum(ModelInfo(default_model_path()).count_text_tokens(e["text"] + e["json"])
                         for e in load_examples(str(EXAMPLES), schema))
    out = tmp_path / "out"
    result = run_flow("extract", str(e2e), "--column", "ref", "--schema", str(SPEC), "--examples", str(EXAMPLES),
                      "--limit", "3", "--out", str(out), "--no-cache")
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(out / "results.parquet")
    assert df.height == 3 and (df["status"] == "ok").all()
    assert (df["prompt_tokens"] > example_tokens).all()
    assert (df["cached_tokens"] >= example_tokens).sum() >= 2, df.select("prompt_tokens", "cached_tokens")
