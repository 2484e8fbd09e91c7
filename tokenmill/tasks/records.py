"""One results.parquet row, built from a completion or from a stored record (columns: tokenmill.contract)."""

from __future__ import annotations

import math
from typing import Any, Callable

from tokenmill.contract import CACHED, DUPLICATE, GENERATED, REUSABLE, SKIPPED, results_schema  # noqa: F401
from tokenmill.models.base import Completion



def from_completion(info: dict, c: Completion, model: str, run_id: str) -> dict:
    """A stored-record view of a fresh completion (before parsing)."""
    return {
        **info, "raw_output": c.text, "finish_reason": c.finish_reason, "error": c.error,
        "prompt_tokens": c.prompt_tokens, "cached_tokens": c.cached_tokens, "completion_tokens": c.completion_tokens,
        "latency_ms": c.queue_ms + c.prompt_ms + c.decode_ms, "queue_ms": c.queue_ms, "prompt_ms": c.prompt_ms,
        "decode_ms": c.decode_ms, "model": model, "run_id": run_id,
        # sent to the model, whatever came back: a row that failed there (a server that went away, a
        # worker that died twice) is retried by the next run, unlike a row never sent (SKIPPED)
        "produced": GENERATED,
        "confidence": math.exp(c.logprob) if c.logprob is not None else None,
    }


def finish(record: dict, info: dict, output_column: str, parse: Callable[[str], Any],
           produced: str | None = None) -> dict:
    """The results row: the stored record for this input row, its raw output parsed now."""
    row = {**record, **info}
    if produced is not None:
        row["produced"] = produced
    output, error = None, record.get("error")
    if record["finish_reason"] in REUSABLE:
        try:
            output, error = parse(record["raw_output"] or ""), None
        except Exception as exc:  # a parser failure keeps the row, as an error with its raw text
            error = f"could not parse the model's output: {exc}"
    row[output_column] = output
    row["error"] = error
    row["status"] = "ok" if error is None else "error"
    return row
