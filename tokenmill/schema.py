"""JSON Schemas for extraction: load, check the supported subset, and map to grammar and Polars types.

Supported: an object at the root with typed properties (string, integer, number, boolean,
enum, arrays, nested objects), nullable fields (`"type": ["string", "null"]` or an `anyOf`
with `{"type": "null"}`), `required`, `description`, and the bounds llama.cpp's grammar
converter understands (`minLength`/`maxLength`, `minItems`/`maxItems`, `minimum`/`maximum`).
Anything else is refused before any row, naming where it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import polars as pl
import yaml

from tokenmill.errors import SchemaError

_TYPES = {"string": pl.String, "integer": pl.Int64, "number": pl.Float64, "boolean": pl.Boolean}
_KEYWORDS = {
    "type", "properties", "required", "description", "title", "enum", "items", "additionalProperties",
    "anyOf", "minLength", "maxLength", "minItems", "maxItems", "minimum", "maximum", "default", "examples",
    "$schema", "$id", "x-merge",
}


def load_schema(path_text: str) -> tuple[dict, str]:
    """A schema from a `.json` file, or from the `schema` key of a YAML/JSON job spec. Returns (schema, label)."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise SchemaError(f"schema file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SchemaError(f"cannot read schema {path}: {first}") from None
    if isinstance(data, dict) and "schema" in data and "properties" not in data:  # a job spec
        schema = data["schema"]
        if isinstance(schema, str):  # a path relative to the spec
            return load_schema(str(path.parent / schema))
        return check_schema(schema, f"{path} (schema)"), f"{path} (schema)"
    return check_schema(data, str(path)), str(path)


def check_schema(schema: Any, label: str) -> dict:
    """Refuse an invalid schema, or one using what tokenmill cannot constrain, naming the part."""
    if not isinstance(schema, dict):
        raise SchemaError(f"schema {label} must be a JSON object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/" + "/".join(str(p) for p in exc.absolute_path)
        raise SchemaError(f"schema {label} is not a valid JSON Schema at {where}: {exc.message}") from None
    if _base_type(schema) != "object" or not schema.get("properties"):
        raise SchemaError(f"schema {label}: the root must be an object with properties")
    _check_node(schema, label, "")
    return schema


def _check_node(node: dict, label: str, where: str) -> None:
    unknown = sorted(set(node) - _KEYWORDS)
    if unknown:
        raise SchemaError(f"schema {label} uses unsupported keyword {unknown[0]!r} at {where or '/'}; "
                          f"supported: {', '.join(sorted(_KEYWORDS - {'$schema', '$id'}))}")
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1 or len(node["anyOf"]) != 2:
            raise SchemaError(f"schema {label} at {where or '/'}: anyOf is supported only as "
                              "[a type, {\"type\": \"null\"}] for a nullable field")
        _check_node(options[0], label, where)
        return
    kind = _base_type(node)
    if kind is None and "enum" not in node:
        raise SchemaError(f"schema {label} at {where or '/'}: give a type (string, integer, number, boolean, "
                          "array, object) or an enum")
    if kind is not None and kind not in _TYPES and kind not in ("array", "object"):
        raise SchemaError(f"schema {label} at {where or '/'}: type {kind!r} is not supported")
    if kind == "object":
        for name, child in (node.get("properties") or {}).items():
            _check_node(child, label, f"{where}/properties/{name}")
    if kind == "array":
        if not isinstance(node.get("items"), dict):
            raise SchemaError(f"schema {label} at {where or '/'}: an array needs an 'items' schema")
        _check_node(node["items"], label, f"{where}/items")


def _base_type(node: dict) -> str | None:
    """The non-null type of a node (`["string", "null"]` -> "string")."""
    if "anyOf" in node:
        return next(_base_type(o) for o in node["anyOf"] if o.get("type") != "null")
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return kinds[0] if len(kinds) == 1 else None
    if kind is None and "enum" in node:
        values = [v for v in node["enum"] if v is not None]
        return {bool: "boolean", int: "integer", float: "number"}.get(type(values[0]), "string") if values else None
    return kind


def polars_dtype(node: dict) -> Any:
    """The Polars type of values matching `node` (every field is nullable in Arrow)."""
    kind = _base_type(node)
    if kind == "object":
        return pl.Struct({name: polars_dtype(child) for name, child in node.get("properties", {}).items()})
    if kind == "array":
        inner = node["items"] if "anyOf" not in node else next(o for o in node["anyOf"] if o.get("type") != "null")["items"]
        return pl.List(polars_dtype(inner))
    return _TYPES[kind]


def fields(schema: dict) -> list[dict]:
    """The top-level fields as the prompt shows them: name, type, description, allowed values."""
    out = []
    for name, node in schema["properties"].items():
        plain = next((o for o in node.get("anyOf", []) if o.get("type") != "null"), node)
        out.append({"name": name, "type": _base_type(node), "description": node.get("description", ""),
                    "enum": [v for v in plain.get("enum", []) if v is not None],
                    "required": name in schema.get("required", [])})
    return out


def grammar(schema: dict) -> str:
    """GBNF constraining generation to strict JSON matching `schema` (llama-cpp-python's own converter,
    with raw control characters kept out of strings)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    text = json_schema_to_gbnf(json.dumps(_for_converter(schema)), prop_order=list(schema["properties"]))
    # The converter lets raw control characters (a newline, a tab) into strings, which strict JSON
    # parsers refuse; allow them only escaped, so every reply is strict JSON.
    loose = 'char ::= [^"\\\\]'
    if "char ::=" not in text:  # no strings in this schema (numbers, booleans, enums only)
        return text
    if loose not in text:
        raise ValueError("the JSON grammar converter changed: no string char rule to tighten")
    return text.replace(loose, 'char ::= [^"\\\\\\x00-\\x1F]')


def _for_converter(node: Any) -> Any:
    """The converter drops `enum` and length bounds on `"type": [T, "null"]`; spell those as anyOf."""
    if not isinstance(node, dict):
        return node
    node = {k: ({n: _for_converter(c) for n, c in v.items()} if k == "properties" else _for_converter(v)
                if k == "items" else [_for_converter(o) for o in v] if k == "anyOf" else v)
            for k, v in node.items()}
    kind = node.get("type")
    if isinstance(kind, list) and "null" in kind and len(kind) == 2:
        plain = {**node, "type": next(k for k in kind if k != "null")}
        if "enum" in plain:
            plain["enum"] = [v for v in plain["enum"] if v is not None]
        described = {k: plain.pop(k) for k in ("description", "title") if k in plain}
        return {**described, "anyOf": [plain, {"type": "null"}]}
    return node


class Validator:
    """Parses generated text and validates it with a real JSON Schema validator."""

    def __init__(self, schema: dict):
        self.schema = schema
        self._validator = jsonschema.validators.validator_for(schema)(schema)

    def __call__(self, text: str) -> dict:
        value = json.loads(text, strict=False)  # a server's grammar may let raw control characters into strings
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(value))
        if error is not None:
            where = "/" + "/".join(str(p) for p in error.absolute_path)
            raise ValueError(f"output does not match the schema at {where}: {error.message}")
        return value
