"""Per-run token and timing statistics, written as one row of OUT/usage.parquet."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone


def _rate(counters: dict, tokens: str, seconds: str) -> float | None:
    return counters[tokens] / counters[seconds] if counters.get(seconds) else None


@dataclass
class RunStats:
    """Counters for one run; `add` is called once per finished row."""

    model: str
    model_sha256: str
    backend: str
    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    device: str = "unknown"
    rows_total: int = 0
    rows_ok: int = 0
    rows_error: int = 0
    rows_generated: int = 0  # sent to the model in this run
    rows_cached: int = 0  # found in the cross-run cache
    rows_duplicate: int = 0  # same key as another row of this input
    rows_resumed: int = 0  # already in the output folder from an earlier run
    rows_skipped: int = 0  # never sent: empty text or a template error
    prompt_tokens: int = 0  # tokens the model processed in this run
    cached_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0  # model calls: one per row, more for long texts and extraction retries
    tokens_saved: int = 0  # prompt + completion tokens of rows reused instead of generated
    engine: dict = field(default_factory=dict)  # the backend's own counters (per-phase decode time)
    _t0: float = field(default_factory=time.perf_counter)

    def add_generation(self, completion) -> None:
        """Count what the model did for one request."""
        self.calls += 1
        self.prompt_tokens += completion.prompt_tokens
        self.cached_tokens += completion.cached_tokens
        self.completion_tokens += completion.completion_tokens

    def add_result(self, result: dict) -> None:
        """Count one finished results row by status and by how it was produced."""
        self.rows_total += 1
        self.rows_ok += result["status"] == "ok"
        self.rows_error += result["status"] != "ok"
        produced, mine = result.get("produced"), result.get("run_id") == self.run_id
        if produced == "skipped":
            self.rows_skipped += 1
            return
        if produced == "generated" and mine:
            self.rows_generated += 1
            return
        if produced == "cached":
            self.rows_cached += 1
        elif produced == "duplicate" and mine:
            self.rows_duplicate += 1
        else:
            self.rows_resumed += 1
        self.tokens_saved += (result.get("prompt_tokens") or 0) + (result.get("completion_tokens") or 0)

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self._t0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def row(self, **extra) -> dict:
        """The usage.parquet row: totals, throughput, model identity and device."""
        wall = self.wall_s
        return {
            "run_id": self.run_id,
            "started_at": self.started_at,
            "ended_at": datetime.now(timezone.utc),
            "rows_total": self.rows_total,
            "rows_ok": self.rows_ok,
            "rows_error": self.rows_error,
            "rows_generated": self.rows_generated,
            "rows_cached": self.rows_cached,
            "rows_duplicate": self.rows_duplicate,
            "rows_resumed": self.rows_resumed,
            "rows_skipped": self.rows_skipped,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "calls": self.calls,
            "tokens_saved": self.tokens_saved,
            "wall_s": wall,
            "tokens_per_s": self.tokens / wall if wall > 0 else 0.0,
            "completion_tokens_per_s": self.completion_tokens / wall if wall > 0 else 0.0,
            # per phase, from the engine's own timing of its llama_decode calls (null when unknown)
            "prefill_tokens_per_s": _rate(self.engine, "prompt_tokens", "prompt_s"),
            "decode_tokens_per_s": _rate(self.engine, "generated_tokens", "generate_s"),
            "model": self.model,
            "model_sha256": self.model_sha256,
            "backend": self.backend,
            "device": self.device,
            **extra,
        }

    def summary_line(self, out: str) -> str:
        wall = self.wall_s
        errors = f", {self.rows_error} with errors" if self.rows_error else ""
        reused = self.rows_total - self.rows_generated - self.rows_skipped
        return (
            f"{self.rows_total} rows ({self.rows_generated} generated, {reused} reused{errors}), {self.prompt_tokens} prompt + {self.completion_tokens} completion tokens, "
            f"{self.tokens / wall if wall > 0 else 0:.1f} tokens/s, {wall:.1f} s; results in {out}"
        )


@dataclass
class Prices:
    """What a paid API would charge, in USD per million tokens: an estimate, not a bill.

    The defaults are a small hosted model's list prices (input 0.15, output 0.60); set your
    own per job. Only tokens generated in the run count.
    """

    input_per_mtok: float = 0.15
    output_per_mtok: float = 0.60

    def estimate(self, stats: RunStats) -> dict:
        cost = (stats.prompt_tokens * self.input_per_mtok + stats.completion_tokens * self.output_per_mtok) / 1e6
        return {"cost_avoided_usd": cost, "cost_estimate_basis": (
            f"estimate: {self.input_per_mtok} USD/M input tokens, {self.output_per_mtok} USD/M output tokens")}
