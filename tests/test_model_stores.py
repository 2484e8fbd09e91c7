"""Models by reference: Ollama's store, llamafiles, GPT4All's folder, bare names, built around the
real default model in temporary folders and run end to end through flows.summarize (flows.extract
for GPT4All's folder)."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import assert_one_line_error
from tokenmill.errors import ModelError
from tokenmill.models import stores
from tokenmill.models.gguf_header import read_header_file
from tokenmill.models.layouts import build_llamafile, build_ollama_store
from tokenmill.models.resolve import default_model_path, resolve_model
from tokenmill.models.resolve import file_sha256 as _sha256

RESULT_COLUMNS = ["id", "status", "summary", "finish_reason", "prompt_tokens", "completion_tokens"]


@pytest.fixture(scope="module")
def model_homes(tmp_path_factory):
    """Ollama's store, GPT4All's folder and a llamafile folder, each around the default model."""
    gguf = default_model_path()
    base = tmp_path_factory.mktemp("stores")
    blob = build_ollama_store(base / "ollama", gguf)
    (base / "gpt4all").mkdir()
    shutil.copyfile(gguf, base / "gpt4all" / gguf.name)
    (base / "llamafiles").mkdir()
    offset = build_llamafile(base / "llamafiles" / "smollm2.llamafile", gguf)
    return {"gguf": gguf, "base": base, "blob": blob, "offset": offset,
            "llamafile": base / "llamafiles" / "smollm2.llamafile", "cache": base / "cache"}


@pytest.fixture
def homes(model_homes, monkeypatch):
    base = model_homes["base"]
    monkeypatch.setenv("OLLAMA_MODELS", str(base / "ollama"))
    monkeypatch.setenv("GPT4ALL_MODEL_PATH", str(base / "gpt4all"))
    monkeypatch.setenv("TOKENMILL_LLAMAFILE_DIR", str(base / "llamafiles"))
    monkeypatch.setenv("HOME", str(base / "home"))  # the default store locations are empty
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(model_homes["cache"]))
    return model_homes


def test_ollama_name_resolves_to_its_blob(homes):
    assert resolve_model("ollama:smollm2:135m") == homes["blob"]
    assert resolve_model("ollama:registry.ollama.ai/library/smollm2:135m") == homes["blob"]
    assert _sha256(resolve_model("ollama:smollm2:135m")) == _sha256(homes["gguf"])


def test_ollama_missing_tag_lists_the_manifests_looked_for(homes):
    with pytest.raises(ModelError) as err:
        resolve_model("ollama:smollm2")  # tag "latest" was never pulled
    message = str(err.value)
    assert "\n" not in message
    assert str(homes["base"] / "ollama" / "manifests/registry.ollama.ai/library/smollm2/latest") in message
    assert "/usr/share/ollama/.ollama/models/manifests" in message


def test_ollama_blob_that_does_not_match_its_digest_is_refused(homes, tmp_path, monkeypatch):
    store = tmp_path / "store"
    blob = build_ollama_store(store, homes["gguf"])
    with blob.open("r+b") as fh:  # same size, one byte changed
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 1]))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    with pytest.raises(ModelError, match="does not match its SHA-256"):
        resolve_model("ollama:smollm2:135m")


def test_llamafile_gguf_is_read_at_its_aligned_offset_and_extracted_once(homes):
    entry = stores.llamafile_entry(homes["llamafile"])
    assert entry.stored and entry.offset == homes["offset"] and entry.offset % 4096 == 0
    assert entry.size == homes["gguf"].stat().st_size
    header = read_header_file(homes["llamafile"], entry.offset)  # metadata without extracting
    assert header.architecture == "llama" and header.quantization == "Q4_1"
    first = resolve_model(str(homes["llamafile"]))
    assert first.parent == homes["cache"] / "llamafile" and _sha256(first) == _sha256(homes["gguf"])
    mtime = first.stat().st_mtime_ns
    assert resolve_model(str(homes["llamafile"])) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left over


def test_bare_names_are_found_in_each_store(homes):
    assert resolve_model("smollm2:135m") == homes["blob"]
    assert resolve_model(homes["gguf"].name.removesuffix(".gguf")) == (homes["base"] / "gpt4all" / homes["gguf"].name)
    assert resolve_model("smollm2").parent == homes["cache"] / "llamafile"  # smollm2.llamafile
    assert resolve_model(f"gpt4all:{homes['gguf'].name}") == homes["base"] / "gpt4all" / homes["gguf"].name


def test_unknown_name_lists_every_place_looked(homes):
    with pytest.raises(ModelError) as err:
        resolve_model("no-such-model")
    message = str(err.value)
    for place in ("manifests/registry.ollama.ai/library/no-such-model/latest", str(homes["base"] / "gpt4all"),
                  str(homes["base"] / "llamafiles"), "/usr/share/ollama"):
        assert place in message, message
    with pytest.raises(ModelError, match="GPT4All's model folder.*looked for"):
        resolve_model("gpt4all:missing.gguf")


def test_zip_without_a_gguf_is_refused_by_name(homes, tmp_path):
    bad = tmp_path / "empty.llamafile"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("args", "")
    with pytest.raises(ModelError, match=r"empty\.llamafile must hold exactly one \.gguf entry"):
        resolve_model(str(bad))


ROWS = 10  # the 10 SciTLDR abstracts, short replies: the reference run (conftest's summarized_scitldr10)
STORE_ROWS = 1  # the first of those rows through each other store: what a store changes is the model file read,
# not the rows, so one row proves it (its prompt alone costs seconds on this machine)
GPT4ALL_ROWS = 3  # E2E rows extracted through GPT4All: at least one must come out valid without a grammar


def _summarize(run_flow, data, out, *extra):
    """The options of conftest's summarized_scitldr10 (the reference), and a model of another store."""
    result = run_flow("summarize", str(data), "--out", str(out), "--max-tokens", "24", "--no-cache",
                      "--limit", str(STORE_ROWS), *extra)
    return _all_ok(result, out, STORE_ROWS)


