"""The OpenAI-compatible HTTP backend against a real llama-cpp-python server on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import polars as pl
import pytest

from tests.conftest import scitldr_rows
from tokenmill.errors import ModelError
from tokenmill.models.base import ModelSettings
from tokenmill.models.gguf_info import ModelInfo
from tokenmill.models.base import GenerationRequest as Request
from tokenmill.models.estimate import least_tokens, most_tokens
from tokenmill.models.openai_http import OpenAIHTTPBackend, parse_url, truncation
from tokenmill.models.resolve import default_model_path

pytest.importorskip("llama_cpp.server.app", reason="pip install 'llama-cpp-python[server]'")

ROWS = 3  # the server decodes one request at a time: few rows, short replies (the stopped-server test: 2 + 1)
SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
          "required": ["title", "year"], "additionalProperties": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m llama_cpp.server` with the default model, on 127.0.0.1 only."""

    def __init__(self, port: int, log: Path):
        self.port, self.log = port, log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 180) -> "Server":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path()), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", "4096", "--n_threads", "2", "--verbose", "false"],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited; see {self.log}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"llama_cpp.server did not start; see {self.log}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(_free_port(), tmp_path_factory.mktemp("server") / "server.log").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """ROWS SciTLDR abstracts rendered exactly as tokenmill renders them (task + chat template)."""
    from tokenmill.tasks.runner import JobConfig
    from tokenmill.tasks.summarize import prepare_summarize

    folder = tmp_path_factory.mktemp("http-input")
    path = folder / "scitldr.parquet"
    pl.DataFrame(scitldr_rows(ROWS)).write_parquet(path)
    job = prepare_summarize(JobConfig(input=str(path), out=str(folder / "out"), cache=False), create_out=False)
    return [job.render(row) for row in pl.read_parquet(path).to_dicts()]


def _backend(url: str, **kwargs) -> OpenAIHTTPBackend:
    return OpenAIHTTPBackend(ModelSettings(model_path=url, backend="http"), **kwargs)


def test_url_forms():
    assert parse_url("http://127.0.0.1:8080") == ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080", None)
    assert parse_url("http://h:11434/v1#llama3.2:1b") == ("http://h:11434/v1", "http://h:11434", "llama3.2:1b")
    with pytest.raises(ModelError, match="http://HOST:PORT"):
        parse_url("http://:80")


def test_scitldr_rows_are_summarized_with_the_servers_usage(server, prompts):
    backend = _backend(server.url)
    beats = []
    backend.on_step = lambda: beats.append(1)
    try:
        assert backend.concurrency == 4 and "4 concurrent" in backend.device()  # no /props: the default
        started = time.perf_counter()
        completions = list(backend.generate(Request(i, p, max_tokens=24) for i, p in enumerate(prompts)))
        elapsed = time.perf_counter() - started
    finally:
        backend.close()
    assert sorted(c.index for c in completions) == list(range(ROWS))
    assert all(c.finish_reason in ("stop", "length") and c.error is None for c in completions), completions
    assert all(c.text and c.text.strip() for c in completions)
    info = ModelInfo(default_model_path())
    by_index = {c.index: c for c in completions}
    # The server's usage counts the same tokens tokenmill's own tokenizer does (BOS, special tokens).
    assert [by_index[i].prompt_tokens for i in range(ROWS)] == [info.count_tokens(p) for p in prompts]
    assert all(0 < c.completion_tokens <= 24 for c in completions)
    assert len(beats) >= ROWS  # one per reply, and one a second while replies are awaited
    print(f"http backend: {ROWS} rows in {elapsed:.1f}s ({ROWS / elapsed:.2f} rows/s)")


def test_extraction_with_the_servers_json_schema_is_schema_valid(server):
    backend = _backend(server.url)
    rows = scitldr_rows(1)  # a schema-constrained reply of up to 96 tokens, one request at a time: one row
    try:
        requests = [Request(i, "", max_tokens=96, json_schema=SCHEMA, messages=[
            {"role": "user", "content": "Give this paper a short title and the year it might be from, as JSON "
                                        f"with keys title and year.\n\n{row['text'][:1500]}"}])
                    for i, row in enumerate(rows)]
        completions = list(backend.generate(requests))
        style = backend.schema_style
    finally:
        backend.close()
    assert len(completions) == len(rows)
    for c in completions:
        assert c.error is None, c.error
        jsonschema.validate(json.loads(c.text), SCHEMA)
    # llama-cpp-python's server refuses OpenAI's json_schema form and takes llama.cpp's json_object + schema
    assert style == "json_object"


def test_a_server_that_is_down_is_one_line_naming_the_url():
    url = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(ModelError) as err:
        _backend(url)
    message = str(err.value)
    assert url in message and "connection refused" in message and "\n" not in message


def test_a_model_the_server_does_not_have_is_refused_before_any_row(server):
    with pytest.raises(ModelError, match="has no model 'nope'"):
        _backend(server.url + "#nope")


