"""The generic row job: input rows -> prompts -> model worker -> Parquet parts -> results.

A task (summarize, later extract) supplies its template, its output column and how to
turn generated text into that column; everything else lives here once.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import polars as pl
from tqdm import tqdm

from tokenmill.errors import InputError, TemplateError
from tokenmill.io.parts import PartWriter, append_row, prepare_out_dir
from tokenmill.io.readers import ROW, InputTable
from tokenmill.models.base import Completion, GenerationRequest, ModelSettings
from tokenmill.models.gguf_info import ModelInfo
from tokenmill.models.resolve import model_sha256, resolve_model
from tokenmill.pool import ModelWorker
from tokenmill.prompts import STANDARD_VARIABLES, ChatTemplate, TaskTemplate, load_task_template
from tokenmill.usage import RunStats


@dataclass
class JobConfig:
    """Everything a run needs; plain data so it travels through Prefect and the CLI alike."""

    input: str
    column: str | None = None
    id_column: str | None = None
    model: str | None = None
    out: str | None = None
    prompt: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    limit: int | None = None
    n_ctx: int = 4096
    n_seq: int = 0
    n_gpu_layers: int = -1
    backend: str = "llama"
    chunk_size: int = 32
    max_words: int = 40
    hang_timeout_s: float = 300.0

    def validate(self) -> None:
        if self.max_tokens <= 0:
            raise InputError(f"--max-tokens must be a positive number of tokens, got {self.max_tokens}")
        if self.limit is not None and self.limit <= 0:
            raise InputError(f"--limit must be positive, got {self.limit}")
        if self.temperature < 0:
            raise InputError(f"--temperature must be 0 or more, got {self.temperature}")
        if self.chunk_size <= 0:
            raise InputError(f"--chunk-size must be positive, got {self.chunk_size}")


@dataclass
class TaskSpec:
    """What one kind of job adds to the generic runner."""

    name: str  # also the prompts/ subfolder
    output_column: str
    parse: Callable[[str], Any] = str.strip
    output_dtype: Any = pl.String
    stop: list[str] = field(default_factory=list)


def row_key(model_sha: str, prompt: str, params: dict) -> str:
    """Stable identity of one generation: model file, rendered prompt, generation parameters."""
    payload = json.dumps([model_sha, prompt, params], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _default_out(input_path: Path, task: str) -> Path:
    return input_path.parent / f"{input_path.stem}.{task}"


class Job:
    """A prepared run: input opened, model identified, templates checked, output folder ready."""

    def __init__(self, config: JobConfig, task: TaskSpec):
        config.validate()
        self.config = config
        self.task = task
        self.table = InputTable.open(Path(config.input), config.column, config.id_column, config.limit)
        self.model_path = resolve_model(config.model)
        self.model_info = ModelInfo(self.model_path)
        self.template = load_task_template(task.name, config.prompt)
        self.template.check_variables(set(self.table.columns) | STANDARD_VARIABLES)
        self.chat = self._chat_template()
        self.out = prepare_out_dir(Path(config.out) if config.out else _default_out(Path(config.input), task.name))
        self.model_sha = model_sha256(self.model_path)
        self.params = {
            "max_tokens": config.max_tokens, "temperature": config.temperature, "seed": config.seed,
            "stop": task.stop, "task": task.name,
        }
        first = next(self.table.chunks(1)).row(0, named=True)
        self.render(first)  # a template that cannot render the first row fails before any generation

    def _chat_template(self) -> ChatTemplate | None:
        source = self.model_info.chat_template
        if not source:
            return None
        return ChatTemplate(source, self.model_info.bos_token, self.model_info.eos_token,
                            name=f"the chat template inside {self.model_path.name}")

    def settings(self) -> ModelSettings:
        c = self.config
        return ModelSettings(model_path=str(self.model_path), n_ctx=c.n_ctx, n_seq=c.n_seq,
                             n_gpu_layers=c.n_gpu_layers, backend=c.backend)

    def render(self, row: dict) -> str:
        """The full prompt for one row: task template, then the model's chat template."""
        variables = {**row, "text": row.get(self.table.column), "row": row, "max_words": self.config.max_words}
        variables.pop(ROW, None)
        user = self.template.render(variables).strip()
        if self.chat is None:
            return user
        prompt = self.chat.wrap(user)
        # The tokenizer adds BOS itself; a template that also writes it would double it.
        bos = self.model_info.bos_token
        if bos and self.model_info.adds_bos and prompt.startswith(bos):
            prompt = prompt[len(bos):]
        return prompt

    def run(self, progress: bool = True, run_id: str | None = None,
            on_chunk: Callable[[RunStats], None] | None = None) -> RunStats:
        """Generate every row, writing parts as they finish; then merge and record usage."""
        stats = RunStats(model=self.model_info.name, model_sha256=self.model_sha, backend=self.config.backend)
        if run_id:
            stats.run_id = run_id
        worker = ModelWorker(self.settings(), hang_timeout_s=self.config.hang_timeout_s)
        writer = PartWriter(self.out)
        buffered: list[dict] = []
        meta: dict[int, dict] = {}
        bar = tqdm(total=self.table.rows, unit="row", file=sys.stderr, disable=not progress, dynamic_ncols=True)
        try:
            stats.device = worker.start()
            for result in self._results(worker, meta):
                buffered.append(result)
                stats.add(result["status"] == "ok", result["prompt_tokens"], result["completion_tokens"],
                          result["cached_tokens"])
                bar.update(1)
                bar.set_postfix_str(f"{stats.tokens / max(stats.wall_s, 1e-9):.0f} tok/s", refresh=False)
                if len(buffered) >= self.config.chunk_size:
                    writer.write(self._frame(buffered))
                    buffered.clear()
                    if on_chunk:
                        on_chunk(stats)
            if buffered:
                writer.write(self._frame(buffered))
        finally:
            bar.close()
            worker.close()
        writer.merge(self.out / "results.parquet", order_by="row")
        append_row(self.out / "usage.parquet", stats.row(input=str(self.config.input), task=self.task.name,
                                                         params=json.dumps(self.params)))
        return stats

    def _requests(self, meta: dict[int, dict], immediate: list[dict]) -> Iterator[GenerationRequest]:
        """Render rows chunk by chunk; rows that cannot be sent become error results at once."""
        c = self.config
        for chunk in self.table.chunks(c.chunk_size):
            for row in chunk.iter_rows(named=True):
                index = row[ROW]
                ident = row[c.id_column] if c.id_column else index
                info = {"row": index, "id": ident, "row_key": None}
                meta[index] = info
                text = row.get(self.table.column)
                if text is None or (isinstance(text, str) and not text.strip()):
                    immediate.append(self._error_result(info, f"column {self.table.column!r} is empty in this row"))
                    continue
                try:
                    prompt = self.render(row)
                except TemplateError as exc:
                    immediate.append(self._error_result(info, str(exc)))
                    continue
                info["row_key"] = row_key(self.model_sha, prompt, self.params)
                yield GenerationRequest(index=index, prompt=prompt, max_tokens=c.max_tokens,
                                        temperature=c.temperature, seed=c.seed, stop=list(self.task.stop))

    def _results(self, worker: ModelWorker, meta: dict[int, dict]) -> Iterator[dict]:
        immediate: list[dict] = []
        window = max(64, 4 * (self.config.n_seq or 16))
        for completion in worker.run(self._requests(meta, immediate), window=window):
            while immediate:
                yield immediate.pop()
            yield self._result(meta.pop(completion.index), completion)
        yield from immediate

    def _result(self, info: dict, c: Completion) -> dict:
        ok = c.finish_reason != "error"
        output, error = None, c.error
        if ok:
            try:
                output = self.task.parse(c.text or "")
            except Exception as exc:  # a parser failure keeps the row, as an error with its raw text
                ok, error = False, f"could not parse the model's output: {exc}"
        return {
            **info, self.task.output_column: output, "status": "ok" if ok else "error", "error": error,
            "finish_reason": c.finish_reason, "raw_output": c.text,
            "prompt_tokens": c.prompt_tokens, "cached_tokens": c.cached_tokens,
            "completion_tokens": c.completion_tokens,
            "latency_ms": c.queue_ms + c.prompt_ms + c.decode_ms,
            "queue_ms": c.queue_ms, "prompt_ms": c.prompt_ms, "decode_ms": c.decode_ms,
            "model": self.model_info.name,
        }

    def _error_result(self, info: dict, message: str) -> dict:
        return self._result(info, Completion(info["row"], None, "error", message))

    def _frame(self, rows: list[dict]) -> pl.DataFrame:
        id_dtype = self.table.schema[self.config.id_column] if self.config.id_column else pl.Int64
        schema = {
            "row": pl.Int64, "id": id_dtype, "row_key": pl.String, self.task.output_column: self.task.output_dtype,
            "status": pl.String, "error": pl.String, "finish_reason": pl.String, "raw_output": pl.String,
            "prompt_tokens": pl.Int64, "cached_tokens": pl.Int64, "completion_tokens": pl.Int64,
            "latency_ms": pl.Float64, "queue_ms": pl.Float64, "prompt_ms": pl.Float64, "decode_ms": pl.Float64,
            "model": pl.String,
        }
        return pl.DataFrame(rows, schema=schema)
