"""flows.summarize end to end: real model, real Prefect server, real files."""

from __future__ import annotations

import json

import polars as pl
import pytest
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from tests.conftest import REPO, run_echo
from tokenmill.models.resolve import default_model_path


@pytest.fixture(scope="module")
def summarized(summarized_scitldr10):
    """10 SciTLDR abstracts, generated (the run is shared with test_model_stores, see conftest)."""
    return summarized_scitldr10


def _reference_prompt(text: str) -> str:
    """The prompt rebuilt independently: plain Jinja for the task, llama-cpp-python's chat formatter."""
    import jinja2

    task = jinja2.Template((REPO / "prompts/summarize/smollm.j2").read_text()).render(text=text, max_words=40)
    llm = Llama(str(default_model_path()), vocab_only=True, verbose=False)
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
                                    bos_token="<|im_start|>")
    return formatter(messages=[{"role": "user", "content": task.strip()}]).prompt


def test_summarize_scitldr_gives_ok_rows_with_summaries(summarized):
    result, out = summarized
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(out / "results.parquet")
    assert df.height == 10
    assert df["status"].to_list() == ["ok"] * 10
    assert all(s and s.strip() for s in df["summary"].to_list())
    assert df["id"].to_list() == list(range(10))
    assert df["row_key"].n_unique() == 10
    assert (df["completion_tokens"] > 0).all() and (df["latency_ms"] > 0).all()
    summary_line = result.stderr.strip().splitlines()[-1]
    assert "10 rows" in summary_line and str(out) in summary_line and "tokens/s" in summary_line


def test_prompt_tokens_match_the_model_tokenizer(summarized, scitldr_parquet):
    _, out = summarized
    df = pl.read_parquet(out / "results.parquet")
    texts = pl.read_parquet(scitldr_parquet)["text"].to_list()
    llm = Llama(str(default_model_path()), vocab_only=True, verbose=False)
    expected = [len(llm.tokenize(_reference_prompt(t).encode(), add_bos=True, special=True)) for t in texts]
    assert df["prompt_tokens"].to_list() == expected


def test_usage_totals_equal_the_sums_over_rows(summarized):
    _, out = summarized
    rows = pl.read_parquet(out / "results.parquet")
    usage = pl.read_parquet(out / "usage.parquet")
    assert usage.height == 1
    run = usage.row(0, named=True)
    assert run["rows_total"] == 10 and run["rows_ok"] == 10 and run["rows_error"] == 0
    assert run["prompt_tokens"] == rows["prompt_tokens"].sum()
    assert run["completion_tokens"] == rows["completion_tokens"].sum()
    assert run["tokens_per_s"] == pytest.approx((run["prompt_tokens"] + run["completion_tokens"]) / run["wall_s"])
    assert run["model_sha256"] and len(run["model_sha256"]) == 64
    assert run["device"].startswith(("cpu", "gpu"))
    assert run["prefill_tokens_per_s"] > 0 and run["decode_tokens_per_s"] > 0  # per phase, from the engine
    assert run["ended_at"] > run["started_at"]


def test_flow_run_is_recorded_in_prefect(summarized, prefect_server):
    import urllib.request

    _, out = summarized
    run_id = pl.read_parquet(out / "usage.parquet")["run_id"][0]
    with urllib.request.urlopen(f"{prefect_server['url']}/flow_runs/{run_id}") as response:
        flow_run = json.load(response)
    assert flow_run["state_type"] == "COMPLETED"


def test_csv_and_jsonl_give_the_same_results_as_parquet(scitldr_parquet, tmp_path):
    """Each format is read and generated afresh (no shared cache), on the echo backend: its reply
    is derived from the whole prompt, so any difference in what was read changes it."""
    df = pl.read_parquet(scitldr_parquet).head(4)
    outputs = {}
    for ext, write in [("parquet", df.write_parquet), ("csv", df.write_csv), ("jsonl", df.write_ndjson)]:
        path = tmp_path / f"in.{ext}"
        write(path)
        stats = run_echo("summarize", path, tmp_path / f"out-{ext}", max_tokens=24)
        assert stats.rows_generated == 4 and stats.rows_ok == 4
        outputs[ext] = pl.read_parquet(tmp_path / f"out-{ext}" / "results.parquet").select(
            "id", "row_key", "summary", "status", "prompt_tokens", "completion_tokens")
    assert outputs["parquet"]["row_key"].n_unique() == 4
    assert outputs["csv"].equals(outputs["parquet"])
    assert outputs["jsonl"].equals(outputs["parquet"])
