"""Per-run token and timing statistics, written as one row of OUT/usage.parquet."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone


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
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    _t0: float = field(default_factory=time.perf_counter)

    def add(self, ok: bool, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> None:
        self.rows_total += 1
        self.rows_ok += ok
        self.rows_error += not ok
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cached_tokens += cached_tokens

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
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "wall_s": wall,
            "tokens_per_s": self.tokens / wall if wall > 0 else 0.0,
            "completion_tokens_per_s": self.completion_tokens / wall if wall > 0 else 0.0,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "backend": self.backend,
            "device": self.device,
            **extra,
        }

    def summary_line(self, out: str) -> str:
        wall = self.wall_s
        errors = f" ({self.rows_error} with errors)" if self.rows_error else ""
        return (
            f"{self.rows_total} rows{errors}, {self.prompt_tokens} prompt + {self.completion_tokens} completion tokens, "
            f"{self.tokens / wall if wall > 0 else 0:.1f} tokens/s, {wall:.1f} s; results in {out}"
        )