def _all_ok(result, out, rows: int = ROWS):
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(out / "results.parquet")
    assert df.height == rows and df["status"].to_list() == ["ok"] * rows, df["error"].to_list()
    return df


@pytest.fixture(scope="module")
def direct(summarized_scitldr10):
    """The rows through llama.cpp in-process on the default model, as the reference (the session's
    run of them, shared with test_summarize: the same options as _summarize)."""
    return _all_ok(*summarized_scitldr10)


def _same_shape(df, direct) -> None:
    direct = direct.head(df.height)
    assert df.columns == direct.columns
    assert df.select(RESULT_COLUMNS).schema == direct.select(RESULT_COLUMNS).schema
    assert all(s and s.strip() for s in df["summary"].to_list())
    assert df["prompt_tokens"].to_list() == direct["prompt_tokens"].to_list()


def test_the_same_rows_through_ollamas_store_and_a_llamafile(homes, run_flow, scitldr_parquet, tmp_path, direct):
    """Ollama's store and a llamafile, run by llama.cpp in-process: same columns, every row ok;
    the same bytes through the same engine give the same summaries."""
    ollama = _summarize(run_flow, scitldr_parquet, tmp_path / "ollama", "--model", "ollama:smollm2:135m")
    llamafile = _summarize(run_flow, scitldr_parquet, tmp_path / "llamafile", "--model", str(homes["llamafile"]))
    for df in (ollama, llamafile):
        _same_shape(df, direct)
        assert df["summary"].to_list() == direct["summary"].head(STORE_ROWS).to_list()


def test_extraction_through_gpt4all_from_its_folder_validates_and_retries_without_grammar(homes, run_flow, tmp_path):
    """gpt4all:FILE run by GPT4All's own llama.cpp (one row at a time: slow on a busy machine), as
    the one command end to end on the GPT4All backend (its unit tests, summarize prompts included:
    tests/test_gpt4all_backend.py): GPT4All has no grammar, so extraction validates each reply and
    asks again; a schema the small default model meets without a grammar (test_extract's NAME_ONLY)."""
    import json

    import jsonschema

    from tests.conftest import DATASETS
    from tests.test_extract import NAME_ONLY

    e2e = DATASETS / "e2e" / "dev.csv"
    if not e2e.exists():
        pytest.skip(f"shared dataset missing: {e2e}")
    spec = tmp_path / "name.json"
    spec.write_text(json.dumps(NAME_ONLY))
    out = tmp_path / "gpt4all"
    result = run_flow("extract", str(e2e), "--column", "ref", "--schema", str(spec), "--limit", str(GPT4ALL_ROWS),
                      "--model", f"gpt4all:{homes['gguf'].name}", "--backend", "gpt4all", "--max-retries", "1",
                      "--max-tokens", "64", "--out", str(out), "--no-cache", timeout=1800)
    assert result.returncode in (0, 3), result.stderr
    assert "libcudart" not in result.stderr  # GPT4All's GPU probing stays off the terminal
    df = pl.read_parquet(out / "results.parquet")
    assert df.height == GPT4ALL_ROWS and set(df["calls"].to_list()) <= {1, 2}
    assert (df["status"] == "ok").sum() >= 1, df.select("status", "calls", "error")  # not failures only
    assert (df["prompt_tokens"] > 0).all() and (df["completion_tokens"] > 0).all()
    for row in df.iter_rows(named=True):
        if row["status"] == "ok":
            jsonschema.validate(json.loads(row["raw_output"]), NAME_ONLY)
        else:
            assert row["calls"] == 2 and row["error"].startswith("could not parse"), row
    usage = pl.read_parquet(out / "usage.parquet")
    assert usage["backend"].to_list() == ["gpt4all"]
    assert json.loads(usage["params"][0])["grammar"] is None and usage["calls"][0] == df["calls"].sum()


# `--model http://HOST:PORT/v1` end to end against a llama-cpp-python server, compared with this
# reference run, is tests/test_runtimes.py's server-stopped test (its finished rows).


def test_unknown_model_on_the_command_line_is_one_line(homes, run_cli_here, scitldr_parquet, tmp_path):
    result = run_cli_here("summarize", str(scitldr_parquet), "--out", str(tmp_path / "o"), "--model", "ollama:nope:1b")
    assert_one_line_error(result, "ollama:nope:1b", "manifests/registry.ollama.ai/library/nope/1b")
    assert not (tmp_path / "o" / "results.parquet").exists()
