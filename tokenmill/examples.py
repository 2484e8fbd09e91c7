"""Few-shot examples for extraction: input text plus the JSON it should give.

From `--examples FILE`: a YAML or JSON list, a JSONL file (one example per line), or a job
spec whose `examples` key holds the list (or names such a file, relative to the spec). Each
example is a mapping with `text` (a string) and `output` (an object valid against the
schema). They are checked before any row, and rendered by the task template (variable
`examples`: a list of {text, json}) ahead of the row's text, so every row's prompt starts
with them and the engine evaluates them once per run as part of the shared prefix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tokenmill.errors import InputError
from tokenmill.schema import Validator

MAX_EXAMPLES = 32


def load_examples(path_text: str, schema: dict) -> list[dict[str, str]]:
    """The examples in `path_text`, each checked against `schema`, as {text, json} for the template."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise InputError(f"examples file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".jsonl":
            data: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = yaml.safe_load(text)  # JSON is YAML too; safe_load runs nothing
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read examples {path}: {first}") from None
    if isinstance(data, dict) and "examples" in data:  # a job spec
        data = data["examples"]
        if isinstance(data, str):
            return load_examples(str(path.parent / data), schema)
    if not isinstance(data, list):
        raise InputError(f"examples {path}: expected a list of {{text, output}} mappings, got {type(data).__name__}")
    if len(data) > MAX_EXAMPLES:
        raise InputError(f"examples {path}: {len(data)} examples, more than {MAX_EXAMPLES}")
    validate = Validator(schema)
    out = []
    for i, item in enumerate(data):
        where = f"examples {path}, example {i + 1}"
        if not isinstance(item, dict) or set(item) != {"text", "output"}:
            raise InputError(f"{where}: give exactly the keys text and output")
        if not isinstance(item["text"], str) or not item["text"].strip():
            raise InputError(f"{where}: text must be a non-empty string")
        output = item["output"]
        if isinstance(output, dict):  # the schema's order, as the grammar writes it
            order = list(schema.get("properties", {}))
            output = {**{k: output[k] for k in order if k in output}, **{k: v for k, v in output.items() if k not in order}}
        encoded = json.dumps(output, ensure_ascii=False)
        try:
            validate(encoded)
        except ValueError as exc:
            raise InputError(f"{where}: output does not fit the schema: {exc}") from None
        out.append({"text": item["text"].strip(), "json": encoded})
    return out
