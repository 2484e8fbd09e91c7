"""Merge per-part extractions of one long document into one object, field by field.

Rules (per top-level field; from the schema's `x-merge` keyword on the field, else from
`--merge field=rule,...` / a job spec's `merge:`, else the default):
- `evidence` (default for everything but arrays): the value most parts gave among the values
  their own part's text backs: a string (or number) that appears in that part's text, words
  compared case-insensitively; a true/false from a part whose text names the field (the words
  of `familyFriendly`, `family friendly`). A small model seldom writes null and fills a part
  that says nothing about a field with a made-up value; this keeps such values from winning.
  When no part's value is backed, the majority of all non-null values; a tie goes to the
  earliest of the tied values;
- `first`: the first part's non-null value;
- `majority`: the non-null value most parts gave (a tie goes to the earliest of the tied values);
- `union`: arrays concatenated in part order, repeats dropped (default for arrays).
A part whose reply is not valid JSON (it ran out of tokens) is left out; if none is left, the
row fails. The merged object is then validated against the schema like any other reply.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from tokenmill.errors import InputError

RULES = ("evidence", "first", "majority", "union")


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
        rule = node.get("x-merge") or given.get(name) or ("union" if is_array else "evidence")
        if rule not in RULES:
            raise InputError(f"merge rule {rule!r} for field {name!r} is unknown; choose one of {', '.join(RULES)}")
        if rule == "union" and not is_array:
            raise InputError(f"merge rule union for field {name!r} needs an array field")
        rules[name] = rule
    return rules


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _words(text: str) -> str:
    """Lower-case words split on anything else and on camelCase: `familyFriendly` -> ` family friendly `."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", str(text))
    return " " + " ".join(re.findall(r"\w+", spaced.casefold())) + " "


def backed(name: str, value: Any, piece: str) -> bool:
    """Whether part text `piece` backs `value` for field `name` (see the `evidence` rule)."""
    text = _words(piece)
    if isinstance(value, bool):
        return all(f" {word} " in text for word in _words(name).split())
    if isinstance(value, (str, int, float)):
        words = _words(value)
        return words.strip() != "" and words in text
    return False


def _majority(present: list[Any]) -> Any:
    counts = Counter(_key(v) for v in present)
    best = max(counts.values())
    return next(v for v in present if counts[_key(v)] == best)


def merge_values(values: list[Any], rule: str, name: str = "", pieces: list[str] | None = None) -> Any:
    """The merged value of one field from the parts' `values` (`pieces`: the parts' texts, for `evidence`)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if rule == "first":
        return present[0]
    if rule == "evidence":
        supported = [v for v, piece in zip(values, pieces or []) if v is not None and backed(name, v, piece)]
        return _majority(supported or present)
    if rule == "majority":
        return _majority(present)
    seen, out = set(), []
    for value in present:
        for item in value if isinstance(value, list) else [value]:
            if _key(item) not in seen:
                seen.add(_key(item))
                out.append(item)
    return out


class FieldMerger:
    """merge(texts, pieces) -> the merged JSON text of the parts' replies (`pieces`: the parts' texts)."""

    def __init__(self, rules: dict[str, str]):
        self.rules = rules

    def __call__(self, texts: list[str], pieces: list[str] | None = None) -> str:
        parsed, kept = [], []
        for i, text in enumerate(texts):
            try:
                value = json.loads(text, strict=False)
            except ValueError:
                continue
            if isinstance(value, dict):
                parsed.append(value)
                kept.append(pieces[i] if pieces else "")
        if not parsed:
            raise ValueError(f"none of the {len(texts)} parts gave a valid JSON object")
        merged = {name: merge_values([p.get(name) for p in parsed], rule, name, kept)
                  for name, rule in self.rules.items()}
        return json.dumps(merged, ensure_ascii=False)
