"""How one input row becomes model calls, and how their completions become the row's result.

Most rows are one call. A document longer than the context is summarized in parts and the
partial summaries combined (`MapReduce`); a backend without grammar support validates and
asks again with the validator's message (`Repair`). The runner submits whatever calls a plan
asks for, feeds each completion back by its slot, and stores the merged completion the plan
returns at the end: its token counts and timings are the sums over every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

from tokenmill.models.base import Completion


@dataclass
class Call:
    """One generation a plan asks for."""

    prompt: str
    grammar: str | None = None
    repeat_penalty: float = 1.0
    options: dict = field(default_factory=dict)  # GenerationRequest fields that override the job's (batch rows)


Next = Union[list[Call], Completion]  # more calls to make, or the row's final completion


@dataclass
class _Usage:
    calls: list[Completion] = field(default_factory=list)

    def merged(self, last: Completion, text: str | None = None, error: str | None = None) -> Completion:
        """`last`'s outcome with token counts and model time summed over every call."""
        calls = self.calls
        return Completion(
            index=last.index, text=last.text if text is None and error is None else text,
            finish_reason="error" if error else last.finish_reason, error=error or last.error,
            prompt_tokens=sum(c.prompt_tokens for c in calls), cached_tokens=sum(c.cached_tokens for c in calls),
            completion_tokens=sum(c.completion_tokens for c in calls), queue_ms=calls[0].queue_ms,
            prompt_ms=sum(c.prompt_ms for c in calls), decode_ms=sum(c.decode_ms for c in calls),
            logprob=None if error else last.logprob,
        )


class SingleCall:
    """The common case: one prompt, one completion. `feed(slot, completion)`: `slot` says
    which of the calls last asked for (by `start` or an earlier `feed`) the completion is.
    (No usage list: a run makes one of these for every row.)"""

    chunks = 1
    calls = 0

    def __init__(self, prompt: str, grammar: str | None = None, options: dict | None = None):
        self._call = Call(prompt, grammar, 1.0, options or {})

    def start(self) -> list[Call]:
        return [self._call]

    def feed(self, slot: int, completion: Completion) -> Next:
        self.calls = 1
        return completion


class _Tries(SingleCall):
    """A single call that may be tried again: counts every call's usage."""

    def __init__(self, prompt: str, grammar: str | None = None):
        super().__init__(prompt, grammar)
        self.usage = _Usage()

    @property
    def calls(self) -> int:
        return len(self.usage.calls)


class Repair(_Tries):
    """Generate, validate, and on failure ask again with the validator's message in the
    conversation, up to `attempts` calls in all; the last output stands (an invalid one
    becomes an error row that keeps its raw text)."""

    def __init__(self, prompt: str, check: Callable[[str], str | None], retry_prompt: Callable[[str, str], str],
                 attempts: int):
        super().__init__(prompt)
        self._check = check
        self._retry_prompt = retry_prompt
        self._attempts = attempts

    def feed(self, slot: int, completion: Completion) -> Next:
        self.usage.calls.append(completion)
        if completion.finish_reason == "error" or len(self.usage.calls) >= self._attempts:
            return self.usage.merged(completion)
        problem = self._check(completion.text or "")
        if problem is None:
            return self.usage.merged(completion)
        return [Call(self._retry_prompt(completion.text or "", problem))]


RETRY_REPEAT_PENALTY = 1.3  # the second try of a grammar row that ran out of tokens


class RetryAtLimit(_Tries):
    """A grammar row that hit --max-tokens with unfinished JSON gets one more try with repetition
    penalised; only then is it an error, keeping the raw text of that last try."""

    def __init__(self, prompt: str, grammar: str | None, check: Callable[[str], str | None]):
        super().__init__(prompt, grammar)
        self._check = check

    def feed(self, slot: int, completion: Completion) -> Next:
        self.usage.calls.append(completion)
        if (len(self.usage.calls) == 1 and completion.finish_reason == "length"
                and self._check(completion.text or "") is not None):
            return [Call(self._call.prompt, self._call.grammar, RETRY_REPEAT_PENALTY, self._call.options)]
        return self.usage.merged(completion)


