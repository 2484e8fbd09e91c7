"""OUT/output.jsonl and OUT/errors.jsonl in OpenAI's batch output format, from results.parquet.

As OpenAI splits them: `output.jsonl` holds the requests that were answered (status 200, a
`chat.completion` or `text_completion` body), `errors.jsonl` those that failed (a 400 for a
request tokenmill cannot run, naming the field; a 500 for a failure in the engine), each in
input order. Together they hold every custom_id once. Rewritten whole, atomically, after every
run, so a killed run leaves the files of the run before it and the next run completes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import IO

import polars as pl

from tokenmill.errors import OutputError
from tokenmill.contract import RESULTS_FILE
from tokenmill.tasks.batch_requests import CHAT

OUTPUT_FILE, ERRORS_FILE = "output.jsonl", "errors.jsonl"


def _id(*parts: object) -> str:
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()[:32]


def _body(row: dict, url: str, created: int, fingerprint: str) -> dict:
    key = row["row_key"]
    usage = {"prompt_tokens": row["prompt_tokens"], "completion_tokens": row["completion_tokens"],
             "total_tokens": row["prompt_tokens"] + row["completion_tokens"],
             "prompt_tokens_details": {"cached_tokens": row["cached_tokens"]}}
    if url == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": row["content"], "refusal": None},
                  "logprobs": None, "finish_reason": row["finish_reason"]}
        kind, prefix = "chat.completion", "chatcmpl-"
    else:
        choice = {"index": 0, "text": row["content"], "logprobs": None, "finish_reason": row["finish_reason"]}
        kind, prefix = "text_completion", "cmpl-"
    return {"id": prefix + key[:29], "object": kind, "created": created, "model": row["model"], "choices": [choice],
            "usage": usage, "system_fingerprint": fingerprint}


def _failure(row: dict, refusal: tuple[int, dict] | None) -> tuple[int, dict]:
    if refusal is not None:
        return refusal
    return 500, {"message": row["error"] or "the request failed", "type": "server_error", "param": None, "code": None}


def write_outputs(job) -> tuple[int, int]:
    """Write both files for a finished run of `job` (a BatchJob); returns (answered, failed)."""
    results = pl.read_parquet(job.out / RESULTS_FILE).sort("row")
    requests = job.table.frame
    created = int(time.time())
    fingerprint = f"tokenmill-{job.model_sha[:12]}"
    counts = [0, 0]
    with _Atomic(job.out / OUTPUT_FILE) as ok, _Atomic(job.out / ERRORS_FILE) as failed:
        for row in results.iter_rows(named=True):
            request = requests.row(row["row"], named=True)
            custom_id = request["custom_id"]
            line = {"id": f"batch_req_{_id(custom_id, request['line'], row['row_key'])}", "custom_id": custom_id}
            request_id = f"req_{_id(custom_id, row['row_key'], row['run_id'])}"
            if row["status"] == "ok":
                response = {"status_code": 200, "request_id": request_id,
                            "body": _body(row, request["url"], created, fingerprint)}
                target, counts[0] = ok, counts[0] + 1
            else:
                status, error = _failure(row, job.refusal(row["row"]))
                response = {"status_code": status, "request_id": request_id, "body": {"error": error}}
                target, counts[1] = failed, counts[1] + 1
            target.write(json.dumps({**line, "response": response, "error": None}, ensure_ascii=False) + "\n")
    return counts[0], counts[1]


class _Atomic:
    """A text file written under a temporary name, fsynced, then renamed into place."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.fh: IO[str] | None = None

    def __enter__(self) -> IO[str]:
        try:
            self.fh = self.tmp.open("w", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        return self.fh

    def __exit__(self, kind, exc, tb) -> None:
        try:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            if kind is None:
                os.replace(self.tmp, self.path)
        except OSError as err:
            raise OutputError(f"cannot write {self.path}: {err.strerror or err}; results.parquet is kept: "
                              "run the same command again to write it") from None
        finally:
            self.tmp.unlink(missing_ok=True)
