"""Planning a row job: input opened, model identified, templates checked, output folder ready;
then, row by row, the rendered prompt, the row key and the model calls it takes (tasks/plans.py).

Nothing here runs a model: `tokenmill.tasks.runner.Job` adds the worker, the scheduler
(tasks/scheduler.py) feeds it, and the sink (tasks/sink.py) writes what comes back.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import polars as pl

from tokenmill.contract import USAGE_FILE, results_schema
from tokenmill.errors import ModelError, OutputError, TemplateError
from tokenmill.io.parts import prepare_out_dir
from tokenmill.io.readers import ROW, InputTable
from tokenmill.models import registry
from tokenmill.models.base import ModelSettings
from tokenmill.models.family import detect_family
from tokenmill.models.machine import free_cores, load_calibration
from tokenmill.models.reference import backend_for, open_model
from tokenmill.prompts import STANDARD_VARIABLES, TASK_VARIABLES, ChatPrompt, ChatTemplate, SlotRenderer, load_task_template
from tokenmill.tasks.longdoc import SAMPLE_CHARS, DoesNotFit, refuse_oversized, split_parts
from tokenmill.tasks.plans import MapReduce, MergeParts, Repair, RetryAtLimit, SingleCall
from tokenmill.tasks.records import finish
from tokenmill.tasks.spec import (DEFAULT_SLOTS, KV_BUDGET_BYTES, MAX_CHARS_PER_TOKEN, MAX_DEFAULT_SLOTS, JobConfig,
                                  RowKeys, TaskSpec, row_key)


def _default_out(input_spec: str, task: str) -> Path:
    """A folder beside INPUT named after it; for a glob, beside the files it matches."""
    path = Path(input_spec)
    if any(ch in input_spec for ch in "*?["):
        return path.parent / f"input.{task}"
    return path.parent / f"{path.name if path.is_dir() else path.stem}.{task}"


def check_out_dir_task(out: Path, task: str) -> None:
    """Refuse an output folder that holds another kind of job's results."""
    usage = out / USAGE_FILE
    if not usage.exists():
        return
    try:
        tasks = set(pl.read_parquet(usage, columns=["task"])["task"].drop_nulls().to_list())
    except Exception:
        raise OutputError(f"output folder {out} holds an unreadable usage.parquet; choose another --out") from None
    if tasks and task not in tasks:
        raise OutputError(f"output folder {out} holds results of a {'/'.join(sorted(tasks))} job, not {task}; "
                          "choose another --out")