class MergeParts:
    """Extract from each part of a long document with the grammar, then merge the parts' objects
    field by field in Python (tasks/merge.py): no combining call."""

    def __init__(self, part_prompts: list[str], grammar: str | None, merge: Callable[[list[str]], str]):
        self.chunks = len(part_prompts)
        self._calls = [Call(p, grammar) for p in part_prompts]
        self._merge = merge
        self._texts: list[str | None] = [None] * len(part_prompts)
        self.usage = _Usage()

    @property
    def calls(self) -> int:
        return len(self.usage.calls)

    def start(self) -> list[Call]:
        return list(self._calls)

    def feed(self, slot: int, completion: Completion) -> Next:
        self.usage.calls.append(completion)
        if completion.finish_reason == "error":
            return self.usage.merged(completion, error=f"part {slot + 1} of {self.chunks}: {completion.error}")
        self._texts[slot] = completion.text or ""
        if any(t is None for t in self._texts):
            return []
        try:
            return self.usage.merged(completion, text=self._merge(self._texts))
        except ValueError as exc:
            return self.usage.merged(completion, error=f"merging {self.chunks} parts: {exc}")


class MapReduce:
    """Summarize each part of a long document, then combine the partial summaries with the
    reduce prompt, in groups that fit the context, level by level until one summary is left."""

    def __init__(self, part_prompts: list[str], reduce_prompt: Callable[[list[str]], str],
                 fits: Callable[[str], bool]):
        self.chunks = len(part_prompts)
        self._prompts = part_prompts
        self._reduce_prompt = reduce_prompt
        self._fits = fits
        self._results: list[str | None] = [None] * len(part_prompts)
        self._slots = list(range(len(part_prompts)))  # call number -> result position, this level
        self._level = 0
        self.usage = _Usage()

    @property
    def calls(self) -> int:
        return len(self.usage.calls)

    def start(self) -> list[Call]:
        return [Call(p) for p in self._prompts]

    def feed(self, slot: int, completion: Completion) -> Next:
        """`slot`: which of the calls last asked for (by `start` or `feed`) this completes."""
        self.usage.calls.append(completion)
        if completion.finish_reason == "error":
            what = f"part {slot + 1} of {self.chunks}" if self._level == 0 else f"combining step {self._level}"
            return self.usage.merged(completion, error=f"{what}: {completion.error}")
        self._results[self._slots[slot]] = (completion.text or "").strip()
        if any(r is None for r in self._results):
            return []  # this level is still running
        summaries = [r for r in self._results if r]
        if self._level > 0 and len(self._results) == 1:
            return self.usage.merged(completion)  # the final combining call
        if len(summaries) <= 1:
            return self.usage.merged(completion, text=summaries[0] if summaries else "")
        groups = self._group(summaries)
        if groups is None:
            return self.usage.merged(completion, error=(
                f"{len(summaries)} partial summaries cannot be combined: not even two fit one prompt; "
                "raise --n-ctx or lower --max-tokens"))
        self._level += 1
        calls: list[Call] = []
        results: list[str | None] = []
        for group in groups:
            if len(group) == 1:  # nothing to combine: it goes up a level as it is
                results.append(group[0])
            else:
                results.append(None)
                calls.append(Call(self._reduce_prompt(group)))
        self._slots = [i for i, r in enumerate(results) if r is None]
        self._results = results
        return calls

    def _group(self, summaries: list[str]) -> list[list[str]] | None:
        groups: list[list[str]] = []
        for summary in summaries:
            if groups and self._fits(self._reduce_prompt(groups[-1] + [summary])):
                groups[-1].append(summary)
            else:
                groups.append([summary])
        return None if len(groups) == len(summaries) else groups
