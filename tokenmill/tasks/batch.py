"""Batch: an OpenAI Batch API request file in, OpenAI's batch output file out.

Each request line becomes one row of the generic runner (tokenmill.tasks.runner), so resume,
dedupe, the shared cache, parts, results.parquet and usage.parquet work as for every job. What
differs per row lives here: the prompt (the body's messages through the model's own chat
template in the sandbox, or the raw `prompt` of /v1/completions), the sampling fields the body
sets (the command's options fill in the rest), and the grammar its `response_format` asks for.
A request tokenmill cannot run fails alone with the OpenAI-style error its row records.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import polars as pl

from tokenmill.errors import TemplateError
from tokenmill.io.parts import write_atomic
from tokenmill.io.readers import ROW, InputTable
from tokenmill.schema import grammar as schema_grammar
from tokenmill.tasks.batch_requests import Problem, RequestFile, read_requests
from tokenmill.tasks.longdoc import DoesNotFit
from tokenmill.tasks.plans import SingleCall
from tokenmill.tasks.runner import Job, JobConfig, TaskSpec, row_key
from tokenmill.usage import RunStats

BATCH = TaskSpec(name="batch", output_column="content", template=False)
REQUESTS_FILE = "requests.parquet"  # the request table as read: line, custom_id, url, the body's model
COLUMNS = {"line": pl.Int64, "custom_id": pl.String, "url": pl.String, "model": pl.String,
           "request": pl.String, "problem": pl.String}


@dataclass
class RequestTable(InputTable):
    """The checked request file as the runner's input: one row per request, held in memory (the
    whole file is read first anyway: a repeated custom_id refuses it before any row)."""

    frame: pl.DataFrame | None = None

    @classmethod
    def of(cls, requests: RequestFile, limit: int | None) -> "RequestTable":
        frame = pl.DataFrame([{
            "line": r.line, "custom_id": r.custom_id, "url": r.url, "model": r.model,
            "request": json.dumps(r.spec) if r.spec is not None else None,
            "problem": json.dumps(r.problem.error()) if r.problem is not None else None,
        } for r in requests.requests], schema=COLUMNS)
        if limit is not None:
            frame = frame.head(limit)
        return cls(requests.path, [requests.path], "request", "custom_id", frame.schema, frame.height, limit, frame)

    def chunks(self, chunk_size: int) -> Iterator[pl.DataFrame]:
        frame = self.frame.with_row_index(ROW)
        for start in range(0, frame.height, chunk_size):
            yield frame.slice(start, chunk_size)


class Refused(DoesNotFit):
    """A request that cannot run: its row fails alone, answered with `status` and `error`."""

    def __init__(self, error: dict, status: int = 400):
        super().__init__(error["message"])
        self.error, self.status = error, status


@functools.lru_cache(maxsize=64)
def _grammar(response_format: str) -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    fmt = json.loads(response_format)
    return JSON_GBNF if fmt["type"] == "json_object" else schema_grammar(fmt["schema"])


class BatchJob(Job):
    """A prepared batch: requests checked, model identified, output folder ready."""

    def __init__(self, config: JobConfig, requests: RequestFile, create_out: bool = True):
        self.requests = requests
        self.refusals: dict[int, tuple[int, dict]] = {}  # row -> (status, OpenAI error) of refused requests
        super().__init__(config, BATCH, create_out=create_out)
        self.first_line = None
        for row in self.table.frame.with_row_index(ROW).iter_rows(named=True):
            if row["request"] is not None:
                try:
                    self.first_prompt, self.first_line = self._prompt(json.loads(row["request"])), row["line"]
                    break
                except TemplateError:
                    continue
        if create_out:
            write_atomic(self.table.frame, self.out / REQUESTS_FILE)

    def open_input(self) -> RequestTable:
        return RequestTable.of(self.requests, self.config.limit)

    def describe_prompt(self) -> str:
        where = f"request on line {self.first_line}" if self.first_line else "no request renders"
        return f"{self._count_note(self.first_prompt)}; {where}; {self.chat.name}"

    def _prompt(self, spec: dict) -> str:
        if spec["kind"] == "completion":
            return spec["prompt"]
        return self._chat(spec["messages"])

    def render(self, row: dict) -> str:
        """The prompt of one request ('' for one that cannot run: its row reports why)."""
        try:
            return self._prompt(json.loads(row["request"])) if row.get("request") else ""
        except TemplateError:
            return ""

    def _plan(self, row: dict, prompt: str | None = None):
        """(The request renders its own prompt: `prompt` is never given, since a batch has no task template.)"""
        try:
            return self._plan_request(row)
        except Refused as exc:
            self.refusals[row[ROW]] = (exc.status, exc.error)
            raise

    def refusal(self, index: int) -> tuple[int, dict] | None:
        """(status, OpenAI error) of the request in row `index` if it cannot run. Planned again when
        this run did not plan it (a rerun of a finished job reads no row)."""
        if index not in self.refusals:
            row = self.table.frame.with_row_index(ROW).row(index, named=True)
            try:
                self._plan(row)
            except DoesNotFit:
                pass
        return self.refusals.get(index)

    def _plan_request(self, row: dict):
        if row["problem"] is not None:
            raise Refused(json.loads(row["problem"]))
        spec, c = json.loads(row["request"]), self.config
        try:
            prompt = self._prompt(spec)
        except TemplateError as exc:
            raise Refused(Problem(row["line"], f"the model's chat template cannot render these messages: {exc}",
                                  param="messages", code="invalid_value").error()) from None
        params = spec["params"]
        max_tokens = params.get("max_tokens", c.max_tokens)
        n = self.model_info.count_tokens(prompt)
        if n + max_tokens > c.n_ctx:
            raise Refused(Problem(row["line"], (
                f"this model's context is {c.n_ctx} tokens (--n-ctx); the request needs {n} prompt tokens plus "
                f"{max_tokens} completion tokens; shorten it, lower max_tokens or raise --n-ctx"),
                param="messages" if spec["kind"] == "chat" else "prompt", code="context_length_exceeded").error())
        grammar = None
        if (fmt := spec["response_format"]) is not None:
            if not self.backend.constrains:
                raise Refused(Problem(row["line"], f"response_format {fmt['type']} needs grammar support, which "
                                      f"--backend {self.backend.name} does not have", param="response_format",
                                      code="unsupported_parameter").error())
            try:
                grammar = _grammar(json.dumps(fmt, sort_keys=True))
            except Exception as exc:  # the converter refuses a schema check_schema let through
                raise Refused(Problem(row["line"], f"cannot build a grammar for this schema: {exc}",
                                      param="response_format.json_schema.schema",
                                      code="unsupported_schema").error()) from None
        options = {"max_tokens": max_tokens, "temperature": params.get("temperature", c.temperature),
                   "seed": params.get("seed", c.seed), "stop": params.get("stop", [])}
        if fmt is not None and fmt.get("schema") is not None:
            options["json_schema"] = fmt["schema"]  # for a backend that takes schemas (a server)
        if "top_p" in params:
            options["top_p"] = params["top_p"]
        key = row_key(self.model_sha, prompt, {**self.params, **options, "grammar": grammar})
        return key, SingleCall(prompt, grammar, options)

    def run(self, *args, **kwargs) -> RunStats:
        """The runner's run, then OUT/output.jsonl and OUT/errors.jsonl from results.parquet."""
        from tokenmill.tasks.batch_output import write_outputs

        stats = super().run(*args, **kwargs)
        write_outputs(self)
        return stats


def prepare_batch(config: JobConfig, create_out: bool = True) -> BatchJob:
    """Read and check the request file (a file-level problem refuses it, naming the line), then
    open the model and the output folder; nothing is generated yet."""
    requests = read_requests(Path(config.input))
    requests.refuse_if_unusable()
    return BatchJob(config, requests, create_out=create_out)
