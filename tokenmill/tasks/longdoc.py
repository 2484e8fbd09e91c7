"""Prompts for the parts of a document too long for one prompt (see plans.MapReduce)."""

from __future__ import annotations

from typing import Callable

from tokenmill.tasks.split import split_to_fit

SAFETY_TOKENS = 8  # slack for tokens that merge differently where a piece meets the template
SAMPLE_CHARS = 200_000  # a longer text is first judged by the token density of its start
MIN_TEXT_TOKENS = 32  # less room than this for text per part means the context is far too small


class DoesNotFit(ValueError):
    """The row cannot be processed within the limits; the message says which option to change."""


def split_parts(text: str, render: Callable[[str], str], count_prompt: Callable[[str], int],
                count_text: Callable[[str], int], limit: int, max_chunks: int, n_ctx: int) -> list[tuple[str, str]]:
    """(piece of `text`, its rendered prompt) for every part, each prompt counting at most `limit` tokens.

    `render(piece)`: the row's full prompt with `piece` as its text; `count_prompt`: tokens of
    a full prompt; `count_text`: tokens of bare text; `limit`: n_ctx - max_tokens.
    """
    overhead = count_prompt(render(""))
    budget = limit - overhead - SAFETY_TOKENS
    if budget < MIN_TEXT_TOKENS:
        raise DoesNotFit(f"the prompt template alone takes {overhead} tokens, leaving no room for text in "
                         f"--n-ctx {n_ctx} after the reply's tokens; raise --n-ctx or lower --max-tokens")
    refuse_oversized(text, count_text, budget, max_chunks, n_ctx)
    for share in (1.0, 0.9, 0.75, 0.5):  # the per-unit counts are estimates: shrink until every part fits
        pairs = [(piece, render(piece)) for piece in split_to_fit(text, count_text, int(budget * share))]
        if all(count_prompt(p) <= limit for _piece, p in pairs):
            if len(pairs) > max_chunks:
                raise DoesNotFit(f"this text needs {len(pairs)} parts at --n-ctx {n_ctx}, more than --max-chunks "
                                 f"{max_chunks}; raise --max-chunks or --n-ctx, or split the text into several rows")
            return pairs
    raise DoesNotFit(f"this text could not be cut into parts that fit --n-ctx {n_ctx}; raise --n-ctx")


def refuse_oversized(text: str, count_text: Callable[[str], int], budget: int, max_chunks: int, n_ctx: int) -> None:
    """Refuse a text that would take more than `max_chunks` parts of `budget` tokens, before
    anything renders or tokenizes all of it."""
    tokens = _estimate(text, count_text)
    if tokens > max_chunks * budget:
        raise DoesNotFit(f"this text holds about {tokens:,} tokens: at --n-ctx {n_ctx} that takes about "
                         f"{-(-tokens // budget)} parts, more than --max-chunks {max_chunks}; raise --max-chunks or "
                         "--n-ctx, or split the text into several rows")


def _estimate(text: str, count_text: Callable[[str], int]) -> int:
    """Tokens of `text`; a very long text is judged by its start, which is enough to refuse it."""
    if len(text) <= SAMPLE_CHARS:
        return count_text(text)
    return int(count_text(text[:SAMPLE_CHARS]) * len(text) / SAMPLE_CHARS)
