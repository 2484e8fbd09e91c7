"""Open an input dataset lazily with Polars and hand out its rows in chunks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import polars as pl

from tokenmill.errors import InputError

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "ndjson", ".ndjson": "ndjson"}
ROW = "__row"  # the row's position in the input, carried through to the results


def scan_input(path: Path) -> pl.LazyFrame:
    """A lazy frame over INPUT, chosen by extension; nothing is read yet."""
    if not path.exists():
        raise InputError(f"input file not found: {path}")
    if path.is_dir():
        raise InputError(f"input {path} is a directory; pass a .parquet, .csv, .jsonl or .ndjson file")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputError(
            f"input {path} has an unknown extension {path.suffix or '(none)'!r}; "
            "use .parquet, .csv, .jsonl or .ndjson"
        )
    if path.stat().st_size == 0:
        raise InputError(f"input {path} is empty (0 bytes)")
    if kind == "parquet":
        return pl.scan_parquet(path)
    if kind == "csv":
        return pl.scan_csv(path, infer_schema_length=10_000)
    return pl.scan_ndjson(path, infer_schema_length=10_000)


def _describe_read_error(path: Path, exc: Exception) -> InputError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InputError(f"cannot read {path}: {first_line}")


@dataclass
class InputTable:
    """An input file, its text column and id column, read in chunks of `chunk_size` rows."""

    path: Path
    column: str
    id_column: str | None
    schema: pl.Schema
    rows: int
    limit: int | None = None

    @classmethod
    def open(cls, path: Path, column: str | None, id_column: str | None, limit: int | None = None) -> "InputTable":
        lf = scan_input(path)
        try:
            schema = lf.collect_schema()
            rows = lf.select(pl.len()).collect().item()
        except Exception as exc:  # Polars raises several types for corrupt or malformed files
            raise _describe_read_error(path, exc) from None
        if not schema:
            raise InputError(f"input {path} has no columns")
        chosen = choose_text_column(schema, column, path)
        if id_column is not None and id_column not in schema:
            raise InputError(f"--id-column {id_column!r} is not a column of {path}; columns: {', '.join(schema)}")
        if limit is not None:
            rows = min(rows, limit)
        if rows == 0:
            raise InputError(f"input {path} has no rows")
        return cls(path, chosen, id_column, schema, rows, limit)

    @property
    def columns(self) -> list[str]:
        return list(self.schema)

    def chunks(self, chunk_size: int) -> Iterator[pl.DataFrame]:
        """Yield DataFrames of at most `chunk_size` rows, with the row position in `__row`."""
        lf = scan_input(self.path).with_row_index(ROW)
        if self.limit is not None:
            lf = lf.head(self.limit)
        try:
            for batch in lf.collect_batches(chunk_size=chunk_size, lazy=True):
                # The streaming engine may hand back larger batches; keep ours bounded.
                for start in range(0, batch.height, chunk_size):
                    yield batch.slice(start, chunk_size)
        except InputError:
            raise
        except Exception as exc:
            raise _describe_read_error(self.path, exc) from None


def choose_text_column(schema: pl.Schema, column: str | None, path: Path) -> str:
    """--column if given, else `text`, else the only string column, else a clear error."""
    strings = [name for name, dtype in schema.items() if dtype == pl.String]
    if column is not None:
        if column not in schema:
            raise InputError(f"--column {column!r} is not a column of {path}; columns: {', '.join(schema)}")
        return column
    if "text" in schema:
        return "text"
    if len(strings) == 1:
        return strings[0]
    if not strings:
        raise InputError(f"{path} has no string column to summarize; columns: {', '.join(schema)}; pass --column")
    raise InputError(
        f"{path} has several string columns ({', '.join(strings)}) and none is named 'text'; "
        "choose one with --column"
    )
