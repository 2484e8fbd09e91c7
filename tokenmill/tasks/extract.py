"""Extract: a text column in, an `extracted` struct column out, valid against a JSON Schema.

Generation is constrained per row by a grammar made from the schema with llama-cpp-python's
converter, so the text always parses; the value is then checked by a real validator.
"""

from __future__ import annotations

import hashlib
import json

from tokenmill.errors import InputError
from tokenmill.examples import load_examples
from tokenmill.schema import Validator, _for_converter, fields, grammar, load_schema, polars_dtype
from tokenmill.schema_budget import bound_strings
from tokenmill.tasks.merge import FieldMerger, merge_rules
from tokenmill.tasks.runner import Job, JobConfig, TaskSpec


def extract_task(schema_path: str, examples_path: str | None = None, merge: str | dict | None = None) -> TaskSpec:
    schema, label = load_schema(schema_path)
    schema_text = json.dumps(schema, indent=2)
    examples = load_examples(examples_path, schema) if examples_path else []
    rules = merge_rules(schema, merge)
    return TaskSpec(
        name="extract", output_column="extracted", parse=Validator(schema), output_dtype=polars_dtype(schema),
        grammar=lambda max_tokens, count: bounded_grammar(schema, max_tokens, count), variables={"schema": schema_text, "fields": fields(schema), "examples": examples},
        # for servers: the same schema with nullable enums and bounds spelt as anyOf, which every
        # schema-to-grammar converter keeps (see schema._for_converter)
        json_schema=_for_converter(schema),
        key={"schema_sha256": hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest(), "merge": rules},
        splits=True, merge=FieldMerger(rules),
    )


def bounded_grammar(schema: dict, max_tokens: int, count_tokens) -> str:
    """The schema's grammar with every string bounded so the longest reply fits `max_tokens`
    (see tokenmill.schema_budget)."""
    bounded, _budget = bound_strings(schema, max_tokens, count_tokens)
    return grammar(bounded)


def prepare_extract(config: JobConfig, create_out: bool = True) -> Job:
    """Load and check the schema, then open input and model; nothing is generated yet."""
    if not config.schema:
        raise InputError("extraction needs --schema: a JSON Schema file or a job spec that holds one")
    return Job(config, extract_task(config.schema, config.examples, config.merge), create_out=create_out)
