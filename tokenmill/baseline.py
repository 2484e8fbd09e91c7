"""The direct-call baseline: one plain llama-cpp-python `create_chat_completion` per row.

What a user writes first without tokenmill: the model loaded with `llama_cpp.Llama`, and for
each row one chat completion with the schema as `response_format` and a one-line
instruction before the text. No batching, no prompt template, no budget for strings. Its
results.parquet has the columns `python -m flows.eval extract` reads, so the same scorer
judges both, and every prompt change is measured against it in the same sitting.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import polars as pl

from tokenmill.io.readers import ROW, InputTable
from tokenmill.schema import Validator, load_schema, polars_dtype

INSTRUCTION = "Extract the restaurant's fields as JSON. Use null for anything the text does not say."


_PY = {pl.String: str, pl.Boolean: bool, pl.Int64: int, pl.Float64: (int, float)}


def _lenient(text: str, validate, dtypes: dict) -> tuple[dict | None, str | None, bool]:
    """(fields, error, schema_valid): the reply is scored whenever it parses as a JSON object, even
    when it breaks the schema (llama-cpp-python's converter drops `enum` on `type: [T, "null"]`, so
    the direct call can write any string there); a value of the wrong type counts as null."""
    try:
        validate(text)
        error, valid = None, True
    except Exception as exc:
        error, valid = f"does not match the schema: {exc}", False
    try:
        data = json.loads(text, strict=False)
    except ValueError as exc:
        return None, f"could not parse the model's output: {exc}", False
    if not isinstance(data, dict):
        return None, "the reply is not a JSON object", False
    fields = {}
    for name, dtype in dtypes.items():
        value = data.get(name)
        kind = _PY.get(dtype)
        ok = kind is not None and isinstance(value, kind) and not (dtype != pl.Boolean and isinstance(value, bool))
        fields[name] = value if ok else None
    return fields, error, valid


def run_baseline(input_path: str, column: str | None, schema_path: str, out: Path, *, model: str | None = None,
                 limit: int | None = None, max_tokens: int = 160, n_ctx: int = 2048, threads: int = 0,
                 instruction: str = INSTRUCTION, id_column: str | None = None, progress_every: float = 15.0) -> dict:
    """Run every row through `create_chat_completion(response_format=json_schema)`; write OUT/results.parquet."""
    from llama_cpp.llama_chat_format import ChatFormatterResponse, chat_formatter_to_chat_completion_handler

    from tokenmill.models.base import default_threads
    from tokenmill.models.gguf_info import ModelInfo, load_llama
    from tokenmill.models.resolve import resolve_model
    from tokenmill.prompts import ChatTemplate

    schema, _label = load_schema(schema_path)
    validate = Validator(schema)
    table = InputTable.open(Path(input_path), column, id_column, limit)
    path = resolve_model(model)
    chat = ChatTemplate.for_model(ModelInfo(path))  # the model's own chat template, rendered in the sandbox

    def formatter(messages, **_kwargs):
        prompt = chat.render(messages)
        return ChatFormatterResponse(prompt=prompt, stop=[chat.eos_token] if chat.eos_token else None,
                                     added_special=bool(chat.bos_token) and prompt.startswith(chat.bos_token))

    llm = load_llama(path, n_ctx=n_ctx, n_threads=threads or default_threads(),
                     chat_handler=chat_formatter_to_chat_completion_handler(formatter))
    dtypes = {name: polars_dtype(node) for name, node in schema["properties"].items()}
    rows, t0, last = [], time.perf_counter(), time.perf_counter()
    for chunk in table.chunks(32):
        for row in chunk.iter_rows(named=True):
            start = time.perf_counter()
            reply = llm.create_chat_completion(
                messages=[{"role": "user", "content": f"{instruction}\n\n{row[table.column]}"}],
                response_format={"type": "json_object", "schema": schema}, max_tokens=max_tokens, temperature=0.0)
            text = reply["choices"][0]["message"]["content"] or ""
            value, error, schema_valid = _lenient(text, validate, dtypes)
            rows.append({"row": row[ROW], "id": row[id_column] if id_column else row[ROW], "extracted": value,
                         "status": "ok" if value is not None else "error", "error": error,
                         "schema_valid": schema_valid, "raw_output": text,
                         "finish_reason": reply["choices"][0]["finish_reason"],
                         "prompt_tokens": reply["usage"]["prompt_tokens"],
                         "completion_tokens": reply["usage"]["completion_tokens"],
                         "latency_ms": (time.perf_counter() - start) * 1000})
            if time.perf_counter() - last > progress_every:
                last = time.perf_counter()
                print(f"baseline: {len(rows)}/{table.rows} rows, {last - t0:.0f} s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    id_dtype = table.schema[id_column] if id_column else pl.Int64
    frame = pl.DataFrame(rows, schema={
        "row": pl.Int64, "id": id_dtype, "extracted": polars_dtype(schema), "status": pl.String, "error": pl.String,
        "schema_valid": pl.Boolean,
        "raw_output": pl.String, "finish_reason": pl.String, "prompt_tokens": pl.Int64,
        "completion_tokens": pl.Int64, "latency_ms": pl.Float64})
    frame.write_parquet(out / "results.parquet")
    return {"rows": frame.height, "ok": int((frame["status"] == "ok").sum()),
            "schema_valid": int(frame["schema_valid"].sum()), "wall_s": wall,
            "prompt_tokens": int(frame["prompt_tokens"].sum()), "completion_tokens": int(frame["completion_tokens"].sum()),
            "instruction": instruction}
