"""python -m flows.models list|show|quantize on the real default model and real stores."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import polars as pl
import pytest

from tests.conftest import REPO, assert_one_line_error
from tokenmill.models.gguf_header import read_header_file
from tokenmill.models.layouts import build_llamafile, build_ollama_store
from tokenmill.models.quantize import dequantize_to_f16
from tokenmill.models.resolve import default_model_path, file_sha256


def models_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.models", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def stores_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("models-cli")
    gguf = default_model_path()
    build_ollama_store(base / "ollama", gguf, name="smollm2", tag="135m")
    (base / "gpt4all").mkdir()
    shutil.copyfile(gguf, base / "gpt4all" / "smol.gguf")
    (base / "lf").mkdir()
    build_llamafile(base / "lf" / "smol.llamafile", gguf)
    return {"OLLAMA_MODELS": str(base / "ollama"), "GPT4ALL_MODEL_PATH": str(base / "gpt4all"),
            "TOKENMILL_LLAMAFILE_DIR": str(base / "lf"), "TOKENMILL_CACHE_DIR": str(base / "cache"),
            "base": str(base)}


def test_list_shows_every_store_with_its_metadata(stores_env):
    result = models_cli("list", env={k: v for k, v in stores_env.items() if k != "base"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["SOURCE", "MODEL", "SIZE", "ARCH", "QUANT", "FAMILY", "CONTEXT"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"default", "ollama", "gpt4all", "llamafile"}
    assert rows["ollama"][1] == "ollama:smollm2:135m" and rows["gpt4all"][1] == "gpt4all:smol.gguf"
    assert rows["llamafile"][1].endswith("smol.llamafile")
    for row in rows.values():
        assert row[2:] == ["98.4", "MB", "llama", "Q4_1", "smollm", "8192"], row
    assert not (os.path.exists(os.path.join(stores_env["TOKENMILL_CACHE_DIR"], "llamafile"))), \
        "listing must read the llamafile in place, not extract it"


def test_show_gives_metadata_template_family_and_memory(stores_env):
    env = {k: v for k, v in stores_env.items() if k != "base"}
    result = models_cli("show", "ollama:smollm2:135m", "--n-ctx", "2048", "--n-seq", "4", env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "family    smollm" in out and "quant     Q4_1" in out
    assert "llama.block_count = 30" in out
    assert "chat template: renders in tokenmill's sandbox" in out
    assert "<|im_start|>user\n  Hello<|im_end|>" in out
    # 30 layers x 3 KV heads x (64 + 64) x 2 bytes per cell: 23,040 bytes a cell
    assert "KV cache 47.2 MB (F16, 2048 cells)" in out
    assert "KV cache 235.9 MB (F16, 10240 cells)" in out


def test_show_kv_estimate_matches_what_llama_cpp_allocates():
    code = ("import llama_cpp; llama_cpp.Llama(model_path=%r, n_ctx=2048, verbose=True)" % str(default_model_path()))
    load = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    sizes = re.findall(r"llama_kv_cache.*?size\s*=\s*([\d.]+)\s*MiB", load.stderr)
    assert sizes, load.stderr[-2000:]
    shown = models_cli("show", "default", "--n-ctx", "2048")
    mb = float(re.search(r"KV cache ([\d.]+) MB \(F16, 2048 cells\)", shown.stdout).group(1))
    assert mb == pytest.approx(float(sizes[0]) * 1.048576, rel=0.01)


def test_show_refuses_a_template_that_escapes_the_sandbox(tmp_path):
    # The default model with its chat template's bytes overwritten in place by a hostile one of the
    # same length (padded with spaces), so nothing else in the file moves (tokenmill's own GGUF
    # copier is tests/test_template_security.py's).
    model = default_model_path()
    original = read_header_file(model).metadata["tokenizer.chat_template"].encode()
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ messages[0]['content'] }}".encode()
    data = model.read_bytes()
    assert data.count(original) == 1 and len(hostile) < len(original)
    evil = tmp_path / "evil.gguf"
    evil.write_bytes(data.replace(original, hostile.ljust(len(original)), 1))
    assert read_header_file(evil).metadata["tokenizer.chat_template"].strip() == hostile.decode()
    result = models_cli("show", str(evil))
    assert result.returncode == 1
    assert "REFUSED by tokenmill's sandbox" in result.stdout


def test_quantize_f16_to_q8_then_summarize(tmp_path, scitldr_parquet):
    f16 = dequantize_to_f16(default_model_path(), tmp_path / "smol-f16.gguf")
    assert read_header_file(f16).quantization == "F16"
    out = tmp_path / "smol-q8.gguf"
    result = models_cli("quantize", str(f16), str(out), "--type", "Q8_0", "--no-progress")
    assert result.returncode == 0, result.stderr
    header = read_header_file(out)
    assert header.quantization == "Q8_0" and header.n_tensors == 272
    assert f16.stat().st_size > out.stat().st_size > default_model_path().stat().st_size
    line = result.stderr.strip().splitlines()[-1]
    assert "270.9 MB" in line and "144.8 MB" in line and "Q8_0" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol-f16.gguf", "smol-q8.gguf"]  # no temporary left
    # The quantized file is a working model: a summarize job on it (in this process, on the real
    # engine; `--model PATH` on the command line is every flow test's own).
    from tokenmill.tasks.runner import JobConfig
    from tokenmill.tasks.summarize import prepare_summarize

    job = prepare_summarize(JobConfig(input=str(scitldr_parquet), out=str(tmp_path / "sum"), model=str(out), limit=1,
                                      max_tokens=8, n_ctx=1024, n_seq=1, cache=False))
    stats = job.run(progress=False)
    assert stats.rows_ok == 1 and stats.completion_tokens > 0
    assert stats.model_sha256 == file_sha256(out)  # the quantized file ran, not the default model
    df = pl.read_parquet(tmp_path / "sum" / "results.parquet")
    assert df["status"].to_list() == ["ok"] and df["summary"][0].strip()


def test_quantize_errors_are_one_line(tmp_path):
    bad_type = models_cli("quantize", "default", str(tmp_path / "o.gguf"), "--type", "Q9_X")
    assert_one_line_error(bad_type, "--type Q9_X", "Q4_K_M")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    bad_input = models_cli("quantize", str(not_gguf), str(tmp_path / "o.gguf"), "--type", "Q8_0")
    assert_one_line_error(bad_input, str(not_gguf), "GGUF")
    assert not (tmp_path / "o.gguf").exists()
