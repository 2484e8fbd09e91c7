"""The GPT4All backend on the real default model: model copy, generation, the CLI end to end."""

from __future__ import annotations

import hashlib
import os

import polars as pl
import pytest

from tests.conftest import scitldr_rows
from tokenmill.models.base import GenerationRequest, ModelSettings
from tokenmill.models.resolve import default_model_path

pytest.importorskip("gpt4all")

from tokenmill.models import gpt4all_backend  # noqa: E402
from tokenmill.models.gpt4all_backend import Gpt4AllBackend, gpt4all_model_file  # noqa: E402

GREEDY_TOKENS = 24


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private tokenmill cache for this module (the model copy and the hash index land here)."""
    path = tmp_path_factory.mktemp("g4a-cache")
    saved = os.environ.get("TOKENMILL_CACHE_DIR")
    os.environ["TOKENMILL_CACHE_DIR"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("TOKENMILL_CACHE_DIR", None)
    else:
        os.environ["TOKENMILL_CACHE_DIR"] = saved


@pytest.fixture(scope="module")
def original():
    path = default_model_path()
    stat = path.stat()
    return path, _sha256(path), stat.st_mtime_ns


@pytest.fixture(scope="module")
def backend(cache_dir, original):
    b = Gpt4AllBackend(ModelSettings(model_path=str(original[0]), n_ctx=2048, backend="gpt4all"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Three SciTLDR abstracts rendered exactly as tokenmill renders them (task + chat template)."""
    from tokenmill.tasks.runner import JobConfig
    from tokenmill.tasks.summarize import prepare_summarize

    folder = tmp_path_factory.mktemp("g4a-input")
    path = folder / "scitldr3.parquet"
    pl.DataFrame(scitldr_rows(3)).write_parquet(path)
    job = prepare_summarize(JobConfig(input=str(path), out=str(folder / "out"), cache=False), create_out=False)
    return [job.render(row) for row in pl.read_parquet(path).to_dicts()]


def test_copy_with_a_known_pre_tokenizer_is_made_once_and_the_original_is_untouched(cache_dir, original):
    import numpy as np

    path, sha, mtime = original
    assert gpt4all_backend._read_pre_tokenizer(path) == "smollm"
    copy = gpt4all_model_file(path)
    assert copy != path and str(copy).startswith(str(cache_dir))
    assert gpt4all_backend._read_pre_tokenizer(copy) == "refact"
    made = copy.stat().st_mtime_ns
    assert gpt4all_model_file(path) == copy and copy.stat().st_mtime_ns == made  # not rewritten
    assert [p.name for p in copy.parent.iterdir()] == [copy.name]  # no temporary file left behind
    # Everything but the pre-tokenizer name is the same, byte for byte (other metadata, tensors):
    # the names are equally long, so the only bytes that differ are those of the value.
    a, b = np.fromfile(path, dtype=np.uint8), np.fromfile(copy, dtype=np.uint8)
    assert a.size == b.size
    key = a.tobytes().index(b"tokenizer.ggml.pre") + len(b"tokenizer.ggml.pre")
    value = key + 4 + 8  # the value's type (u32) and length (u64), then its bytes
    assert a[value:value + 6].tobytes() == b"smollm" and b[value:value + 6].tobytes() == b"refact"
    assert np.nonzero(a != b)[0].tolist() == list(range(value, value + 6))
    del a, b
    # A model whose pre-tokenizer GPT4All knows passes through unchanged.
    assert gpt4all_model_file(copy) == copy
    assert path.stat().st_mtime_ns == mtime and _sha256(path) == sha


def test_raw_prompt_is_fed_verbatim_with_special_tokens_parsed(backend, prompts):
    from tokenmill.models.gguf_info import ModelInfo

    completion = next(backend.generate([GenerationRequest(0, prompts[0], max_tokens=1)]))
    assert completion.finish_reason in ("stop", "length"), completion.error
    # The same tokens llama-cpp-python feeds: one <|im_start|> token, no extra template around it.
    assert backend.last_prompt_tokens == ModelInfo(default_model_path()).tokenize(prompts[0])
    assert completion.prompt_tokens == len(backend.last_prompt_tokens)


def test_three_scitldr_rows_give_text_token_counts_and_timings(backend, prompts):
    beats = []
    backend.on_step = lambda: beats.append(1)
    try:
        requests = [GenerationRequest(i, p, max_tokens=32) for i, p in enumerate(prompts)]
        completions = list(backend.generate(requests))
    finally:
        backend.on_step = None
    assert [c.index for c in completions] == [0, 1, 2]
    for c in completions:
        assert c.finish_reason in ("stop", "length"), c.error
        assert c.text and c.text.strip()
        assert c.prompt_tokens > 0 and 0 < c.completion_tokens <= 32
        assert c.prompt_ms > 0 and c.decode_ms > 0
    assert len(beats) >= sum(c.prompt_tokens + c.completion_tokens for c in completions) // 2


def test_max_tokens_is_respected(backend, prompts):
    c = next(backend.generate([GenerationRequest(0, prompts[1], max_tokens=5)]))
    assert c.finish_reason == "length" and c.completion_tokens == 5 and c.text


def test_greedy_is_deterministic(backend, prompts):
    first, second = backend.generate([GenerationRequest(0, prompts[2], max_tokens=GREEDY_TOKENS),
                                      GenerationRequest(1, prompts[2], max_tokens=GREEDY_TOKENS)])
    assert first.text and first.text == second.text


def test_text_is_cut_at_the_first_stop_string(backend, prompts):
    full = next(backend.generate([GenerationRequest(0, prompts[2], max_tokens=GREEDY_TOKENS)]))
    words = full.text.split()
    stop = words[min(3, len(words) - 1)]
    cut = next(backend.generate([GenerationRequest(1, prompts[2], max_tokens=GREEDY_TOKENS, stop=["\x00", stop])]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.completion_tokens < full.completion_tokens


def test_a_failing_row_gives_an_error_and_the_next_row_goes_on(backend, prompts):
    too_long, ok = backend.generate([GenerationRequest(0, prompts[0], max_tokens=5000),
                                     GenerationRequest(1, prompts[0], max_tokens=3)])
    assert too_long.finish_reason == "error" and too_long.text is None and "--n-ctx" in too_long.error
    assert ok.finish_reason == "length" and ok.text


def test_grammar_is_declared_unsupported_and_ignored(backend, prompts):
    from tokenmill.models import registry

    assert registry.get("gpt4all").schema == "none" and not registry.get("gpt4all").constrains  # what the runner reads
    assert registry.get("llama").constrains and registry.get("llama-simple").constrains
    c = next(backend.generate([GenerationRequest(0, prompts[0], max_tokens=3, grammar='root ::= "yes"')]))
    assert c.finish_reason == "length" and c.text


def test_device_names_gpt4all(backend):
    assert "gpt4all" in backend.device() and backend.device().startswith("cpu")


# The command end to end on this backend (gpt4all:FILE from GPT4All's folder, extraction that
# validates and asks again without a grammar, GPT4All's GPU probing off the terminal, usage naming
# the backend) is tests/test_model_stores.py's gpt4all test.


def test_a_model_gpt4all_refuses_fails_with_its_reason(cache_dir, original, monkeypatch):
    from tokenmill.errors import ModelError

    monkeypatch.setattr(gpt4all_backend, "gpt4all_model_file", lambda path: path)  # skip the patched copy
    with pytest.raises(ModelError, match="unknown pre-tokenizer type: 'smollm'"):
        Gpt4AllBackend(ModelSettings(model_path=str(original[0]), n_ctx=512, backend="gpt4all"))
