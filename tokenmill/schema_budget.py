"""Bounds that make every grammar-constrained reply end inside --max-tokens.

A JSON-Schema grammar fixes the shape of a reply but not its length: a string may run on
("one of the one of the ...") until the token limit cuts the object open. Here the worst
case is made to fit instead:

- the *skeleton* is the longest reply with every free string empty: keys, punctuation, one
  optional space per gap (the converter's `space ::= " "?`), the longest enum value, `false`,
  16-digit numbers. Its tokens are counted with the model's own tokenizer;
- a string with `maxLength` N is counted as N / CHARS_PER_TOKEN tokens, so the schema's own
  bounds are kept and counted;
- the tokens left, `max_tokens - skeleton - explicit bounds`, are shared out evenly as a
  default `maxLength` (in characters, CHARS_PER_TOKEN per token) for every string that has
  none, never below MIN_DEFAULT_LENGTH.

So the grammar itself reserves the tokens it needs to close the object. The reservation is
exact for the skeleton; for strings it assumes text of at least CHARS_PER_TOKEN characters per
token (English words and names run 3-5 with SmolLM2's tokenizer; a one-character-per-token run
such as `a.b.c.d` can still reach the limit, which is what the engine's repetition stop and the
extract retry with a repetition penalty are for). Arrays without `maxItems` are not bounded.
`Budget.fits` says whether the bounds add up to at most `max_tokens`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Callable

MIN_DEFAULT_LENGTH = 8  # characters: below this a default bound would cut ordinary values
CHARS_PER_TOKEN = 2  # what a string's characters are assumed to cost at worst, in natural text
_NUMBER = -1234567890123456  # the longest integer part llama.cpp's number rule allows (sign + 16 digits)


@dataclass
class Budget:
    """How the reply's tokens were shared out."""

    max_tokens: int
    skeleton_tokens: int  # keys, punctuation, enums, literals: the reply with free strings empty
    bounded_tokens: int  # strings whose maxLength the schema gives (at CHARS_PER_TOKEN)
    default_length: int | None  # maxLength given to strings without one (None: there were none)
    defaulted: int  # how many strings got it
    fits: bool  # the longest reply the grammar allows fits max_tokens

    def describe(self) -> str:
        text = (f"reply budget {self.max_tokens} tokens: {self.skeleton_tokens} for the JSON skeleton, "
                f"{self.bounded_tokens} for strings with maxLength")
        if self.defaulted:
            text += f", maxLength {self.default_length} for each of {self.defaulted} other strings"
        return text + ("" if self.fits else " (the longest reply may not fit: raise --max-tokens)")


def _plain(node: dict) -> dict:
    """A nullable node's non-null alternative (`anyOf` or `type: [T, "null"]`)."""
    if "anyOf" in node:
        return next(o for o in node["anyOf"] if o.get("type") != "null")
    kind = node.get("type")
    if isinstance(kind, list):
        rest = [k for k in kind if k != "null"]
        return {**node, "type": rest[0]} if len(rest) == 1 else node
    return node


def _walk(node: dict, strings: list[dict], in_array: bool = False) -> Any:
    """The skeleton value of `node`; collects the string nodes (outside arrays) that lack maxLength."""
    plain = _plain(node)
    if "enum" in plain:
        values = [v for v in plain["enum"] if v is not None] or [None]
        return max(values, key=lambda v: len(json.dumps(v, ensure_ascii=False)))
    kind = plain.get("type")
    if kind == "object":
        return {name: _walk(child, strings, in_array) for name, child in (plain.get("properties") or {}).items()}
    if kind == "array":
        _walk(plain["items"], [], True)
        return []
    if kind == "string":
        if "maxLength" not in plain and not in_array:
            strings.append(plain)
        return ""
    if kind == "boolean":
        return False
    if kind == "integer":
        return _NUMBER
    if kind == "number":
        return _NUMBER + 0.5
    return None


def _explicit(node: dict) -> int:
    """Characters the schema's own maxLength bounds allow (outside arrays)."""
    plain = _plain(node)
    if plain.get("type") == "object":
        return sum(_explicit(c) for c in (plain.get("properties") or {}).values())
    if plain.get("type") == "string" and "enum" not in plain:
        return int(plain.get("maxLength", 0))
    return 0


def _gaps(value: Any) -> int:
    """Places the converter's grammar allows an optional space."""
    if isinstance(value, dict):
        return 2 + 2 * len(value) + sum(_gaps(v) for v in value.values())
    return 1


def bound_strings(schema: dict, max_tokens: int, count_tokens: Callable[[str], int]) -> tuple[dict, Budget]:
    """A copy of `schema` whose strings all carry a maxLength, and how the budget was shared."""
    bounded = _with_nullable_strings_as_anyof(copy.deepcopy(schema))
    strings: list[dict] = []
    skeleton = _walk(bounded, strings)
    skeleton_tokens = count_tokens(json.dumps(skeleton, ensure_ascii=False)) + _gaps(skeleton)
    explicit = -(-_explicit(bounded) // CHARS_PER_TOKEN)
    free = max_tokens - skeleton_tokens - explicit
    default = None
    if strings:
        default = max(MIN_DEFAULT_LENGTH, CHARS_PER_TOKEN * free // len(strings))
        for node in strings:
            node["maxLength"] = default
    used = skeleton_tokens + explicit + -(-(default or 0) * len(strings) // CHARS_PER_TOKEN)
    return bounded, Budget(max_tokens, skeleton_tokens, explicit, default, len(strings), used <= max_tokens)


def _with_nullable_strings_as_anyof(node: Any) -> Any:
    """Nodes stay as they are; `_plain` of a `type: [string, null]` node must be the node itself so
    a bound set on it lands in the schema (schema._for_converter moves it into the anyOf later)."""
    if isinstance(node, dict):
        kind = node.get("type")
        if isinstance(kind, list) and "null" in kind and len(kind) == 2 and "string" in kind and "enum" not in node:
            node["anyOf"] = [{"type": "string", **{k: node.pop(k) for k in ("minLength", "maxLength") if k in node}},
                             {"type": "null"}]
            del node["type"]
        for key, value in list(node.items()):
            if key == "properties":
                for child in value.values():
                    _with_nullable_strings_as_anyof(child)
            elif key in ("items",):
                _with_nullable_strings_as_anyof(value)
            elif key == "anyOf":
                for child in value:
                    _with_nullable_strings_as_anyof(child)
    return node
