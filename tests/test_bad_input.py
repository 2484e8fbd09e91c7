"""Bad input ends in a one-line error naming the problem, no traceback, and nothing generated."""

from __future__ import annotations

import polars as pl
import pytest

from tests.conftest import assert_one_line_error


def _assert_clean_failure(result, *needles: str) -> str:
    line = assert_one_line_error(result, *needles)
    assert line.startswith("python -m flows.summarize: error: ")
    return line


@pytest.fixture(scope="module")
def two_text_columns(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "two.csv"
    pl.DataFrame({"title": ["a", "b"], "body": ["first text", "second text"]}).write_csv(path)
    return path


def test_missing_column_names_the_column_and_the_available_ones(run_cli_here, two_text_columns, tmp_path):
    result = run_cli_here("summarize", str(two_text_columns), "--column", "abstract", "--out", str(tmp_path / "o"))
    _assert_clean_failure(result, "'abstract'", "title", "body")


def test_ambiguous_column_lists_the_string_columns(run_cli_here, two_text_columns, tmp_path):
    result = run_cli_here("summarize", str(two_text_columns), "--out", str(tmp_path / "o"))
    _assert_clean_failure(result, "title", "body", "--column")


def test_empty_file_is_refused(run_cli_here, tmp_path):
    path = tmp_path / "empty.parquet"
    path.write_bytes(b"")
    result = run_cli_here("summarize", str(path), "--out", str(tmp_path / "o"))
    _assert_clean_failure(result, str(path), "empty")


def test_header_only_csv_has_no_rows(run_cli_here, tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("id,text\n")
    result = run_cli_here("summarize", str(path), "--out", str(tmp_path / "o"))
    _assert_clean_failure(result, str(path), "no rows")


def test_unknown_extension_is_refused(run_cli_here, tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("not really")
    result = run_cli_here("summarize", str(path), "--out", str(tmp_path / "o"))
    _assert_clean_failure(result, "'.xlsx'", ".parquet")


def test_template_with_a_missing_variable_fails_before_any_row(run_cli_here, scitldr_parquet, tmp_path):
    template = tmp_path / "mine.j2"
    template.write_text("Summarize {{ text }} for {{ audience }}.")
    out = tmp_path / "o"
    result = run_cli_here("summarize", str(scitldr_parquet), "--prompt", str(template), "--out", str(out))
    _assert_clean_failure(result, str(template), "'audience'", "paper_id")
    assert not (out / "results.parquet").exists()
    assert not list(out.glob("parts/*.parquet"))


def test_missing_model_file_is_named(run_cli_here, scitldr_parquet, tmp_path):
    result = run_cli_here("summarize", str(scitldr_parquet), "--model", str(tmp_path / "nope.gguf"),
                      "--out", str(tmp_path / "o"))
    _assert_clean_failure(result, "nope.gguf", "not found")
