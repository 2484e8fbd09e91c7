"""What a row job is: its options (`JobConfig`, plain data that travels through Prefect and the
command line alike) and what each kind of job adds to the generic runner (`TaskSpec`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson
import polars as pl

from tokenmill.errors import InputError
from tokenmill.models.family import FAMILIES

DEFAULT_SLOTS = 8  # rows decoded together when --n-seq is not given and the cache size is unknown
MAX_DEFAULT_SLOTS = 16
KV_BUDGET_BYTES = 2 << 30  # the KV cache the default slot count may take
MAX_CHARS_PER_TOKEN = 64  # no real vocabulary averages longer tokens: a longer text cannot fit


@dataclass
class JobConfig:
    """Everything a run needs; plain data so it travels through Prefect and the CLI alike."""

    input: str
    column: str | None = None
    id_column: str | None = None
    model: str | None = None
    out: str | None = None
    prompt: str | None = None
    prompt_family: str | None = None  # None: detected from the model's metadata
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    limit: int | None = None
    n_ctx: int = 4096
    n_seq: int = 0
    n_gpu_layers: int = -1
    n_threads: int = 0  # 0: calibrated or every core, less the cores busy elsewhere (Planner.default_threads)
    backend: str | None = None  # a name in tokenmill.models.registry; None: the model's default (llama, http)
    backend_options: dict = field(default_factory=dict)  # checked by the backend's registry entry
    chunk_size: int = 1024
    part_rows: int = 50_000  # most rows in one results part (a part is also written every second)
    max_words: int = 40
    split_long: bool = True  # summarize: cut a text too long for the context into parts (map-reduce)
    max_chunks: int = 100  # most parts one text may be cut into
    grammar: bool = True  # extract: constrain output with the schema's grammar where the backend can
    max_retries: int = 2  # extract without grammar: new tries after an invalid reply
    schema: str | None = None  # extraction: a JSON Schema file or a job spec holding one
    examples: str | None = None  # extraction: few-shot examples (tokenmill.examples), in the shared prefix
    merge: str | dict | None = None  # extraction with split_long: per-field merge rules (tasks/merge.py)
    labels: str | None = None  # tag: comma-separated labels or a file listing them (tasks/tag.py)
    multi: bool = False  # tag: several labels per row
    hang_timeout_s: float = 300.0
    task_rows: int = 10_000  # rows per Prefect task run (tokenmill/tasks/chunks.py)
    runner: str = "local"  # local: worker processes here; ray: Prefect task runs on a Ray cluster (ray_worker.py)
    ray_address: str | None = None  # --runner ray: the cluster (None: start a local one)
    workers: int = 0  # model workers; 0: one per visible GPU, else one (tokenmill/worker_pool.py)
    strip: bool = True  # strip whitespace around outputs; parsing only, not part of the row key
    retry_errors: bool = True
    cache: bool = True
    cache_dir: str | None = None
    price_input_per_mtok: float = 0.15
    price_output_per_mtok: float = 0.60

    def validate(self) -> None:
        if self.max_tokens <= 0:
            raise InputError(f"--max-tokens must be a positive number of tokens, got {self.max_tokens}")
        if self.max_tokens >= self.n_ctx:
            raise InputError(f"--max-tokens {self.max_tokens} leaves no room for the prompt in --n-ctx {self.n_ctx}; "
                             "raise --n-ctx or lower --max-tokens")
        if self.limit is not None and self.limit <= 0:
            raise InputError(f"--limit must be positive, got {self.limit}")
        if self.temperature < 0:
            raise InputError(f"--temperature must be 0 or more, got {self.temperature}")
        if self.prompt_family is not None and self.prompt_family not in FAMILIES:
            raise InputError(f"--prompt-family {self.prompt_family!r} is unknown; choose one of: {', '.join(FAMILIES)}")
        if self.n_threads < 0:
            raise InputError(f"--threads must be 0 (automatic) or more, got {self.n_threads}")
        if self.chunk_size <= 0:
            raise InputError(f"--chunk-size must be positive, got {self.chunk_size}")
        if self.part_rows <= 0:
            raise InputError(f"--part-rows must be positive, got {self.part_rows}")
        if self.max_chunks <= 0:
            raise InputError(f"--max-chunks must be positive, got {self.max_chunks}")
        if self.task_rows <= 0:
            raise InputError(f"--task-rows must be positive, got {self.task_rows}")
        if self.runner not in ("local", "ray"):
            raise InputError(f"--runner must be local or ray, got {self.runner!r}")
        if self.ray_address and self.runner != "ray":
            raise InputError("--ray-address needs --runner ray")
        if self.workers < 0:
            raise InputError(f"--workers must be 0 (one per visible GPU, else one) or more, got {self.workers}")
        if self.max_retries < 0:
            raise InputError(f"--max-retries must be 0 or more, got {self.max_retries}")


@dataclass
class TaskSpec:
    """What one kind of job adds to the generic runner."""

    name: str  # also the prompts/ subfolder
    output_column: str
    parse: Callable[[str], Any] = str
    output_dtype: Any = pl.String
    stop: list[str] = field(default_factory=list)
    grammar: str | Callable[[int, Callable[[str], int]], str] | None = None  # GBNF constraining every row's
    # output, or grammar(max_tokens, count_text_tokens) giving it once the model's tokenizer is known
    json_schema: dict | None = None  # the schema the grammar was made from, for backends that take schemas
    variables: dict[str, Any] = field(default_factory=dict)  # extra template variables (e.g. schema)
    key: dict[str, Any] = field(default_factory=dict)  # what else identifies a generation (e.g. the schema)
    splits: bool = False  # a text too long for the context is summarized in parts and combined
    merge: Callable[[list[str]], str] | None = None  # parts' replies merged in Python, not by a reduce prompt
    confidence: bool = False  # ask the backend for token log-probabilities: a `confidence` column (tag)
    template: bool = True  # rows are rendered with a task template (batch requests bring their own messages)


def row_key(model_sha: str, prompt: str, params: dict) -> str:
    """Stable identity of one generation: model file, rendered prompt, generation parameters."""
    payload = json.dumps([model_sha, prompt, params], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()



class RowKeys:
    """`row_key(model_sha, prompt, params)` for many prompts with one model and one set of
    params: the same keys, without serializing the params again for every row."""

    def __init__(self, model_sha: str, params: dict):
        self._head = ("[" + json.dumps(model_sha, ensure_ascii=False) + ", ").encode("utf-8")
        self._tail = (", " + json.dumps(params, sort_keys=True, ensure_ascii=False) + "]").encode("utf-8")

    def __call__(self, prompt: str) -> str:
        try:  # orjson writes a string as json.dumps(ensure_ascii=False) does, faster
            text = orjson.dumps(prompt)
        except TypeError:  # a lone surrogate, which orjson refuses
            text = json.dumps(prompt, ensure_ascii=False).encode("utf-8", "surrogatepass")
        return hashlib.sha256(self._head + text + self._tail).hexdigest()
