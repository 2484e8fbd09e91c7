"""Texts longer than the context: cut into parts, summarized, combined (map-reduce)."""

from __future__ import annotations

import re

import polars as pl
import pytest

from tests.conftest import run_echo, scitldr_rows
from tokenmill.models.base import Completion
from tokenmill.models.gguf_info import ModelInfo
from tokenmill.models.resolve import default_model_path
from tokenmill.tasks.plans import MapReduce
from tokenmill.tasks.split import split_to_fit


@pytest.fixture(scope="module")
def info() -> ModelInfo:
    return ModelInfo(default_model_path())


def _words(text: str) -> list[str]:
    return text.split()


# -- cutting text ------------------------------------------------------------------------------


def test_parts_fit_keep_every_word_in_order_and_prefer_paragraphs(info):
    paragraphs = [r["text"] for r in scitldr_rows(30)]
    doc = "\n\n".join(paragraphs)
    parts = split_to_fit(doc, info.count_text_tokens, 600)
    assert len(parts) > 1
    assert all(info.count_text_tokens(p) <= 600 + 8 for p in parts)  # per-unit sums: a few tokens of slack
    assert _words(" ".join(parts)) == _words(doc)
    # no abstract is that long, so every cut falls between paragraphs
    starts = {p[:60] for p in paragraphs}
    assert all(part[:60] in starts for part in parts)


def test_a_paragraph_too_long_is_cut_at_sentence_ends_then_words_then_characters(info):
    sentences = [s for r in scitldr_rows(5) for s in re.split(r"(?<=\.)\s+", r["text"])]
    paragraph = " ".join(sentences)
    parts = split_to_fit(paragraph, info.count_text_tokens, 120)
    assert len(parts) > 2 and _words(" ".join(parts)) == _words(paragraph)
    assert all(p.rstrip().endswith(".") for p in parts[:-1])  # cut after a sentence
    one_sentence = " ".join(["word"] * 500)
    assert all(info.count_text_tokens(p) <= 50 for p in split_to_fit(one_sentence, info.count_text_tokens, 50))
    no_spaces = "x" * 5000
    parts = split_to_fit(no_spaces, info.count_text_tokens, 50)
    assert "".join(parts) == no_spaces and all(info.count_text_tokens(p) <= 50 for p in parts)


# -- combining: the plan's bookkeeping (orchestration only; the real model runs below) ---------


def _done(index: int, text: str | None, error: str | None = None) -> Completion:
    return Completion(index, text, "error" if error else "stop", error=error, prompt_tokens=100 + index,
                      completion_tokens=10, prompt_ms=5.0, decode_ms=7.0)


def test_map_reduce_combines_level_by_level_and_sums_usage():
    # a combining prompt fits at most 3 summaries: 7 parts -> groups of 3,3,1 -> 3 -> 1 summary
    plan = MapReduce([f"part {i}" for i in range(7)], lambda group: "|".join(group), lambda p: p.count("|") < 3)
    calls = plan.start()
    assert [c.prompt for c in calls] == [f"part {i}" for i in range(7)]
    outcome = None
    for slot in reversed(range(7)):  # completions arrive in any order
        outcome = plan.feed(slot, _done(slot, f"s{slot}"))
    assert [c.prompt for c in outcome] == ["s0|s1|s2", "s3|s4|s5"]  # s6 goes up alone
    assert plan.feed(1, _done(8, "t1")) == []
    final_call = plan.feed(0, _done(7, "t0"))
    assert [c.prompt for c in final_call] == ["t0|t1|s6"]
    result = plan.feed(0, _done(9, " the summary "))
    assert isinstance(result, Completion) and result.text == " the summary " and result.finish_reason == "stop"
    assert (plan.chunks, plan.calls) == (7, 10)
    assert result.prompt_tokens == sum(100 + i for i in range(10)) and result.completion_tokens == 100
    assert result.prompt_ms == 50.0 and result.decode_ms == 70.0


def test_a_failed_part_fails_the_row_naming_the_part():
    plan = MapReduce(["a", "b", "c"], lambda group: "|".join(group), lambda p: True)
    plan.start()
    assert plan.feed(0, _done(0, "s0")) == []
    result = plan.feed(1, _done(1, None, error="the model worker died"))
    assert result.finish_reason == "error" and result.error == "part 2 of 3: the model worker died"


