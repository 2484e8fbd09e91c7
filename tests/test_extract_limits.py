"""No runaway rows: string bounds from --max-tokens, a repeating string closed, one retry at the limit."""

from __future__ import annotations

import json

import polars as pl
import pytest

from tests.conftest import DATASETS, REPO
from tokenmill.models.base import Completion
from tokenmill.models.row_sampler import open_string, repeats
from tokenmill.schema import load_schema
from tokenmill.schema_budget import CHARS_PER_TOKEN, bound_strings
from tokenmill.tasks.plans import RETRY_REPEAT_PENALTY, RetryAtLimit

FIELDS = REPO / "jobs" / "e2e-fields.json"  # the peers' W2 schema: free strings, no maxLength


@pytest.fixture(scope="module")
def info():
    from tokenmill.models.gguf_info import ModelInfo
    from tokenmill.models.resolve import default_model_path

    return ModelInfo(default_model_path())


def test_free_strings_get_a_default_bound_that_fits_max_tokens(info):
    schema, _ = load_schema(str(FIELDS))
    bounded, budget = bound_strings(schema, 160, info.count_text_tokens)
    assert budget.defaulted == 5 and budget.fits, budget.describe()  # name, food, priceRange, customerRating, near
    lengths = [bounded["properties"][f]["anyOf"][0]["maxLength"] if "anyOf" in bounded["properties"][f]
               else bounded["properties"][f]["maxLength"] for f in ("name", "food", "near")]
    assert len(set(lengths)) == 1 and lengths[0] == budget.default_length >= 16
    assert budget.skeleton_tokens + budget.default_length * 5 / CHARS_PER_TOKEN <= 160
    assert all("maxLength" not in node for node in schema["properties"].values())  # the schema itself is unchanged
    # fewer tokens, shorter strings; more tokens, longer
    assert bound_strings(schema, 100, info.count_text_tokens)[1].default_length < budget.default_length
    assert bound_strings(schema, 400, info.count_text_tokens)[1].default_length > budget.default_length


def test_a_given_maxlength_is_honoured_and_counted(info):
    schema, _ = load_schema(str(REPO / "jobs" / "restaurants.yaml"))  # name and near: maxLength 40
    bounded, budget = bound_strings(schema, 160, info.count_text_tokens)
    assert budget.defaulted == 0 and budget.bounded_tokens == 40 and budget.fits
    assert bounded["properties"]["name"]["anyOf"][0]["maxLength"] == 40


def test_grammars_keep_raw_control_characters_out_of_strings(info):
    from tokenmill.schema import grammar
    from tokenmill.tasks.extract import bounded_grammar

    schema, _ = load_schema(str(FIELDS))
    for text in (grammar(schema), bounded_grammar(schema, 160, info.count_text_tokens)):
        [char] = [line for line in text.splitlines() if line.startswith("char ::=")]
        assert char.startswith('char ::= [^"\\\\\\x00-\\x1F] | "\\\\" ('), char  # newline only as \\n


def test_repetition_is_found_inside_an_open_string_only():
    assert repeats(b"Alimentum one of the one of the one of the")
    assert repeats(b"!!!!!!!!!!!!") and not repeats(b"!!!!")
    assert not repeats(b"The Golden Curry") and not repeats(b"Blue Spice") and not repeats(b"riverside")
    assert open_string(b'{"name": "one of') == b"one of"
    assert open_string(b'{"name": "x", ') == b""
    assert open_string(b'{"name": "a \\" b') == b'a \\" b'  # an escaped quote does not end the string


def test_a_row_at_the_limit_with_open_json_is_tried_once_more_with_repetition_penalised():
    def check(text):
        try:
            json.loads(text)
        except ValueError as exc:
            return str(exc)
        return None

    plan = RetryAtLimit("prompt", "root ::= ...", check)
    again = plan.feed(0, Completion(0, '{"name": "one of the one of', "length", prompt_tokens=10, completion_tokens=8))
    assert len(again) == 1 and again[0].repeat_penalty == RETRY_REPEAT_PENALTY and again[0].grammar == "root ::= ..."
    done = plan.feed(0, Completion(1, '{"name": "one of the', "length", prompt_tokens=10, completion_tokens=8))
    assert done.text == '{"name": "one of the' and plan.calls == 2 and done.completion_tokens == 16  # kept, counted
    fine = RetryAtLimit("prompt", "g", check)
    assert fine.feed(0, Completion(0, '{"a": 1}', "length")).text == '{"a": 1}' and fine.calls == 1  # valid: no retry
    stopped = RetryAtLimit("prompt", "g", check)
    assert stopped.feed(0, Completion(0, '{"a', "stop")).text == '{"a'  # not the token limit: no retry


def test_the_engine_closes_a_string_that_repeats_a_phrase():
    """A prompt that makes SmolLM2 loop inside a JSON string: the engine ends the string, the reply parses."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from tokenmill.models.base import GenerationRequest, ModelSettings
    from tokenmill.models.llama_batched import LlamaBatchedBackend
    from tokenmill.models.resolve import default_model_path

    grammar = json_schema_to_gbnf(json.dumps({"type": "object", "properties": {"note": {"type": "string"}},
                                              "required": ["note"]}))
    prompt = ("<|im_start|>user\nCopy the text into the note field as JSON.\n\nText: one of the one of the one of "
              "the one of the one of the one of the one of the one of the<|im_end|>\n<|im_start|>assistant\n")
    engine = LlamaBatchedBackend(ModelSettings(model_path=str(default_model_path()), n_ctx=2048, n_seq=1))
    try:
        [done] = list(engine.generate([GenerationRequest(0, prompt, max_tokens=120, grammar=grammar)]))
        stopped = engine.stats.get("repeats_stopped", 0)
    finally:
        engine.close()
    assert done.finish_reason == "stop" and done.completion_tokens < 120, done
    assert stopped >= 1
    assert json.loads(done.text)["note"].count("one of the") <= 4


def test_real_rows_with_a_tight_budget_all_end_valid_e2e(run_flow, tmp_path):
    """The peers' W2 schema (no maxLength anywhere) with a tight --max-tokens on real E2E rows: every
    row ends schema-valid. (The issue's 200-row, --max-tokens 160 figure is measured in the README.)"""
    e2e = DATASETS / "e2e" / "dev.csv"
    if not e2e.exists():
        pytest.skip(f"shared dataset missing: {e2e}")
    out = tmp_path / "out"
    result = run_flow("extract", str(e2e), "--column", "ref", "--schema", str(FIELDS), "--limit", "6",
                      "--max-tokens", "96", "--out", str(out), "--no-cache")
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(out / "results.parquet")
    assert df["status"].to_list() == ["ok"] * 6, df.filter(pl.col("status") != "ok").select("raw_output", "error")
    assert (df["completion_tokens"] <= 96 * df["calls"]).all()
