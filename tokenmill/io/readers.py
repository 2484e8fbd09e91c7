"""Open an input dataset lazily with Polars and hand out its rows in chunks."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import polars as pl

from tokenmill.errors import InputError

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "ndjson", ".ndjson": "ndjson"}
ROW = "__row"  # the row's position in the input, carried through to the results


def input_files(spec: str | Path) -> list[Path]:
    """INPUT as a list of files: one file, every data file of a directory, or a glob pattern."""
    text = str(spec)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text))
        if not files:
            raise InputError(f"no file matches the pattern {text}")
    elif Path(text).is_dir():
        files = sorted(p for p in Path(text).iterdir() if p.suffix.lower() in FORMATS)
        if not files:
            raise InputError(f"input folder {text} holds no .parquet, .csv, .jsonl or .ndjson file")
    else:
        files = [Path(text)]
    kinds = {FORMATS.get(p.suffix.lower()) for p in files}
    if len(kinds) > 1:
        raise InputError(f"input {text} mixes file types ({', '.join(sorted(str(k) for k in kinds))}); "
                         "point INPUT at files of one type")
    return files


def scan_input(path: Path) -> pl.LazyFrame:
    """A lazy frame over one input file, chosen by extension; nothing is read yet."""
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


def scan_inputs(files: list[Path]) -> pl.LazyFrame:
    """One lazy frame over every input file, in order; their schemas must agree."""
    frames = [scan_input(p) for p in files]
    if len(frames) == 1:
        return frames[0]
    first = _schema(frames[0], files[0])
    for frame, path in zip(frames[1:], files[1:]):
        schema = _schema(frame, path)
        if schema != first:
            diff = sorted(set(first.items()) ^ set(schema.items()))
            raise InputError(f"{path} does not have the same columns as {files[0]} "
                             f"(differences: {', '.join(f'{n}: {t}' for n, t in diff)}); "
                             "inputs read together must share one schema")
    return pl.concat(frames, how="vertical")


def _schema(frame: pl.LazyFrame, path: Path) -> pl.Schema:
    try:
        return frame.collect_schema()
    except Exception as exc:  # Polars raises several types for corrupt or malformed files
        raise _describe_read_error(path, exc) from None


def _describe_read_error(path: Path, exc: Exception) -> InputError:
    message = str(exc).strip()
    first_line = message.splitlines()[0] if message else type(exc).__name__
    if "utf-8" in message.lower() or "utf8" in message.lower():
        return InputError(f"cannot read {path}: it is not valid UTF-8 text ({first_line}); "
                          "re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8")
    return InputError(f"cannot read {path}: {first_line}")


@dataclass
class InputTable:
    """An input file, its text column and id column, read in chunks of `chunk_size` rows."""

    path: Path  # INPUT as given, for messages
    files: list[Path]
    column: str
    id_column: str | None
    schema: pl.Schema
    rows: int
    limit: int | None = None

    @classmethod
    def open(cls, path: Path, column: str | None, id_column: str | None, limit: int | None = None) -> "InputTable":
        files = input_files(path)
        lf = scan_inputs(files)
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
        return cls(path, files, chosen, id_column, schema, rows, limit)

    @property
    def columns(self) -> list[str]:
        return list(self.schema)

    def chunks(self, chunk_size: int) -> Iterator[pl.DataFrame]:
        """Yield DataFrames of at most `chunk_size` rows, with the row position in `__row`.

        Files are read a batch at a time with pyarrow's streaming readers (Polars' batched
        collect reads far ahead of its consumer: about 500 MB held for a 3-million-row file),
        so memory does not grow with the input; batches are cast to the schema Polars inferred."""
        offset, left = 0, self.limit
        try:
            for path in self.files:
                for batch in _stream(path, self.schema, max(chunk_size, READ_BATCH)):
                    for start in range(0, batch.height, chunk_size):
                        piece = batch.slice(start, chunk_size if left is None else min(chunk_size, left))
                        yield piece.with_row_index(ROW, offset=offset)
                        offset += piece.height
                        if left is not None:
                            left -= piece.height
                            if left <= 0:
                                return
        except InputError:
            raise
        except Exception as exc:
            raise _describe_read_error(self.path, exc) from None


READ_BATCH = 4096  # rows per streaming read; chunks are sliced from them


def _stream(path: Path, schema: pl.Schema, rows: int) -> Iterator[pl.DataFrame]:
    """One input file as DataFrames of about `rows` rows, never the whole file at once."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    kind = FORMATS[path.suffix.lower()]
    arrow_schema = pl.DataFrame(schema=schema).to_arrow().schema
    if kind == "parquet":
        reader = pq.ParquetFile(path).iter_batches(batch_size=rows, columns=list(schema))
    elif kind == "csv":
        # as Polars reads CSV: quoted fields may hold newlines, an empty field is null
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 22),
                                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                                convert_options=pacsv.ConvertOptions(column_types=arrow_schema,
                                                                     strings_can_be_null=True,
                                                                     quoted_strings_can_be_null=False))
    else:
        reader = pajson.open_json(path, read_options=pajson.ReadOptions(block_size=1 << 22),
                                  parse_options=pajson.ParseOptions(explicit_schema=arrow_schema,
                                                                    unexpected_field_behavior="ignore"))
    for batch in reader:
        frame = pl.from_arrow(pa.Table.from_batches([batch]))
        yield frame.select(list(schema)).cast(dict(schema))


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