class Planner:
    """A prepared row job: input opened, model identified, templates checked, output folder
    ready; renders and plans each row (`planned_rows`)."""

    def __init__(self, config: JobConfig, task: TaskSpec, create_out: bool = True):
        config.validate()
        self.config = config
        self.task = task
        self.table = self.open_input()
        self.backend = backend_for(config.model, config.backend)  # the registry's entry; never named here
        self.backend_options = registry.validate_options(self.backend, config.backend_options)
        self.model = open_model(config.model, self.backend_options)  # resolved once: location, identity, tokenizer
        self.model_path = self.model.path or self.model.location
        self.model_info = self.model.info
        # Without a tokenizer for the model (a server with no tokenize endpoint), rows go as chat
        # messages the server renders, counted from its usage; fit is judged by an estimate.
        self.send_messages = not self.model_info.has_tokenizer
        if self.send_messages and not self.backend.chat:
            raise ModelError(f"--backend {self.backend.name} cannot send chat messages, which {config.model} needs "
                             "(tokenmill has no tokenizer for it)")
        self.family = config.prompt_family or detect_family(self.model_info.metadata)
        if callable(task.grammar):
            task.grammar = task.grammar(config.max_tokens, self.model_info.count_text_tokens)
        self.template = load_task_template(task.name, config.prompt, family=self.family) if task.template else None
        if self.template is not None:
            self.template.check_variables(set(self.table.columns) | STANDARD_VARIABLES,
                                          TASK_VARIABLES.get(task.name, ()))
        self.chat = ChatTemplate.for_model(self.model_info, self.family)
        self._slots: SlotRenderer | None | bool = None  # see _slot_renderer
        available = set(self.table.columns) | STANDARD_VARIABLES
        # Extraction on a backend without grammar: validate each reply and ask again (plans.Repair).
        self.use_grammar = bool(task.grammar) and config.grammar and self.backend.constrains
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
        self.model_sha = self.model.identity
        self.params = {
            "max_tokens": config.max_tokens, "temperature": config.temperature, "seed": config.seed,
            "stop": task.stop, "task": task.name, "grammar": task.grammar if self.use_grammar else None, **task.key,
        }
        if self.repair_template is not None:
            self.params["repair"] = [config.max_retries, self.repair_template.source]
        if self.backend.runtime != registry.DEFAULT_RUNTIME:  # other text: own keys
            self.params["runtime"] = self.backend.runtime
        if self.send_messages:  # the server's rendering of the messages, not the prompt keys hash
            self.params["prompt_as"] = "messages"
        # a long text's parts depend on the context size; its result on the combining template
        self.split_params = {"split_n_ctx": config.n_ctx,
                             "reduce": self.reduce_template.source if self.reduce_template else None}
        self._keys = RowKeys(self.model_sha, self.params)
        self._threads: int | None = None  # see default_threads
        self.first_prompt = self.render(next(self.table.chunks(1)).row(0, named=True))
        # (a template that cannot render the first row has failed here, before any generation)

    def open_input(self) -> InputTable:
        c = self.config
        return InputTable.open(Path(c.input), c.column, c.id_column, c.limit)

    def describe_prompt(self) -> str:
        """What --show-prompt prints after the prompt itself."""
        return (f"{self._count_note(self.first_prompt)}; family {self.family}; "
                f"task template {self.template.name}; {self.chat.name}")

    def _count_note(self, prompt: str) -> str:
        n = self.model_info.count_tokens(prompt)
        if self.send_messages:
            return (f"at most about {n} tokens (estimated: no tokenizer for this model; sent as chat messages the "
                    "server renders with its own template)")
        return f"{n} tokens"

    def settings(self) -> ModelSettings:
        """--n-ctx is what one row may use; the batched engine gives each of its slots its own
        stream of that size (isolated KV streams keep every row's text exact), so its context
        holds n_ctx x (slots + 1, the shared-prefix sequence)."""
        c = self.config
        slots = c.n_seq or self.default_slots()
        return ModelSettings(model_path=str(self.model_path), n_ctx=self.backend.context_tokens(c.n_ctx, slots),
                             n_seq=slots, n_threads=c.n_threads or self.default_threads(),
                             adapt_threads=not c.n_threads,
                             n_gpu_layers=c.n_gpu_layers, backend=self.backend.name, options=self.backend_options)

    def default_threads(self) -> int:
        """Without --threads: what --calibrate found best for this model here (else every core),
        but no more than the cores other programs leave free right now (models/machine.py).
        Decided once per job, before its worker or Prefect start."""
        if self._threads is None:
            if self.backend.runtime != registry.DEFAULT_RUNTIME:  # not llama.cpp in a worker of ours
                self._threads = 0  # the backend's own default
            else:
                best = (load_calibration(self.model_sha) or {}).get("threads") or os.cpu_count() or 1
                self._threads = min(best, free_cores())
        return self._threads

    def default_slots(self) -> int:
        """Without --n-seq: what --calibrate found best for this model here; else as many slots
        (up to 16; more rows per step decode faster) as fit a 2 GiB KV cache at --n-ctx each,
        counting the shared-prefix stream."""
        calibrated = (load_calibration(self.model_sha) or {}).get("n_seq")
        per_slot = self.model_info.kv_bytes_per_token * self.config.n_ctx
        if calibrated and (not per_slot or (calibrated + 1) * per_slot <= KV_BUDGET_BYTES):
            return calibrated
        if not per_slot:
            return DEFAULT_SLOTS
        return max(1, min(MAX_DEFAULT_SLOTS, KV_BUDGET_BYTES // per_slot - 1))

    def _variables(self, row: dict, **extra) -> dict:
        variables = {**row, **self.task.variables, "text": row.get(self.table.column), "row": row,
                     "max_words": self.config.max_words, **extra}
        variables.pop(ROW, None)
        return variables

    def _chat(self, messages: list[dict[str, str]]) -> str:
        if len(messages) == 1 and messages[0]["role"] == "user":
            prompt = self.chat.one_turn(messages[0]["content"])
        else:
            prompt = self.chat.render(messages)
        prompt = self._without_bos(prompt)
        return ChatPrompt(prompt, messages) if self.send_messages else prompt

    def _without_bos(self, prompt: str) -> str:
        """The tokenizer adds BOS itself; a chat template that also writes it would double it."""
        bos = self.model_info.bos_token
        if bos and self.model_info.adds_bos and prompt.startswith(bos):
            return prompt[len(bos):]
        return prompt

    def render_user(self, row: dict) -> str:
        """The task template's text for one row, before the chat template wraps it."""
        variables = self._variables(row)
        fast = self._slot_renderer(variables)
        return (fast.render(variables) if fast else self.template.render(variables)).strip()

    def _slot_renderer(self, variables: dict) -> SlotRenderer | None:
        """The task template's SlotRenderer when it has one (decided on the first row, and
        checked there against Jinja's own rendering), else None."""
        if self._slots is None:
            constant = (set(self.task.variables) | {"max_words"}) - {"text", "row"}
            fast = self.template.slots(variables, set(variables) - constant)
            self._slots = fast if fast is not None and fast.render(variables) == self.template.render(variables) else False
        return self._slots or None

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

    def fingerprint(self) -> str:
        """What decides every row key and result of this job, short of reading the rows: input
        files (path, size, mtime), options, model, templates. Two runs with the same
        fingerprint over an unchanged folder have the same rows to do (see Job.has_pending_rows)."""
        c = self.config
        files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.table.files]
        sources = [t.source if t is not None else None for t in
                   (self.template, self.chat, self.repair_template, self.reduce_template)]
        payload = [files, c.limit, self.table.column, c.id_column, self.params, self.split_params, self.model_sha,
                   sources, self.task.output_column, self.task.variables, c.max_words, c.split_long, c.max_chunks,
                   c.n_ctx, c.strip, c.retry_errors, self.family]
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def _render_chunk(self, chunk: pl.DataFrame) -> list[str | None] | None:
        """`render` of every row of a read chunk, column by column (None for a row `render` must
        do itself), when the task template has a SlotRenderer and the chat template writes one
        message between a fixed head and tail; else None."""
        fast, frame = self._slots, self.chat.frame()
        if not fast or not frame or self.send_messages:
            return None
        columns = []
        for name in fast.names:
            column = self.table.column if name == "text" else name
            if name in ("row", ROW) or column not in chunk.columns:
                return None
            columns.append(chunk.get_column(column).to_list())
        head, tail = frame
        bos = self.model_info.bos_token
        if bos and self.model_info.adds_bos and len(head) < len(bos):
            return None  # whether a prompt starts with BOS would depend on its row
        head = self._without_bos(head)  # (as _chat cuts it)
        return [None if text is None else head + text.strip() + tail
                for text in fast.render_columns(columns, chunk.height)]

    def planned_chunks(self) -> Iterator[list[tuple[dict, Any, str | None]]]:
        """(row info, plan of model calls, error) for every input row, one read chunk at a time."""
        c = self.config
        for chunk in self.table.chunks(c.chunk_size):
            planned = []
            prompts = self._render_chunk(chunk)
            positions = chunk.get_column(ROW).to_list()
            ids = chunk.get_column(c.id_column).to_list() if c.id_column else positions
            texts = chunk.get_column(self.table.column).to_list()
            for i, (index, id_, text) in enumerate(zip(positions, ids, texts)):
                info = {"row": index, "id": id_, "row_key": None}
                prompt = prompts[i] if prompts is not None else None
                if prompt is not None and (quick := self._plan_quick(text, prompt)) is not None:
                    info["row_key"], plan = quick
                    planned.append((info, plan, None))
                    continue
                try:
                    info["row_key"], plan = self._plan(chunk.row(i, named=True), prompt)
                except (TemplateError, DoesNotFit) as exc:
                    planned.append((info, None, str(exc)))
                    continue
                planned.append((info, plan, None))
            yield planned

    def _plan_quick(self, text: Any, prompt: str) -> tuple[str, Any] | None:
        """`_plan` of a row whose text is short and whose rendered prompt fits uncounted (most
        rows), without building the row's dict; None for any other row (`_plan` decides it)."""
        if (type(text) is not str or self.repair_template is not None or len(text) > SAMPLE_CHARS
                or len(prompt.encode("utf-8")) + 2 > self.config.n_ctx - self.config.max_tokens or not text.strip()):
            return None
        return self._keys(prompt), self._single(prompt, None)

    def _single(self, prompt: str, row: dict | None) -> Any:
        """The plan of a row whose prompt fits: one call, retried as the job's options say."""
        if self.repair_template is not None:
            return Repair(prompt, self._problem, lambda reply, problem: self.render_repair(row, reply, problem),
                          attempts=self.config.max_retries + 1)
        if self.use_grammar:
            return RetryAtLimit(prompt, self.task.grammar, self._problem)
        return SingleCall(prompt)

    def planned_rows(self) -> Iterator[tuple[dict, Any, str | None]]:
        for chunk in self.planned_chunks():
            yield from chunk

    def _plan(self, row: dict, prompt: str | None = None) -> tuple[str, Any]:
        """The row's key and the model calls it takes: one, parts and combining steps, or tries.
        `prompt`: the row's `render`, when done already (`_render_chunk`)."""
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
        if prompt is None:
            prompt = self.render(row)
        count = self.model_info.count_tokens
        # A token holds at least one byte of text: a prompt of few enough bytes fits uncounted
        # (BOS and EOS may come on top).
        if len(prompt.encode("utf-8")) + 2 <= limit or (n := count(prompt)) <= limit:
            return self._keys(prompt), self._single(prompt, row)
        if not splitting:
            raise DoesNotFit(f"the prompt of this row has {n:,} tokens, more than the {limit:,} that --n-ctx {c.n_ctx} "
                             f"leaves after --max-tokens {c.max_tokens}; raise --n-ctx or lower --max-tokens{hint}")
        pairs = split_parts(str(text), lambda piece: self.render({**row, column: piece}), count,
                            self.model_info.count_text_tokens, limit, c.max_chunks, c.n_ctx)
        parts = [prompt for _piece, prompt in pairs]
        if self.task.merge is not None:
            plan = MergeParts(parts, self.task.grammar if self.use_grammar else None,
                              partial(self.task.merge, pieces=[piece for piece, _prompt in pairs]))
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

    @functools.cached_property
    def results_schema(self) -> dict:
        id_dtype = self.table.schema[self.config.id_column] if self.config.id_column else pl.Int64
        return results_schema(self.task.output_column, self.task.output_dtype, id_dtype, self.task.confidence)

    def _frame(self, columns: dict) -> pl.DataFrame:
        """results.parquet's columns (`contract.columns_of` of finished rows) as a frame."""
        schema = self.results_schema
        return pl.DataFrame({k: columns[k] for k in schema}, schema=schema)
