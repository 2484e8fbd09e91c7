"""Results go to Parquet parts while a run goes, atomically, and are merged at the end."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from tokenmill.contract import PARTS_DIR
from tokenmill.errors import OutputError


def _reason(exc: Exception) -> str:
    """The OS's words for a failed write; Polars wraps them in its own message."""
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split("underlying IO error: ")[-1].split(" (os error")[0]


def _write_failure(exc: Exception, folder: Path) -> str:
    """Why a write failed. Where the disk filled, Polars may report only the damage it did to
    the file (an "Invalid thrift" error, say): then the folder's free space says what happened."""
    reason = _reason(exc)
    if getattr(exc, "errno", None) is None and "No space left" not in reason:
        try:
            if shutil.disk_usage(folder).free < 1 << 20:
                return f"No space left on device ({reason})"
        except OSError:
            pass
    return reason


def write_atomic(df: pl.DataFrame, path: Path) -> None:
    """Write to a temporary name, fsync, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        df.write_parquet(tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, pl.exceptions.PolarsError) as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"cannot write {path}: {_write_failure(exc, path.parent)}; files already written in {path.parent} are kept; "
            "free space or fix the folder, then run the same command again to continue") from None


def prepare_out_dir(out: Path) -> Path:
    """Create OUT and OUT/parts, failing early with a clear message when OUT is unusable."""
    try:
        (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out}: {exc.strerror or exc}; choose another with --out") from None
    if not os.access(out, os.W_OK):
        raise OutputError(f"output folder {out} is not writable; choose another with --out")
    return out


class PartWriter:
    """This run's numbered Parquet parts under OUT/parts/, one per finished chunk of rows."""

    def __init__(self, out: Path, run_id: str):
        self.dir = out / PARTS_DIR
        self.prefix = f"part-{run_id[:8]}"
        self.count = 0

    def write(self, df: pl.DataFrame) -> Path:
        path = self.dir / f"{self.prefix}-{self.count:06d}.parquet"
        write_atomic(df, path)
        self.count += 1
        return path

    def merge(self, target: Path, order_by: str) -> None:
        """Merge this run's parts into `target` in `order_by` order, then remove every part.

        This run's parts hold a result for every input row (rows reused from earlier runs
        included), so parts left by earlier, killed runs are no longer needed.
        """
        mine = sorted(self.dir.glob(f"{self.prefix}-*.parquet"))
        if mine:
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            try:
                merge_sorted(mine, tmp, order_by)
                with tmp.open("rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except (OSError, pl.exceptions.PolarsError, pa.ArrowException) as exc:
                tmp.unlink(missing_ok=True)
                raise OutputError(f"cannot write {target}: {_reason(exc)}; the parts in {self.dir} are kept; "
                                  "free space, then run the same command again to finish") from None
        for part in self.dir.glob("*.parquet"):
            part.unlink()
        try:
            self.dir.rmdir()
        except OSError:
            pass  # something else lives there: leave it


MERGE_WINDOW = 100_000  # rows sorted in memory at once by merge_sorted (about 50 MB of results)


def merge_sorted(parts: list[Path], target: Path, order_by: str, window: int | None = None) -> None:
    """Write the rows of `parts` to `target` ordered by the integer column `order_by`, holding
    at most about `window` rows in memory: rows finish out of order, so each part is sorted on
    its own and the output is built one range of `order_by` at a time (Parquet statistics let
    each range read only the parts that overlap it)."""
    window = window or MERGE_WINDOW
    scan = pl.scan_parquet(parts)
    bounds = scan.select(pl.col(order_by).min().alias("lo"), pl.col(order_by).max().alias("hi")).collect()
    lo, hi = bounds["lo"][0], bounds["hi"][0]
    schema = scan.collect_schema()
    writer = None
    try:
        start = lo if lo is not None else 0
        while True:
            chunk = (scan.filter((pl.col(order_by) >= start) & (pl.col(order_by) < start + window)).collect()
                     .sort(order_by) if lo is not None else pl.DataFrame(schema=schema))
            table = chunk.to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(target, table.schema)
            writer.write_table(table)
            start += window
            if lo is None or start > hi:
                break
    finally:
        if writer is not None:
            writer.close()


def append_row(path: Path, row: dict) -> pl.DataFrame:
    """Append one row to a small Parquet table (e.g. usage.parquet), atomically."""
    new = pl.DataFrame([row])
    if path.exists():
        new = pl.concat([pl.read_parquet(path), new], how="diagonal_relaxed")
    write_atomic(new, path)
    return new
