"""The zero-cost backend (`--backend echo`): replies at once, derived from the prompt; max_tokens,
stop strings and grammars honoured as the engines do. `echo-exact` counts with the model's real
tokenizer, `echo` estimates (4 bytes a token)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import jsonschema
import polars as pl
import pytest

from tests.conftest import REPO, scitldr_rows
from tokenmill.models.base import GenerationRequest, ModelSettings
from tokenmill.models.echo import EchoBackend, shortest_match
from tokenmill.models.gguf_info import ModelInfo
from tokenmill.models.resolve import default_model_path
from tokenmill.schema import Validator, grammar, load_schema

SPEC = REPO / "jobs" / "restaurants.yaml"


@pytest.fixture(scope="module")
def info() -> ModelInfo:
    return ModelInfo(default_model_path())


@pytest.fixture(scope="module")
def echo(info) -> EchoBackend:
    return EchoBackend(ModelSettings(model_path=str(default_model_path()), n_ctx=2048, backend="echo-exact"), info,
                       exact=True)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> list[str]:
    """Three SciTLDR abstracts rendered as a summarize job renders them."""
    from tokenmill.tasks.runner import JobConfig
    from tokenmill.tasks.summarize import prepare_summarize

    path = tmp_path_factory.mktemp("echo") / "in.parquet"
    pl.DataFrame(scitldr_rows(3)).write_parquet(path)
    job = prepare_summarize(JobConfig(input=str(path), backend="echo", cache=False), create_out=False)
    return [job.render(row) for row in pl.read_parquet(path).to_dicts()]


def _one(echo, prompt, **kw):
    return next(echo.generate([GenerationRequest(0, prompt, **kw)]))


def test_reply_is_derived_from_the_prompt_and_counted_by_the_real_tokenizer(echo, info, prompts):
    replies = [_one(echo, p, max_tokens=200) for p in prompts]
    again = [_one(echo, p, max_tokens=200) for p in prompts]
    assert [r.text for r in replies] == [r.text for r in again]  # deterministic
    assert len({r.text for r in replies}) == 3  # another prompt, another reply
    texts = [r["text"] for r in scitldr_rows(3)]
    for reply, prompt, text in zip(replies, prompts, texts):
        assert reply.finish_reason == "stop"
        assert reply.text.split()[1:4] == text.split()[:3]  # the row's text is the prompt's longest line
        assert reply.prompt_tokens == len(info.tokenize(prompt)) > 50
        assert reply.completion_tokens == info.count_text_tokens(reply.text) > 0


def test_max_tokens_truncates_with_finish_reason_length(echo, info, prompts):
    full = _one(echo, prompts[0], max_tokens=200)
    for limit in (1, 3, full.completion_tokens - 1):
        cut = _one(echo, prompts[0], max_tokens=limit)
        assert cut.finish_reason == "length" and full.text.startswith(cut.text)
        assert cut.completion_tokens == info.count_text_tokens(cut.text) <= limit
        assert cut.completion_tokens >= limit - 1  # the longest prefix that fits, not much less
    exact = _one(echo, prompts[0], max_tokens=full.completion_tokens)
    assert exact.finish_reason == "stop" and exact.text == full.text


def test_the_text_is_cut_at_the_first_stop_string(echo, prompts):
    full = _one(echo, prompts[1], max_tokens=200).text
    words = full.split()
    cut = _one(echo, prompts[1], max_tokens=200, stop=["\x00", words[3], words[2]])
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(words[2])]


def test_a_row_that_does_not_fit_the_context_is_an_error(echo, prompts):
    c = _one(echo, prompts[0], max_tokens=2040)
    assert c.finish_reason == "error" and c.text is None and "--n-ctx" in c.error and c.prompt_tokens > 0


def test_a_grammar_request_gets_the_shortest_schema_valid_json(echo, prompts):
    schema, _ = load_schema(str(SPEC))
    c = _one(echo, prompts[0], max_tokens=200, grammar=grammar(schema))
    assert c.finish_reason == "stop"
    value = json.loads(c.text)
    jsonschema.validate(value, schema)
    assert set(value) == set(schema["properties"])  # every field is required
    truncated = _one(echo, prompts[0], max_tokens=5, grammar=grammar(schema))
    assert truncated.finish_reason == "length" and c.text.startswith(truncated.text)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"n": {"type": "integer"}, "tags": {
        "type": "array", "items": {"type": "string", "minLength": 2}, "minItems": 2}}, "required": ["n", "tags"]},
    {"type": "object", "properties": {"kind": {"enum": ["alpha", "be"]}, "inner": {
        "type": "object", "properties": {"ok": {"type": "boolean"}, "x": {"type": "number"}}, "required": ["ok"]}},
     "required": ["kind", "inner"]},
    {"type": "object", "properties": {"maybe": {"type": ["string", "null"], "maxLength": 3}}},
])
def test_shortest_match_is_valid_for_each_schema_shape(schema):
    # (numeric bounds are left out: llama.cpp's converter does not put them in the grammar, so
    # neither a model nor echo is held to them; the validator makes such a row an error)
    text = shortest_match(grammar(schema))
    assert Validator(schema)(text) is not None, text


def test_gbnf_features_give_their_shortest_text():
    assert shortest_match('root ::= [a-c]{3,5} "x"') == "aaax"
    assert shortest_match('root ::= ("abc" | "d")+ [^d0-9]') == "da"
    assert shortest_match('root ::= item ("," item)*\nitem ::= [\\x41-\\x5A] "\\n"  # a comment\n') == "A\n"
    assert shortest_match('root ::= a\na ::= "(" a ")" | "q"') == "q"  # recursion settles on the finite option


def test_a_summarize_job_on_echo_runs_in_process_with_real_token_counts(tmp_path, info):
    from tokenmill.tasks.runner import JobConfig
    from tokenmill.tasks.summarize import prepare_summarize

    data = tmp_path / "in.parquet"
    pl.DataFrame(scitldr_rows(5)).write_parquet(data)
    job = prepare_summarize(JobConfig(input=str(data), out=str(tmp_path / "out"), backend="echo-exact",
                                      cache=False, max_tokens=12))
    stats = job.run(progress=False)
    assert not multiprocessing.active_children()  # no worker process was started
    df = pl.read_parquet(tmp_path / "out" / "results.parquet")
    assert df["status"].to_list() == ["ok"] * 5 and stats.rows_generated == 5
    prompts = [job.render(row) for row in pl.read_parquet(data).to_dicts()]
    assert df["prompt_tokens"].to_list() == [len(info.tokenize(p)) for p in prompts]
    assert (df["completion_tokens"] <= 12).all() and set(df["finish_reason"]) <= {"stop", "length"}
    usage = pl.read_parquet(tmp_path / "out" / "usage.parquet").row(0, named=True)
    assert usage["backend"] == "echo-exact" and usage["device"].startswith("none")
    assert json.loads(usage["params"])["runtime"] == "echo"  # its row keys never match a real model's


def test_an_extract_job_on_echo_gives_schema_valid_rows(tmp_path):
    from tokenmill.tasks.extract import prepare_extract
    from tokenmill.tasks.runner import JobConfig

    data = tmp_path / "in.csv"
    pl.DataFrame({"text": ["The Eagle is a pub.", "Zizzi serves French food near the river."]}).write_csv(data)
    job = prepare_extract(JobConfig(input=str(data), schema=str(SPEC), out=str(tmp_path / "out"), backend="echo",
                                    cache=False))
    job.run(progress=False)
    df = pl.read_parquet(tmp_path / "out" / "results.parquet")
    assert df["status"].to_list() == ["ok", "ok"]
    schema, _ = load_schema(str(SPEC))
    for raw in df["raw_output"].to_list():
        jsonschema.validate(json.loads(raw), schema)


def test_the_worker_process_runs_echo_too(info, prompts):
    """A caller that uses a worker process (the simulation) gets the same replies."""
    from tokenmill.pool import ModelWorker

    worker = ModelWorker(ModelSettings(model_path=str(default_model_path()), n_ctx=2048, backend="echo-exact"))
    try:
        done = list(worker.run(GenerationRequest(i, p, max_tokens=20) for i, p in enumerate(prompts)))
    finally:
        worker.close()
    here = EchoBackend(ModelSettings(model_path=str(default_model_path()), n_ctx=2048, backend="echo-exact"), info,
                       exact=True)
    expected = {c.index: (c.text, c.prompt_tokens, c.completion_tokens)
                for c in here.generate(GenerationRequest(i, p, max_tokens=20) for i, p in enumerate(prompts))}
    assert {c.index: (c.text, c.prompt_tokens, c.completion_tokens) for c in done} == expected


def test_echo_is_chosen_by_option_or_environment_and_is_never_the_default():
    from flows.summarize import parser

    code = "from flows.summarize import parser; print(parser().parse_args(['x']).backend)"
    env = {k: v for k, v in os.environ.items() if k != "TOKENMILL_BACKEND"}
    plain = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    chosen = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "TOKENMILL_BACKEND": "echo"},
                            capture_output=True, text=True)
    # no --backend: the model's own default (tokenmill.models.registry.choose), llama for a model file
    assert (plain.stdout.strip(), chosen.stdout.strip()) == ("None", "echo"), plain.stderr + chosen.stderr
    from tokenmill.models import registry

    assert registry.choose(None, "file", "x").name == "llama" and registry.choose(None, "url", "x").name == "http"
    assert parser().parse_args(["x", "--backend", "echo"]).backend == "echo"


def test_plain_echo_estimates_counts_without_a_tokenizer(prompts):
    plain = EchoBackend(ModelSettings(model_path=str(default_model_path()), n_ctx=2048, backend="echo"))
    reply = _one(plain, prompts[0], max_tokens=200)
    assert reply.prompt_tokens == 1 + (len(prompts[0].encode()) + 3) // 4
    assert reply.completion_tokens == (len(reply.text.encode()) + 3) // 4
    assert _one(plain, prompts[0], max_tokens=3).finish_reason == "length"
