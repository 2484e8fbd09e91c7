"""The generic row job: input rows -> prompts -> model worker -> Parquet parts -> results.

A task (summarize, later extract) supplies its template, its output column and how to
turn generated text into that column; everything else lives here once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import polars as pl
from tqdm import tqdm

from tokenmill.errors import InputError, OutputError, TemplateError
from tokenmill.io.parts import PartWriter, append_row, prepare_out_dir
from tokenmill.io.readers import ROW, InputTable
from tokenmill.ledger import RESULTS_FILE, Ledger, OutputLock, ResultCache, default_cache_dir
from tokenmill.models.base import GenerationRequest, ModelSettings
from tokenmill.models.gguf_info import ModelInfo
from tokenmill.models.resolve import model_sha256, resolve_model
from tokenmill.pool import DEFAULT_RUNTIME, ModelWorker, capability, make_worker, supports_grammar
from tokenmill.models.family import FAMILIES, detect_family
from tokenmill.prompts import STANDARD_VARIABLES, TASK_VARIABLES, ChatTemplate, load_task_template
from tokenmill.tasks.longdoc import SAMPLE_CHARS, DoesNotFit, part_prompts, refuse_oversized
from tokenmill.tasks.plans import Call, MapReduce, MergeParts, Repair, RetryAtLimit, SingleCall
from tokenmill.tasks.records import CACHED, DUPLICATE, SKIPPED, finish, from_completion, results_schema
from tokenmill.usage import Prices, RunStats


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
    n_threads: int = 0  # 0: every core (models.base.default_threads)
    backend: str = "llama"
    chunk_size: int = 32
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
        if self.max_chunks <= 0:
            raise InputError(f"--max-chunks must be positive, got {self.max_chunks}")
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
    variables: dict[str, Any] = field(default_factory=dict)  # extra template variables (e.g. schema)
    key: dict[str, Any] = field(default_factory=dict)  # what else identifies a generation (e.g. the schema)
    splits: bool = False  # a text too long for the context is summarized in parts and combined
    merge: Callable[[list[str]], str] | None = None  # parts' replies merged in Python, not by a reduce prompt
    confidence: bool = False  # ask the backend for token log-probabilities: a `confidence` column (tag)


def row_key(model_sha: str, prompt: str, params: dict) -> str:
    """Stable identity of one generation: model file, rendered prompt, generation parameters."""
    payload = json.dumps([model_sha, prompt, params], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _default_out(input_spec: str, task: str) -> Path:
    """A folder beside INPUT named after it; for a glob, beside the files it matches."""
    path = Path(input_spec)
    if any(ch in input_spec for ch in "*?["):
        return path.parent / f"input.{task}"
    return path.parent / f"{path.name if path.is_dir() else path.stem}.{task}"


def check_out_dir_task(out: Path, task: str) -> None:
    """Refuse an output folder that holds another kind of job's results."""
    usage = out / "usage.parquet"
    if not usage.exists():
        return
    try:
        tasks = set(pl.read_parquet(usage, columns=["task"])["task"].drop_nulls().to_list())
    except Exception:
        raise OutputError(f"output folder {out} holds an unreadable usage.parquet; choose another --out") from None
    if tasks and task not in tasks:
        raise OutputError(f"output folder {out} holds results of a {'/'.join(sorted(tasks))} job, not {task}; "
                          "choose another --out")


