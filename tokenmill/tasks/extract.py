"""Extract: a text column in, an `extracted` struct column out, valid against a JSON Schema.

Generation is constrained per row by a grammar made from the schema with llama-cpp-python's
converter, so the text always parses; the value is then checked by a real validator.
"""

from __future__ import annotations

import hashlib
import json

from tokenmill.errors import InputError
from tokenmill.schema import Validator, _for_converter, fields, grammar, load_schema, polars_dtype
from tokenmill.tasks.runner import Job, JobConfig, TaskSpec


def extract_task(schema_path: str) -> TaskSpec:
    schema, label = load_schema(schema_path)
    schema_text = json.dumps(schema, indent=2)
    return TaskSpec(
        name="extract", output_column="extracted", parse=Validator(schema), output_dtype=polars_dtype(schema),
        grammar=grammar(schema),
        # for servers: the same schema with nullable enums and bounds spelt as anyOf, which every
        # schema-to-grammar converter keeps (see schema._for_converter)
        json_schema=_for_converter(schema), variables={"schema": schema_text, "fields": fields(schema)},
        key={"schema_sha256": hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()},
    )


def prepare_extract(config: JobConfig, create_out: bool = True) -> Job:
    """Load and check the schema, then open input and model; nothing is generated yet."""
    if not config.schema:
        raise InputError("extraction needs --schema: a JSON Schema file or a job spec that holds one")
    return Job(config, extract_task(config.schema), create_out=create_out)
