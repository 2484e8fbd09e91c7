"""Each bad input ends in a one-line message naming the file, row or option at fault; nothing half-done."""

from __future__ import annotations

import time

import gguf
import polars as pl
import pytest

from tests.conftest import assert_one_line_error, run_echo, scitldr_rows
from tokenmill.models.resolve import default_model_path


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "in.parquet"
    pl.DataFrame(scitldr_rows(3)).write_parquet(path)
    return path


def test_non_utf8_csv(run_cli_here, tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("id,text\n1,caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    assert_one_line_error(run_cli_here("summarize", str(path), "--out", str(tmp_path / "o")), str(path), "UTF-8", "iconv")


def test_truncated_parquet(run_cli_here, good, tmp_path):
    path = tmp_path / "cut.parquet"
    path.write_bytes(good.read_bytes()[:200])
    assert_one_line_error(run_cli_here("summarize", str(path), "--out", str(tmp_path / "o")), str(path), "cannot read")


def test_folder_with_mixed_schemas(run_cli_here, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    pl.DataFrame({"text": ["a b c"]}).write_parquet(folder / "a.parquet")
    pl.DataFrame({"text": ["d e f"], "lang": ["en"]}).write_parquet(folder / "b.parquet")
    assert_one_line_error(run_cli_here("summarize", str(folder), "--out", str(tmp_path / "o")), "b.parquet", "a.parquet", "lang")


def test_glob_matching_nothing(run_cli_here, tmp_path):
    assert_one_line_error(run_cli_here("summarize", str(tmp_path / "*.csv"), "--out", str(tmp_path / "o")), "no file matches")


def test_template_with_a_syntax_error(run_cli_here, good, tmp_path):
    template = tmp_path / "broken.j2"
    template.write_text("Summarize {{ text }\n")
    assert_one_line_error(run_cli_here("summarize", str(good), "--prompt", str(template), "--out", str(tmp_path / "o")),
           str(template), "syntax error", "line 1")


@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_tokens_not_positive(run_cli_here, good, tmp_path, value):
    assert_one_line_error(run_cli_here("summarize", str(good), "--max-tokens", value, "--out", str(tmp_path / "o")),
           "--max-tokens", value)


def test_output_folder_that_cannot_be_created(run_cli_here, good, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_one_line_error(run_cli_here("summarize", str(good), "--out", str(blocker / "out")), str(blocker / "out"), "--out")


def test_output_folder_holding_another_jobs_results(run_cli_here, good, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    pl.DataFrame({"run_id": ["x"], "task": ["extract"]}).write_parquet(out / "usage.parquet")
    assert_one_line_error(run_cli_here("summarize", str(good), "--out", str(out)), str(out), "extract", "--out")


def test_non_gguf_model_file(run_cli_here, good, tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    assert_one_line_error(run_cli_here("summarize", str(good), "--model", str(model), "--out", str(tmp_path / "o")),
           str(model), "not a GGUF")


def test_truncated_gguf_model_file(run_cli_here, good, tmp_path):
    model = tmp_path / "cut.gguf"
    with default_model_path().open("rb") as fh:
        model.write_bytes(fh.read(5_000_000))
    assert_one_line_error(run_cli_here("summarize", str(good), "--model", str(model), "--out", str(tmp_path / "o")),
           str(model), "could not load")


def test_gguf_of_an_unsupported_architecture(run_cli_here, good, tmp_path):
    model = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(str(model), "alienformer")
    writer.add_name("alien")
    writer.add_context_length(512)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(run_cli_here("summarize", str(good), "--model", str(model), "--out", str(tmp_path / "o")),
           str(model), "could not load")


def test_invalid_job_spec(run_cli_here, good, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("task: extract\nschema: [this is: not, {valid\n")
    assert_one_line_error(run_cli_here("extract", str(good), "--schema", str(spec), "--out", str(tmp_path / "o")), str(spec))


def test_null_and_empty_rows_fail_alone(tmp_path):
    rows = scitldr_rows(3)
    data = tmp_path / "holes.parquet"
    pl.DataFrame({"text": [rows[0]["text"], None, "   ", rows[1]["text"]]}).write_parquet(data)
    out = tmp_path / "o"
    # in process, on the zero-cost backend: which rows fail does not depend on the model (the command's
    # exit status 3 and summary line for a run with row errors: test_runtimes, test_batch)
    stats = run_echo("summarize", data, out, max_tokens=16)
    assert stats.rows_error == 2 and stats.rows_generated == 2 and stats.calls == 2
    df = pl.read_parquet(out / "results.parquet")
    assert df["status"].to_list() == ["ok", "error", "error", "ok"]
    assert all("is empty in this row" in e for e in df["error"].to_list()[1:3])
    assert df["produced"].to_list()[1:3] == ["skipped", "skipped"]
    assert "2 with errors" in stats.summary_line(str(out))  # the command's last line


def test_a_ten_megabyte_row_fails_alone(tmp_path):
    rows = scitldr_rows(12)
    huge = " ".join(r["text"] for r in rows)
    huge = (huge + " ") * (10_000_000 // len(huge) + 1)
    data = tmp_path / "huge.parquet"
    pl.DataFrame({"text": [rows[0]["text"], huge[:10_000_000], rows[1]["text"]]}).write_parquet(data)
    out = tmp_path / "o"
    started = time.monotonic()
    stats = run_echo("summarize", data, out, max_tokens=16)  # in process, on the zero-cost backend
    assert time.monotonic() - started < 60  # refused by its length, not tokenized
    assert stats.rows_error == 1 and stats.rows_generated == 2 and stats.calls == 2
    df = pl.read_parquet(out / "results.parquet")
    assert df["status"].to_list() == ["ok", "error", "ok"]
    assert "--n-ctx" in df["error"][1] and "tokens" in df["error"][1] and "--max-chunks" in df["error"][1]