class Job:
    """A prepared run: input opened, model identified, templates checked, output folder ready."""

    def __init__(self, config: JobConfig, task: TaskSpec, create_out: bool = True):
        config.validate()
        self.config = config
        self.task = task
        self.table = InputTable.open(Path(config.input), config.column, config.id_column, config.limit)
        self.model_path = resolve_model(config.model)
        self.model_info = ModelInfo(self.model_path)
        self.family = config.prompt_family or detect_family(self.model_info.metadata)
        if callable(task.grammar):
            task.grammar = task.grammar(config.max_tokens, self.model_info.count_text_tokens)
        self.template = load_task_template(task.name, config.prompt, family=self.family)
        self.template.check_variables(set(self.table.columns) | STANDARD_VARIABLES, TASK_VARIABLES.get(task.name, ()))
        self.chat = ChatTemplate.for_model(self.model_info, self.family)
        available = set(self.table.columns) | STANDARD_VARIABLES
        # Extraction on a backend without grammar: validate each reply and ask again (plans.Repair).
        self.use_grammar = bool(task.grammar) and config.grammar and supports_grammar(config.backend)
        self.repair_template = None
        if task.grammar and not self.use_grammar:
            self.repair_template = load_task_template("repair", family=self.family)
            self.repair_template.check_variables(available, TASK_VARIABLES["repair"])
        self.reduce_template = None
        self.splitting = task.splits and config.split_long
        if self.splitting and task.merge is None:
            self.reduce_template = load_task_template("reduce", family=self.family)
            self.reduce_template.check_variables(available, TASK_VARIABLES["reduce"])
        self.out = Path(config.out) if config.out else _default_out(config.input, task.name)
        if create_out:
            check_out_dir_task(self.out, task.name)
            prepare_out_dir(self.out)
        self.model_sha = model_sha256(self.model_path)
        self.params = {
            "max_tokens": config.max_tokens, "temperature": config.temperature, "seed": config.seed,
            "stop": task.stop, "task": task.name, "grammar": task.grammar if self.use_grammar else None, **task.key,
        }
        if self.repair_template is not None:
            self.params["repair"] = [config.max_retries, self.repair_template.source]
        if (runtime := capability(config.backend, "runtime")) != DEFAULT_RUNTIME:  # other text: own keys
            self.params["runtime"] = runtime
        # a long text's parts depend on the context size; its result on the combining template
        self.split_params = {"split_n_ctx": config.n_ctx,
                             "reduce": self.reduce_template.source if self.reduce_template else None}
        self.prices = Prices(config.price_input_per_mtok, config.price_output_per_mtok)
        self.worker: ModelWorker | None = None  # see start_worker
        self.first_prompt = self.render(next(self.table.chunks(1)).row(0, named=True))
        # (a template that cannot render the first row has failed here, before any generation)

    def describe_prompt(self) -> str:
        """What --show-prompt prints after the prompt itself."""
        return (f"{self.model_info.count_tokens(self.first_prompt)} tokens; family {self.family}; "
                f"task template {self.template.name}; {self.chat.name}")

    def settings(self) -> ModelSettings:
        """--n-ctx is what one row may use; the batched engine gives each of its slots its own
        stream of that size (isolated KV streams keep every row's text exact), so its context
        holds n_ctx x (slots + 1, the shared-prefix sequence)."""
        c = self.config
        slots = c.n_seq or self.default_slots()
        total = c.n_ctx * (slots + 1) if c.backend == "llama" else c.n_ctx
        return ModelSettings(model_path=str(self.model_path), n_ctx=total, n_seq=slots, n_threads=c.n_threads,
                             n_gpu_layers=c.n_gpu_layers, backend=c.backend)

    def default_slots(self) -> int:
        """Without --n-seq: as many slots (up to 16; more rows per step decode faster) as fit a
        2 GiB KV cache at --n-ctx each, counting the shared-prefix stream."""
        per_slot = self.model_info.kv_bytes_per_token * self.config.n_ctx
        if not per_slot:
            return DEFAULT_SLOTS
        return max(1, min(MAX_DEFAULT_SLOTS, KV_BUDGET_BYTES // per_slot - 1))

    def _variables(self, row: dict, **extra) -> dict:
        variables = {**row, **self.task.variables, "text": row.get(self.table.column), "row": row,
                     "max_words": self.config.max_words, **extra}
        variables.pop(ROW, None)
        return variables

    def _chat(self, messages: list[dict[str, str]]) -> str:
        prompt = self.chat.render(messages)
        # The tokenizer adds BOS itself; a template that also writes it would double it.
        bos = self.model_info.bos_token
        if bos and self.model_info.adds_bos and prompt.startswith(bos):
            prompt = prompt[len(bos):]
        return prompt

    def render_user(self, row: dict) -> str:
        """The task template's text for one row, before the chat template wraps it."""
        return self.template.render(self._variables(row)).strip()

    def render(self, row: dict) -> str:
        """The full prompt for one row: task template, then the model's chat template."""
        return self._chat([{"role": "user", "content": self.render_user(row)}])

    def render_reduce(self, row: dict, summaries: list[str]) -> str:
        """The prompt that combines partial summaries of one row's text."""
        text = self.reduce_template.render(self._variables(row, summaries=summaries, text="\n".join(summaries)))
        return self._chat([{"role": "user", "content": text.strip()}])

    def render_repair(self, row: dict, reply: str, problem: str) -> str:
        """The conversation so far plus the validator's message, asking for a corrected reply."""
        ask = self.repair_template.render(self._variables(row, error=problem, output=reply)).strip()
        return self._chat([{"role": "user", "content": self.render_user(row)},
                           {"role": "assistant", "content": reply}, {"role": "user", "content": ask}])

    def start_worker(self) -> None:
        """Start loading the model in its worker process now; `run` uses this worker. The
        command line calls it before Prefect starts, so the two overlap."""
        if self.worker is None:
            self.worker = self._new_worker()
            self.worker.start(wait=False)

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def _new_worker(self) -> ModelWorker:
        # an in-process backend (echo) counts tokens with this job's tokenizer, loaded once
        return make_worker(self.settings(), hang_timeout_s=self.config.hang_timeout_s, tokenizer=self.model_info)

    def has_pending_rows(self) -> bool:
        """Whether any row still needs the model (not done in OUT, not in the shared cache, not
        failing before generation). Stops at the first such row."""
        ledger = Ledger.load(self.out)
        cache = self._open_cache()
        try:
            return any(error is None and self._reusable(info["row_key"], ledger, cache) is None
                       for info, _plan, error in self._prepared_rows())
        finally:
            if cache:
                cache.close()

    def _open_cache(self) -> ResultCache | None:
        c = self.config
        return ResultCache(Path(c.cache_dir) if c.cache_dir else default_cache_dir()) if c.cache else None

    def _reusable(self, key: str, ledger: Ledger, cache: ResultCache | None) -> tuple[dict, str | None] | None:
        """(record, produced) of an earlier generation of `key` (this folder, then the shared cache), or None."""
        if (record := ledger.get(key, self.config.retry_errors)) is not None:
            return record, None
        if cache is not None and (record := cache.get(key)) is not None:
            return record, CACHED
        return None

    def run(self, progress: bool = True, run_id: str | None = None,
            on_chunk: Callable[[RunStats], None] | None = None) -> RunStats:
        """Generate every row not already done, writing parts as they finish; merge; record usage."""
        stats = RunStats(model=self.model_info.name, model_sha256=self.model_sha, backend=self.config.backend,
                         device="none (no rows generated)")
        if run_id:
            stats.run_id = run_id
        lock = OutputLock(self.out)
        lock.acquire()
        try:
            self._run_locked(stats, progress, on_chunk)
        finally:
            lock.release()
        return stats

    def _run_locked(self, stats: RunStats, progress: bool, on_chunk: Callable[[RunStats], None] | None) -> None:
        c = self.config
        ledger = Ledger.load(self.out)
        cache = self._open_cache()
        worker, self.worker = self.worker or self._new_worker(), None  # started by start_worker, or on first use
        writer = PartWriter(self.out, stats.run_id)
        buffered: list[dict] = []
        bar = tqdm(total=self.table.rows, unit="row", file=sys.stderr, disable=not progress, dynamic_ncols=True)

        def tick() -> None:  # after every model call: long texts take many before their row is done
            bar.set_postfix_str(f"{stats.calls} calls, {stats.tokens / max(stats.wall_s, 1e-9):.0f} tok/s")

        def emit(result: dict) -> None:
            buffered.append(result)
            stats.add_result(result)
            bar.update(1)
            if len(buffered) >= c.chunk_size:
                writer.write(self._frame(buffered))
                buffered.clear()
                if on_chunk:
                    on_chunk(stats)

        try:
            self._generate(worker, ledger, cache, stats, emit, tick)
            if buffered:
                writer.write(self._frame(buffered))
        except KeyboardInterrupt:
            if buffered:  # rows already finished are worth keeping
                writer.write(self._frame(buffered))
            raise
        finally:
            bar.close()
            worker.close()
            if cache:
                cache.close()
        stats.device = worker.device if worker.device != "unknown" else stats.device
        stats.engine = worker.engine_stats
        writer.merge(self.out / RESULTS_FILE, order_by="row")
        append_row(self.out / "usage.parquet", stats.row(
            input=str(c.input), task=self.task.name, params=json.dumps(self.params), worker_restarts=worker.restarts,
            **self.prices.estimate(stats)))

    def _generate(self, worker: ModelWorker, ledger: Ledger, cache: ResultCache | None, stats: RunStats,
                  emit: Callable[[dict], None], tick: Callable[[], None] = lambda: None) -> None:
        """Feed the worker the rows nobody has generated yet; reuse or fan out the rest."""
        window = max(64, 4 * (self.config.n_seq or MAX_DEFAULT_SLOTS))  # more than the backend's slots, see pool.py
        waiting: dict[str, list[dict]] = {}  # row key -> input rows waiting for that generation
        plans: dict[str, Any] = {}  # row key -> its plan (tasks/plans.py), while calls are outstanding
        calls: dict[int, tuple[str, int]] = {}  # request index -> (row key, slot in its plan)
        ids = itertools.count()
        done: dict[str, dict] = {}  # this run's generations, for duplicates later in the input
        rows = self._prepared_rows()
        exhausted = False

        def submit(key: str, new_calls: list[Call]) -> None:
            for slot, call in enumerate(new_calls):
                index = next(ids)
                calls[index] = (key, slot)
                worker.submit(GenerationRequest(
                    index=index, prompt=call.prompt, max_tokens=self.config.max_tokens,
                    temperature=self.config.temperature, seed=self.config.seed, stop=list(self.task.stop),
                    grammar=call.grammar, repeat_penalty=call.repeat_penalty, logprobs=self.task.confidence))

        while True:
            while not exhausted and worker.in_flight < window:
                item = next(rows, None)
                if item is None:
                    exhausted = True
                    break
                info, plan, error = item
                key = info["row_key"]
                if error is not None:
                    emit(self._finish({**info, "raw_output": None, "finish_reason": "error", "error": error,
                                       "model": self.model_info.name, "run_id": stats.run_id}, info, SKIPPED))
                elif key in done:
                    emit(self._finish(done[key], info, DUPLICATE))
                elif key in waiting:
                    waiting[key].append(info)
                elif (reused := self._reusable(key, ledger, cache)) is not None:
                    emit(self._finish(reused[0], info, reused[1]))
                else:
                    waiting[key] = [info]
                    plans[key] = plan
                    submit(key, plan.start())
            if exhausted and not worker.in_flight:
                worker.end_input()
                return
            for completion in worker.poll():
                key, slot = calls.pop(completion.index)
                stats.add_generation(completion)
                tick()
                plan = plans.get(key)
                if plan is None:  # the row already ended (another of its calls failed)
                    continue
                outcome = plan.feed(slot, completion)
                if isinstance(outcome, list):
                    submit(key, outcome)
                    continue
                del plans[key]
                rows_waiting = waiting.pop(key)
                record = from_completion(rows_waiting[0], outcome, self.model_info.name, stats.run_id)
                record.update(chunks=plan.chunks, calls=plan.calls)
                if cache is not None:
                    cache.put(record)
                done[key] = record
                emit(self._finish(record, rows_waiting[0]))
                for info in rows_waiting[1:]:
                    emit(self._finish(record, info, DUPLICATE))

    def _prepared_rows(self) -> Iterator[tuple[dict, Any, str | None]]:
        """(row info, plan of model calls, error) for every input row, chunk by chunk."""
        c = self.config
        for chunk in self.table.chunks(c.chunk_size):
            for row in chunk.iter_rows(named=True):
                index = row[ROW]
                info = {"row": index, "id": row[c.id_column] if c.id_column else index, "row_key": None}
                try:
                    info["row_key"], plan = self._plan(row)
                except (TemplateError, DoesNotFit) as exc:
                    yield info, None, str(exc)
                    continue
                yield info, plan, None

    def _plan(self, row: dict) -> tuple[str, Any]:
        """The row's key and the model calls it takes: one, parts and combining steps, or tries."""
        c, column = self.config, self.table.column
        text = row.get(column)
        if text is None or (isinstance(text, str) and not text.strip()):
            raise DoesNotFit(f"column {column!r} is empty in this row")
        splitting = self.splitting
        hint = " (or let it be cut into parts: --split-long)" if self.task.splits and not splitting else ""
        parts_allowed = c.max_chunks if splitting else 1
        if len(str(text)) > MAX_CHARS_PER_TOKEN * c.n_ctx * parts_allowed:  # cannot fit, whatever the tokenizer
            raise DoesNotFit(f"column {column!r} holds {len(str(text)):,} characters, far more tokens than "
                             f"{'--max-chunks ' + str(c.max_chunks) + ' parts of ' if splitting else ''}--n-ctx "
                             f"{c.n_ctx} can hold; raise --n-ctx{' or --max-chunks' if splitting else ''}{hint}, "
                             "or split the text into several rows")
        limit = c.n_ctx - c.max_tokens
        if splitting and len(str(text)) > SAMPLE_CHARS:  # judge a huge text before rendering all of it
            refuse_oversized(str(text), self.model_info.count_text_tokens, limit, c.max_chunks, c.n_ctx)
        prompt = self.render(row)
        count = self.model_info.count_tokens
        if (n := count(prompt)) <= limit:
            key = row_key(self.model_sha, prompt, self.params)
            if self.repair_template is not None:
                return key, Repair(prompt, self._problem, lambda reply, problem: self.render_repair(row, reply, problem),
                                   attempts=c.max_retries + 1)
            if self.use_grammar:
                return key, RetryAtLimit(prompt, self.task.grammar, self._problem)
            return key, SingleCall(prompt)
        if not splitting:
            raise DoesNotFit(f"the prompt of this row has {n:,} tokens, more than the {limit:,} that --n-ctx {c.n_ctx} "
                             f"leaves after --max-tokens {c.max_tokens}; raise --n-ctx or lower --max-tokens{hint}")
        parts = part_prompts(str(text), lambda piece: self.render({**row, column: piece}), count,
                             self.model_info.count_text_tokens, limit, c.max_chunks, c.n_ctx)
        if self.task.merge is not None:
            plan = MergeParts(parts, self.task.grammar if self.use_grammar else None, self.task.merge)
        else:
            plan = MapReduce(parts, lambda summaries: self.render_reduce(row, summaries), lambda p: count(p) <= limit)
        return row_key(self.model_sha, prompt, {**self.params, **self.split_params}), plan

    def _problem(self, reply: str) -> str | None:
        """Why a reply would not parse or validate, or None when it is fine (for plans.Repair)."""
        try:
            self._parse(reply)
        except Exception as exc:
            return str(exc)
        return None

    def _parse(self, text: str):
        return self.task.parse(text.strip() if self.config.strip else text)

    def _finish(self, record: dict, info: dict, produced: str | None = None) -> dict:
        return finish(record, info, self.task.output_column, self._parse, produced)

    def _frame(self, rows: list[dict]) -> pl.DataFrame:
        id_dtype = self.table.schema[self.config.id_column] if self.config.id_column else pl.Int64
        schema = results_schema(self.task.output_column, self.task.output_dtype, id_dtype, self.task.confidence)
        return pl.DataFrame([{k: r.get(k) for k in schema} for r in rows], schema=schema)
