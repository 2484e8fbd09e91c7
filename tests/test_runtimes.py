"""The row jobs by URL (`--model http://HOST:PORT/v1`) against a real llama-cpp-python server on
loopback: extraction with the server's JSON Schema support, summaries sent as chat messages to a
server treated as having no tokenizer, a server stopped mid-run and restarted, and the backend
registry's checks (options, model kinds) on the command line."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time

import jsonschema
import polars as pl
import pytest

from flows._servers import LoopbackServer
from tests.conftest import DATASETS, REPO, assert_one_line_error
from tokenmill.models import registry
from tokenmill.models.resolve import default_model_path
from tokenmill.schema import load_schema

pytest.importorskip("llama_cpp.server.app", reason="pip install 'llama-cpp-python[server]'")

SPEC = REPO / "jobs" / "restaurants.yaml"
URL_ROWS = 1  # rows of the summarize test (messages counted by the server: one row shows it)
EXTRACT_ROWS = 1  # replies of up to 160 tokens, one request at a time


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LoopbackServer("llama-cpp-python", default_model_path(), tmp_path_factory.mktemp("srv") / "log") as s:
        yield s


def test_extraction_by_url_uses_the_servers_json_schema_and_every_row_is_valid(server, run_flow, tmp_path):
    e2e = DATASETS / "e2e" / "dev.csv"
    if not e2e.exists():
        pytest.skip(f"shared dataset missing: {e2e}")
    out = tmp_path / "out"
    result = run_flow("extract", str(e2e), "--column", "ref", "--schema", str(SPEC), "--limit", str(EXTRACT_ROWS),
                      "--model", server.url, "--out", str(out), "--no-cache", "--max-tokens", "160")
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(out / "results.parquet")
    assert df["status"].to_list() == ["ok"] * EXTRACT_ROWS, df.select("row", "error")
    assert (df["calls"] == 1).all()  # constrained by the server: no repair turns were needed
    schema, _ = load_schema(str(SPEC))
    for raw in df["raw_output"].to_list():
        jsonschema.validate(json.loads(raw), schema)
    usage = pl.read_parquet(out / "usage.parquet").row(-1, named=True)
    assert usage["backend"] == "http" and server.url in usage["device"]
    assert json.loads(usage["params"])["runtime"] == "http"  # its own row keys, never a llama.cpp row's


def test_summarize_by_url_without_a_tokenizer_sends_chat_messages_counted_by_the_servers_usage(
        server, run_flow, scitldr_parquet, tmp_path):
    """A server tokenmill has no tokenizer for (Ollama's /v1, vLLM, LM Studio), forced here with
    tokenizer=none: rows go to /v1/chat/completions as messages, the server applies its own chat
    template, and token counts come from its usage."""
    from tokenmill.tasks.runner import JobConfig
    from tokenmill.tasks.summarize import prepare_summarize

    out = tmp_path / "out"
    result = run_flow("summarize", str(scitldr_parquet), "--model", server.url, "--backend-option", "tokenizer=none",
                      "--limit", str(URL_ROWS), "--max-tokens", "12", "--out", str(out), "--no-cache")
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(out / "results.parquet").sort("row")
    assert df["status"].to_list() == ["ok"] * URL_ROWS, df.select("row", "error")
    assert all(s.strip() for s in df["summary"].to_list()) and (df["calls"] == 1).all()
    # The server rendered the same messages with the model's template: its usage counts exactly the
    # tokens of tokenmill's own rendering, counted by the model's tokenizer here.
    local = prepare_summarize(JobConfig(input=str(scitldr_parquet), limit=URL_ROWS, cache=False), create_out=False)
    rows = pl.read_parquet(scitldr_parquet).head(URL_ROWS).to_dicts()
    assert df["prompt_tokens"].to_list() == [local.model_info.count_tokens(local.render(r)) for r in rows]
    assert ((df["completion_tokens"] > 0) & (df["completion_tokens"] <= 12)).all()
    assert server.log.read_text().count("POST /v1/chat/completions") >= URL_ROWS  # the server's access log
    usage = pl.read_parquet(out / "usage.parquet").row(-1, named=True)
    assert usage["prompt_tokens"] == sum(df["prompt_tokens"]) and usage["rows_ok"] == URL_ROWS
    assert json.loads(usage["params"])["prompt_as"] == "messages"  # keyed apart from rendered-prompt rows


ROWS = 4  # through a server that decodes one request at a time: two done, then it stops with two to go


def _summarize_cmd(data, out, url) -> list[str]:
    return [sys.executable, "-m", "flows.summarize", str(data), "--model", url, "--out", str(out), "--no-cache",
            "--limit", str(ROWS), "--max-tokens", "16", "--chunk-size", "1", "--part-rows", "1",
            "--concurrency", "1", "--backend-option", "retries=2",
            "--backend-option", "backoff_s=0.2", "--no-progress"]


def test_server_stopped_mid_run_fails_its_rows_alone_and_the_same_command_finishes_them(
        server, prefect_server, scitldr_parquet, summarized_scitldr10, tmp_path):
    """The module's server stopped mid-run, then started again on its port. The finished rows are
    also `--model http://...` (with the server's tokenizer: rendered prompts) end to end against the
    session's reference run of the same rows in-process on the default model (conftest's
    summarized_scitldr10): the same columns and types, the server counting the same prompt tokens."""
    s = server  # the later tests of this module need no server; the fixture stops it at the end
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": prefect_server["home"],
           "TOKENMILL_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.Popen(_summarize_cmd(scitldr_parquet, out, s.url), cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list((out / "parts").glob("*.parquet"))) < 2:
            assert run.poll() is None, run.communicate()
            time.sleep(0.1)
        s.stop()  # two rows are done; the server dies with the others to go
        _, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(30)
    assert run.returncode == 3, stderr  # finished, with row errors
    df = pl.read_parquet(out / "results.parquet")
    failed = df.filter(pl.col("status") == "error")
    assert df.height == ROWS and (df["status"] == "ok").sum() >= 2 and failed.height >= 1
    for error in failed["error"].to_list():
        assert s.url in error and "gave up after 3 tries" in error, error
    s.start()  # the same port again
    again = subprocess.run(_summarize_cmd(scitldr_parquet, out, s.url), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    df = pl.read_parquet(out / "results.parquet")
    assert df["status"].to_list() == ["ok"] * ROWS and all(t.strip() for t in df["summary"].to_list())
    usage = pl.read_parquet(out / "usage.parquet").row(-1, named=True)
    assert usage["rows_generated"] == failed.height and usage["rows_resumed"] == ROWS - failed.height
    assert usage["backend"] == "http" and s.url in usage["device"]
    reference_result, reference_out = summarized_scitldr10
    assert reference_result.returncode == 0, reference_result.stderr
    direct = pl.read_parquet(reference_out / "results.parquet").head(ROWS)
    columns = ["id", "status", "summary", "finish_reason", "prompt_tokens", "completion_tokens"]
    assert df.columns == direct.columns and df.select(columns).schema == direct.select(columns).schema
    assert df["prompt_tokens"].to_list() == direct["prompt_tokens"].to_list()


def test_backend_options_and_model_kinds_are_checked_on_one_line(run_cli_here, scitldr_parquet, tmp_path):
    out = str(tmp_path / "o")
    cases = [
        (["--backend-option", "nope=1"], ["--backend-option nope", "--backend llama has no such option"]),
        (["--concurrency", "2"], ["--backend-option concurrency", "--backend llama"]),
        (["--backend", "http"], ["--backend http needs a server URL"]),
        (["--backend-option", "retries"], ["'retries' is not KEY=VALUE"]),
    ]
    for extra, needles in cases:
        assert_one_line_error(run_cli_here("summarize", str(scitldr_parquet), "--out", out, *extra), *needles)
    assert not (tmp_path / "o" / "results.parquet").exists()


def test_http_options_are_typed_and_unknown_ones_refused():
    http = registry.get("http")
    assert registry.validate_options(http, {"concurrency": "3", "retries": "0"})["concurrency"] == 3
    with pytest.raises(Exception, match="retries='-1'.*greater than or equal to 0"):
        registry.validate_options(http, {"retries": "-1"})
    with pytest.raises(Exception, match="has no such option .*concurrency, timeout_s"):
        registry.validate_options(http, {"concurency": "3"})


def test_a_server_that_is_down_is_refused_before_any_row(run_cli_here, scitldr_parquet, tmp_path):
    from flows._servers import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    result = run_cli_here("summarize", str(scitldr_parquet), "--out", str(tmp_path / "o"), "--model", url)
    assert_one_line_error(result, url, "connection refused")


def test_the_runner_and_the_pool_name_no_backend():
    """Everything that differs between backends is in the registry: no backend's name appears as a
    string in the runner, the planner or the worker pool."""
    for path in ("tokenmill/tasks/runner.py", "tokenmill/tasks/plans.py", "tokenmill/pool.py"):
        tree = ast.parse((REPO / path).read_text())
        strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not strings & set(registry.NAMES), (path, strings & set(registry.NAMES))
