"""Cut a text that is too long for one prompt into pieces that fit a token budget.

Cuts fall on paragraph boundaries (blank lines) where they can, then on sentence ends, then
between words; a single "word" longer than the budget (a URL, a table without spaces) is cut
in halves. Pieces are packed greedily in order, so every piece but the last is nearly full.
Counts come from the model's own tokenizer, summed per unit: that is an estimate of the
joined text's count, so callers check the rendered prompts and shrink the budget if needed.
"""

from __future__ import annotations

import re
from typing import Callable

# (joiner, what separates units at this level), coarsest first
_LEVELS = (
    ("\n\n", re.compile(r"\n[ \t]*\n\s*")),
    (" ", re.compile(r"(?<=[.!?…。])\s+")),
    (" ", re.compile(r"\s+")),
)
_JOIN_TOKENS = 1  # a joiner costs at most about one token


def split_to_fit(text: str, count: Callable[[str], int], budget: int) -> list[str]:
    """`text` as consecutive pieces whose token counts (by `count`) stay within `budget`."""
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    return [piece for piece, _ in _split(text.strip(), count, budget, 0) if piece]


def _split(text: str, count: Callable[[str], int], budget: int, level: int) -> list[tuple[str, int]]:
    n = count(text)
    if n <= budget:
        return [(text, n)]
    if level == len(_LEVELS):  # no boundary left to cut at
        cut = len(text) // 2
        return _split(text[:cut], count, budget, level) + _split(text[cut:], count, budget, level)
    joiner, pattern = _LEVELS[level]
    units = [u.strip() for u in pattern.split(text) if u.strip()]
    if len(units) < 2:
        return _split(text, count, budget, level + 1)
    pieces = [p for unit in units for p in _split(unit, count, budget, level + 1)]
    return _pack(pieces, joiner, budget)


def _pack(pieces: list[tuple[str, int]], joiner: str, budget: int) -> list[tuple[str, int]]:
    packed: list[tuple[str, int]] = []
    current: list[str] = []
    used = 0
    for piece, n in pieces:
        extra = n + (_JOIN_TOKENS if current else 0)
        if current and used + extra > budget:
            packed.append((joiner.join(current), used))
            current, used, extra = [], 0, n
        current.append(piece)
        used += extra
    if current:
        packed.append((joiner.join(current), used))
    return packed
