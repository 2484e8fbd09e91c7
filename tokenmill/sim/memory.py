"""Agents' memories and what each turn retrieves from them.

Score = recency + importance + relevance, each in [0, 1], as in Park et al.'s generative agents:
- recency: `recency_decay ** (steps since the memory was formed)`;
- importance: the 1-10 rating the memory was stored with, over 10;
- relevance: a lexical score, the cosine of the memory's and the query's word sets (stop
  words dropped, words cut to their first 5 letters as a cheap stem).

Why lexical and not the model's own embeddings through llama.cpp: embeddings need a second
llama.cpp context in the worker (`embedding=True`, pooled) and a model call per new memory and
per query, each competing with generation for the same 2 CPU cores; a 135M chat model's pooled
hidden states are poor sentence embeddings anyway. The lexical score is free, exact and
deterministic (floating-point embeddings on another thread count or device could reorder
near-ties and break reproducibility), and names, places and objects, which it matches, are what
these memories mostly hinge on.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

INITIAL, OBSERVATION, REFLECTION = "initial", "observation", "reflection"

_STOP = set("""a an the and or but if then of to in on at by for with from as is are was were be been being i
you he she it we they me him her us them my your his its our their this that these those there here what
who whom which when where why how not no do does did done have has had so very just about into out up down
over under again will would can could should shall may might must said says say""".split())


def words(text: str) -> set[str]:
    return {w[:5] for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOP and len(w) > 1}


@dataclass
class MemoryItem:
    agent: str
    step: int
    kind: str  # initial | observation | reflection
    text: str
    importance: int
    index: int = 0  # position in the agent's memory stream

    def row(self) -> dict:
        return {"agent": self.agent, "step": self.step, "kind": self.kind, "text": self.text,
                "importance": self.importance, "index": self.index}


class MemoryStream:
    """One agent's memories in the order they were formed."""

    def __init__(self, agent: str):
        self.agent = agent
        self.items: list[MemoryItem] = []
        self._words: list[set[str]] = []

    def add(self, step: int, kind: str, text: str, importance: int) -> MemoryItem:
        item = MemoryItem(self.agent, step, kind, text, max(1, min(10, int(importance))), len(self.items))
        self.items.append(item)
        self._words.append(words(text))
        return item

    def observations_of(self, step: int) -> list[MemoryItem]:
        return [m for m in self.items if m.step == step and m.kind == OBSERVATION]

    def retrieve(self, step: int, query: str, recent: int, k: int, decay: float,
                 exclude_step: int | None = None) -> list[MemoryItem]:
        """The `recent` newest memories plus the `k` best-scoring older ones, oldest first.

        Memories observed at `exclude_step` are left out (the prompt shows them as the
        perception). Ties go to the newer memory, so the result never depends on chance."""
        pool = [i for i, m in enumerate(self.items) if not (m.step == exclude_step and m.kind == OBSERVATION)]
        chosen = pool[-recent:] if recent else []
        rest = pool[:-recent] if recent else pool
        q = words(query)
        scored = []
        for i in rest:
            m = self.items[i]
            w = self._words[i]
            relevance = len(q & w) / math.sqrt(len(q) * len(w)) if q and w else 0.0
            score = decay ** max(0, step - m.step) + m.importance / 10 + relevance
            scored.append((-round(score, 9), -i, i))
        chosen += [i for _s, _n, i in sorted(scored)[:k]]
        return [self.items[i] for i in sorted(chosen)]

    def recall(self, step: int, query: str, k: int, decay: float, pool) -> list[MemoryItem]:
        """The `k` best-scoring memories (as in `retrieve`) for which `pool(memory)` holds and that
        share a word with `query`, oldest first: what comes back to an agent in a turn of its chat
        (context.py), of which the turn writes those the chat does not show yet."""
        q = words(query)
        scored = []
        for i, m in enumerate(self.items):
            w = self._words[i]
            if not (q & w) or not pool(m):
                continue
            relevance = len(q & w) / math.sqrt(len(q) * len(w))
            scored.append((-round(decay ** max(0, step - m.step) + m.importance / 10 + relevance, 9), -i, i))
        return [self.items[i] for i in sorted(i for _s, _n, i in sorted(scored)[:k])]

    def latest(self, n: int) -> list[MemoryItem]:
        return self.items[-n:] if n else []