def test_summaries_that_cannot_be_combined_fail_clearly():
    plan = MapReduce(["a", "b"], lambda group: "|".join(group), lambda p: "|" not in p)
    plan.start()
    plan.feed(0, _done(0, "s0"))
    result = plan.feed(1, _done(1, "s1"))
    assert result.finish_reason == "error" and "--n-ctx" in result.error


# -- end to end on the real model ------------------------------------------------------------


N_CTX = 240  # a small context, so that a short document (about 430 tokens, 3 abstracts) already needs 3 parts


@pytest.fixture(scope="module")
def long_input(tmp_path_factory, info):
    """Consecutive SciTLDR abstracts, just over 1.75 contexts of --n-ctx N_CTX (3 parts), between two
    ordinary rows (one-sentence SciTLDR summaries, which fit one prompt at this context)."""
    rows = scitldr_rows(60)
    paragraphs = []
    for r in rows[2:]:
        paragraphs.append(r["text"])
        if info.count_text_tokens("\n\n".join(paragraphs)) > 1.75 * N_CTX:
            break
    doc = "\n\n".join(paragraphs)
    path = tmp_path_factory.mktemp("long") / "long.parquet"
    pl.DataFrame({"name": ["short-1", "long", "short-2"], "text": [rows[0]["reference"], doc, rows[1]["reference"]]}
                 ).write_parquet(path)
    return path, info.count_text_tokens(doc)


@pytest.fixture(scope="module")
def long_run(run_flow, long_input, tmp_path_factory):
    path, _ = long_input
    out = tmp_path_factory.mktemp("long-out") / "out"
    result = run_flow("summarize", str(path), "--n-ctx", str(N_CTX), "--max-tokens", "32", "--id-column", "name",
                      "--out", str(out), "--no-cache", timeout=1500)
    return result, out


def test_a_text_of_almost_two_contexts_summarizes_in_three_parts_then_combines(long_run, long_input):
    result, out = long_run
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(out / "results.parquet")
    assert df["id"].to_list() == ["short-1", "long", "short-2"]
    assert df["status"].to_list() == ["ok"] * 3
    long = df.row(1, named=True)
    _, doc_tokens = long_input
    assert doc_tokens > 1.75 * N_CTX  # the premise: the text is well beyond one prompt at this context
    assert long["chunks"] >= 3 > doc_tokens // N_CTX  # more parts than whole contexts: each prompt holds the template too
    assert long["calls"] > long["chunks"]  # the parts, then at least one combining call
    assert long["summary"].strip()
    assert long["prompt_tokens"] > doc_tokens  # every part's text was read (plus templates and combining)
    assert df["chunks"].to_list()[::2] == [1, 1] and df["calls"].to_list()[::2] == [1, 1]


def test_long_document_usage_is_the_sum_over_every_call(long_run):
    _, out = long_run
    df = pl.read_parquet(out / "results.parquet")
    usage = pl.read_parquet(out / "usage.parquet").row(0, named=True)
    # usage.parquet counts each model call as the worker reported it; the rows hold the sums
    assert usage["prompt_tokens"] == df["prompt_tokens"].sum()
    assert usage["completion_tokens"] == df["completion_tokens"].sum()
    assert usage["calls"] == df["calls"].sum()
    assert usage["rows_generated"] == 3


# Rows refused before any generation: the zero-cost backend, in this process.


def test_without_splitting_a_long_row_fails_alone(long_input, tmp_path):
    path, _ = long_input
    out = tmp_path / "o"
    stats = run_echo("summarize", path, out, n_ctx=N_CTX, max_tokens=16, split_long=False)
    assert stats.rows_error == 1 and stats.calls == 2
    df = pl.read_parquet(out / "results.parquet")
    assert df["status"].to_list() == ["ok", "error", "ok"]
    error = df["error"][1]
    assert f"--n-ctx {N_CTX}" in error and "tokens" in error and "--split-long" in error


def test_too_many_parts_fail_alone_naming_max_chunks(long_input, tmp_path):
    path, _ = long_input
    out = tmp_path / "o"
    stats = run_echo("summarize", path, out, n_ctx=N_CTX, max_tokens=16, max_chunks=2)
    assert stats.rows_error == 1 and stats.calls == 2
    df = pl.read_parquet(out / "results.parquet")
    assert df["status"].to_list() == ["ok", "error", "ok"]
    assert "--max-chunks 2" in df["error"][1]