def test_server_stopped_mid_run_fails_its_rows_alone_and_a_restart_finishes_them(server, prompts):
    """The module's server is stopped mid-run, then started again on its port (for the tests after
    this one too)."""
    s = server
    try:
        backend = _backend(s.url, concurrency=1, retries=2, backoff_s=0.2)
        requests = [Request(i, p, max_tokens=16) for i, p in enumerate(prompts)]
        results = {}
        for completion in backend.generate(requests):
            results[completion.index] = completion
            if len(results) == 2:
                s.stop()  # the server dies with rows still to go
        backend.close()
        ok = [i for i, c in results.items() if c.error is None]
        failed = [i for i, c in results.items() if c.error is not None]
        assert len(results) == ROWS and len(ok) >= 2 and failed
        assert backend.stats["retries"] >= 2 * len(failed)
        for i in failed:
            assert results[i].finish_reason == "error" and results[i].text is None
            assert s.url in results[i].error and "gave up after 3 tries" in results[i].error
        s.start()  # the same port again: the failed rows now finish
        backend = _backend(s.url, concurrency=1)
        again = list(backend.generate(requests[i] for i in failed))
        backend.close()
        assert sorted(c.index for c in again) == sorted(failed)
        assert all(c.error is None and c.text for c in again)
    finally:
        if s.proc is None or s.proc.poll() is not None:
            s.start()


def test_truncation_reported_by_the_server_fails_the_row(server, prompts):
    """A server that reads fewer prompt tokens than tokenmill counted cut the prompt (Ollama does
    so silently); here the server reads it all, so claiming one token more must be caught."""
    backend = _backend(server.url)
    count = ModelInfo(default_model_path()).count_tokens(prompts[0])
    try:
        exact, overstated = sorted(backend.generate([
            Request(0, prompts[0], max_tokens=4, expected_prompt_tokens=count),
            Request(1, prompts[0], max_tokens=4, expected_prompt_tokens=count + 1)]), key=lambda c: c.index)
    finally:
        backend.close()
    assert exact.error is None and exact.prompt_tokens == count
    assert overstated.finish_reason == "error" and server.url in overstated.error
    assert f"read only {count} of the prompt's {count + 1}+ tokens" in overstated.error


def test_chat_messages_are_checked_against_their_words_with_a_real_servers_usage(server):
    """Rows sent as messages, with no count of tokenmill's own (a server without a tokenizer): the
    server's reported prompt tokens are at least the messages' words, so a real server that read
    everything passes; the check fails a row only when the report falls short (cut_report below)."""
    texts = [row["text"] for row in scitldr_rows(2)]
    backend = _backend(server.url)
    try:
        replies = sorted(backend.generate([Request(i, "", max_tokens=4, messages=[
            {"role": "user", "content": f"Summarize in one sentence:\n\n{t}"}]) for i, t in enumerate(texts)]),
            key=lambda c: c.index)
    finally:
        backend.close()
    for text, reply in zip(texts, replies):
        assert reply.error is None and reply.text is not None, reply.error
        assert least_tokens(text) <= reply.prompt_tokens <= most_tokens(text) + 64  # + the chat template
        cut_report = least_tokens(text) - 1  # what a server that cut the prompt to fit its context reports
        request = Request(0, "", messages=[{"role": "user", "content": text}])
        assert truncation(server.url, "openai-compatible", request, reply.prompt_tokens) is None
        assert "read only" in truncation(server.url, "openai-compatible", request, cut_report)


def test_truncation_check_names_the_fix_and_spares_short_or_unreported_prompts():
    url = "http://127.0.0.1:11434/v1"
    long_text = " ".join(f"word{i}" for i in range(300))  # 300 words: at least 300 tokens
    chat = Request(0, "", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": long_text}])
    error = truncation(url, "ollama", chat, 120)  # Ollama at a 120-token context kept 120 of them
    assert error and url in error and "read only 120 of the prompt's 302+ tokens" in error
    assert "num_ctx" in error and "OLLAMA_CONTEXT_LENGTH" in error and "--n-ctx" in error and "\n" not in error
    assert truncation(url, "ollama", chat, 302) is None  # every word read
    assert truncation(url, "ollama", chat, 0) is None  # no usage reported: nothing to judge by
    short = Request(0, "", messages=[{"role": "user", "content": "one two three"}])
    assert truncation(url, "ollama", short, 1) is None  # too short to judge: mostly the server's template
    raw = Request(0, long_text)  # a rendered prompt with no count of tokenmill's own: judged by its words too
    assert "raise the server's context size" in truncation(url, "vllm", raw, 100)
    # tokenmill's own count: exact for a rendered prompt, 5% slack for messages the server renders
    assert truncation(url, "x", Request(0, "p", expected_prompt_tokens=1000), 999) is not None
    counted = Request(0, "", messages=[{"role": "user", "content": "x"}], expected_prompt_tokens=1000)
    assert truncation(url, "x", counted, 950) is None and truncation(url, "x", counted, 949) is not None


def test_server_model_info_counts_tokens_as_the_local_tokenizer_does(server, prompts):
    """The ModelInfo stand-in a --model http://... run would count prompts with (server_info.py)."""
    from tokenmill.models.server_info import ServerModelInfo

    remote, local = ServerModelInfo(server.url), ModelInfo(default_model_path())
    try:
        assert remote.kind == "llama-cpp-python" and remote.has_tokenizer
        assert [remote.count_tokens(p) for p in prompts] == [local.count_tokens(p) for p in prompts]
        texts = [row["text"] for row in scitldr_rows(3)]
        assert [remote.count_text_tokens(t) for t in texts] == [local.count_text_tokens(t) for t in texts]
        assert remote.adds_bos == local.adds_bos
        assert remote.name == remote.model and remote.model in _backend(server.url).device()
        # told to use no tokenizer: counts become estimates at least as large as the server's count
        blind = ServerModelInfo(server.url, tokenizer="none")
        assert not blind.has_tokenizer and blind.identity == remote.identity
        assert all(blind.count_tokens(p) >= local.count_tokens(p) for p in prompts)
    finally:
        remote.close()
