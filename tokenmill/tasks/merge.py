"""Merge per-part extractions of one long document into one object, field by field.

Rules (per top-level field; from the schema's `x-merge` keyword on the field, else from
`--merge field=rule,...` / a job spec's `merge:`, else the default):
- `first`: the first part's non-null value (default for everything but arrays);
- `majority`: the non-null value most parts gave (a tie goes to the earliest of the tied values);
- `union`: arrays concatenated in part order, repeats dropped (default for arrays).
A part whose reply is not valid JSON (it ran out of tokens) is left out; if none is left, the
row fails. The merged object is then validated against the schema like any other reply.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from tokenmill.errors import InputError

RULES = ("first", "majority", "union")


def merge_rules(schema: dict, option: str | dict | None) -> dict[str, str]:
    """The rule of every top-level field: schema `x-merge`, then the option, then the default."""
    given: dict[str, str] = {}
    if isinstance(option, dict):
        given = {str(k): str(v) for k, v in option.items()}
    elif option:
        for item in option.split(","):
            name, sep, rule = item.partition("=")
            if not sep:
                raise InputError(f"--merge {option!r}: write FIELD=RULE[,FIELD=RULE], e.g. name=majority")
            given[name.strip()] = rule.strip()
    props = schema["properties"]
    unknown = sorted(set(given) - set(props))
    if unknown:
        raise InputError(f"--merge names {unknown[0]!r}, which is not a field of the schema ({', '.join(props)})")
    rules = {}
    for name, node in props.items():
        is_array = node.get("type") == "array" or "array" in (node.get("type") or []) or any(
            o.get("type") == "array" for o in node.get("anyOf", []))
        rule = node.get("x-merge") or given.get(name) or ("union" if is_array else "first")
        if rule not in RULES:
            raise InputError(f"merge rule {rule!r} for field {name!r} is unknown; choose one of {', '.join(RULES)}")
        if rule == "union" and not is_array:
            raise InputError(f"merge rule union for field {name!r} needs an array field")
        rules[name] = rule
    return rules


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def merge_values(values: list[Any], rule: str) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    if rule == "first":
        return present[0]
    if rule == "majority":
        counts = Counter(_key(v) for v in present)
        best = max(counts.values())
        return next(v for v in present if counts[_key(v)] == best)
    seen, out = set(), []
    for value in present:
        for item in value if isinstance(value, list) else [value]:
            if _key(item) not in seen:
                seen.add(_key(item))
                out.append(item)
    return out


class FieldMerger:
    """merge(texts) -> the merged JSON text of the parts' replies."""

    def __init__(self, rules: dict[str, str]):
        self.rules = rules

    def __call__(self, texts: list[str]) -> str:
        parsed = []
        for text in texts:
            try:
                value = json.loads(text, strict=False)
            except ValueError:
                continue
            if isinstance(value, dict):
                parsed.append(value)
        if not parsed:
            raise ValueError(f"none of the {len(texts)} parts gave a valid JSON object")
        merged = {name: merge_values([p.get(name) for p in parsed], rule) for name, rule in self.rules.items()}
        return json.dumps(merged, ensure_ascii=False)
