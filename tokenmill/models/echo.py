"""The zero-cost backend (`--backend echo`): no model weights, no KV cache, replies at once.

It exists to measure tokenmill's own overhead and to test orchestration (resume, dedupe,
ordering, locks, output folders, usage rows) without paying for generation; it is never the
default. A reply is deterministic and derived from the prompt: the first 8 hex digits of the
prompt's SHA-256, then the first words of its longest line (usually the row's text). A
request with a grammar gets the shortest text that grammar accepts instead, so an extraction
gets a minimal schema-valid JSON value (where the schema's grammar holds all its rules:
numeric bounds are not in llama.cpp's grammars, and the validator judges those as it judges a
model's reply). `max_tokens` truncates (finish reason "length") and stop strings cut (finish
reason "stop") as in the real engines.

Token counts: `--backend echo` estimates them (a token per 4 bytes of UTF-8, BOS included),
since tokenizing is model work (about 200 us per short prompt on llama.cpp's tokenizer, more
than all of tokenmill's own work per row). `--backend echo-exact` counts with the model's real
tokenizer, for tests of what depends on exact counts.
"""

from __future__ import annotations

import hashlib
import re
import time
from functools import lru_cache
from typing import Iterable, Iterator, Protocol

from tokenmill.errors import ModelError
from tokenmill.models.base import Completion, GenerationRequest, ModelSettings

REPLY_WORDS = 8
_SPECIAL = re.compile(r"<\|[^|>\n]*\|>|<s>|</s>")  # chat-template tokens are not words of the text


class Tokenizer(Protocol):
    """What the echo backend counts with (tokenmill.models.gguf_info.ModelInfo)."""

    def count_tokens(self, text: str) -> int: ...

    def count_text_tokens(self, text: str) -> int: ...


class EstimatedCounts:
    """Token counts without a tokenizer: one token per 4 bytes of UTF-8 (at least one)."""

    @staticmethod
    def count_text_tokens(text: str) -> int:
        return max(1, (len(text.encode("utf-8")) + 3) // 4) if text else 0

    def count_tokens(self, text: str) -> int:
        return 1 + self.count_text_tokens(text)  # BOS


class EchoBackend:
    """Answers every request at once with text derived from its prompt. `exact` (--backend
    echo-exact, chosen by the registry): counts with `tokenizer` (the job's own, already loaded) or,
    when none is given, loads the model's vocabulary only; else estimates (EstimatedCounts)."""

    polls_input = False

    def __init__(self, settings: ModelSettings, tokenizer: Tokenizer | None = None, exact: bool = False):
        self.settings = settings
        self.on_step = None
        if not exact:
            tokenizer = EstimatedCounts()
        elif tokenizer is None:
            from tokenmill.models.gguf_info import ModelInfo

            tokenizer = ModelInfo(settings.model_path)  # vocab only: no weights, no KV cache
        self.tokenizer = tokenizer
        self.stats: dict[str, float] = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0}

    def device(self) -> str:
        return "none (echo backend: no model runs)"

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Completion]:
        for request in requests:
            if request is None:  # "nothing now" from a polling worker
                continue
            yield self.reply(request)

    def reply(self, request: GenerationRequest) -> Completion:
        started = time.perf_counter()
        prompt_tokens = self.tokenizer.count_tokens(request.prompt)
        self.stats["requests"] += 1
        if request.max_tokens <= 0:
            return Completion(request.index, None, "error", f"max_tokens must be positive, got {request.max_tokens}",
                              prompt_tokens=prompt_tokens)
        if prompt_tokens + request.max_tokens > self.settings.n_ctx:
            return Completion(
                request.index, None, "error",
                f"row needs {prompt_tokens + request.max_tokens} tokens (prompt {prompt_tokens} + max_tokens "
                f"{request.max_tokens}) but the context holds only {self.settings.n_ctx}; raise --n-ctx or lower "
                "--max-tokens", prompt_tokens=prompt_tokens)
        text = shortest_match(request.grammar) if request.grammar else echo_text(request.prompt)
        text, reason, completion_tokens = cut(text, request.stop, request.max_tokens, self.tokenizer.count_text_tokens)
        stats = self.stats
        stats["prompt_tokens"] += prompt_tokens
        stats["generated_tokens"] += completion_tokens
        if self.on_step:
            self.on_step()
        # (positional: Completion's fields in order; a run makes one for every row)
        return Completion(request.index, text, reason, None, prompt_tokens, 0, completion_tokens, 0.0, 0.0,
                          (time.perf_counter() - started) * 1000)

    def close(self) -> None:
        pass


def echo_text(prompt: str) -> str:
    """`<8 hex digits of the prompt's SHA-256> <first words of its longest line>` (chat-template
    tokens such as `<|im_end|>` are not words)."""
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8]
    longest = max(prompt.splitlines(), key=len, default="")
    return " ".join([digest, *_SPECIAL.sub(" ", longest).split(maxsplit=REPLY_WORDS)[:REPLY_WORDS]])


def cut(text: str, stop: list[str], max_tokens: int, count) -> tuple[str, str, int]:
    """The reply a real engine would give: cut before the first stop string, then at
    `max_tokens` tokens (the longest prefix that fits). Returns (text, finish reason, its tokens)."""
    end = len(text)
    for s in stop:
        if s and 0 <= (i := text.find(s)) < end:
            end = i
    if end < len(text):
        text = text[:end]
    if (n := count(text) if text else 0) <= max_tokens:
        return text, "stop", n
    fits, too_long = 0, len(text)  # count(text[:fits]) <= max_tokens < count(text[:too_long])
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if count(text[:middle]) <= max_tokens:
            fits = middle
        else:
            too_long = middle
    return text[:fits], "length", count(text[:fits]) if fits else 0


# -- the shortest text a GBNF grammar accepts -------------------------------------------------
# Grammars here are llama.cpp's GBNF: `name ::= alternatives`, literals "...", classes [...],
# rule names, groups (...), `.`, and the repetitions ? * + {m} {m,} {m,n}.

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_FALLBACK_CHARS = "a0 x_"  # for a negated class: the first of these it allows


@lru_cache(maxsize=32)
def shortest_match(grammar: str) -> str:
    """The shortest string the grammar's `root` rule accepts (ties: the first alternative)."""
    rules = _GrammarParser(grammar).parse()
    if "root" not in rules:
        raise ModelError("the grammar has no root rule")
    best: dict[str, str | None] = {name: None for name in rules}
    changed = True
    while changed:  # lengths only shrink, so this settles
        changed = False
        for name, expr in rules.items():
            found = _shortest(expr, best)
            if found is not None and (best[name] is None or len(found) < len(best[name])):
                best[name], changed = found, True
    if best["root"] is None:
        raise ModelError("the grammar accepts no finite text")
    return best["root"]


def _shortest(expr: tuple, best: dict[str, str | None]) -> str | None:
    kind = expr[0]
    if kind == "lit":
        return expr[1]
    if kind == "class":
        return _class_char(expr[1], expr[2])
    if kind == "ref":
        if expr[1] not in best:
            raise ModelError(f"the grammar uses an undefined rule {expr[1]!r}")
        return best[expr[1]]
    if kind == "seq":
        parts = [_shortest(e, best) for e in expr[1]]
        return None if any(p is None for p in parts) else "".join(parts)
    if kind == "alt":
        options = [o for o in (_shortest(e, best) for e in expr[1]) if o is not None]
        return min(options, key=len) if options else None
    if kind == "rep":
        if expr[2] == 0:
            return ""
        part = _shortest(expr[1], best)
        return None if part is None else part * expr[2]
    raise AssertionError(kind)


def _class_char(negated: bool, ranges: list[tuple[str, str]]) -> str | None:
    inside = lambda ch: any(lo <= ch <= hi for lo, hi in ranges)  # noqa: E731
    if not negated:
        return ranges[0][0] if ranges else None
    return next((ch for ch in _FALLBACK_CHARS if not inside(ch)),
                next((chr(c) for c in range(32, 0x3000) if not inside(chr(c))), None))


class _GrammarParser:
    """A recursive-descent reader of GBNF, following llama.cpp's own grammar parser."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def parse(self) -> dict[str, tuple]:
        rules: dict[str, tuple] = {}
        self.space(newlines=True)
        while self.i < len(self.s):
            name = self.name()
            self.space(newlines=False)
            if not self.s.startswith("::=", self.i):
                self.fail("expected ::=")
            self.i += 3
            self.space(newlines=True)
            rules[name] = self.alternatives(nested=False)
            self.space(newlines=True)
        return rules

    def fail(self, what: str):
        line = self.s.count("\n", 0, self.i) + 1
        raise ModelError(f"cannot read the grammar at line {line}: {what}")

    def space(self, newlines: bool) -> None:
        s = self.s
        while self.i < len(s):
            ch = s[self.i]
            if ch in " \t":
                self.i += 1
            elif ch == "#":
                while self.i < len(s) and s[self.i] not in "\r\n":
                    self.i += 1
            elif newlines and ch in "\r\n":
                self.i += 1
            else:
                break

    def name(self) -> str:
        match = _NAME.match(self.s, self.i)
        if not match:
            self.fail("expected a rule name")
        self.i = match.end()
        return match.group()

    def alternatives(self, nested: bool) -> tuple:
        options = [self.sequence(nested)]
        while self.i < len(self.s) and self.s[self.i] == "|":
            self.i += 1
            self.space(newlines=True)
            options.append(self.sequence(nested))
        return options[0] if len(options) == 1 else ("alt", options)

    def sequence(self, nested: bool) -> tuple:
        items: list[tuple] = []
        s = self.s
        while self.i < len(s):
            ch = s[self.i]
            if ch == '"':
                self.i += 1
                chars = []
                while self.i < len(s) and s[self.i] != '"':
                    chars.append(self.char())
                self.expect('"')
                items.append(("lit", "".join(chars)))
            elif ch == "[":
                self.i += 1
                negated = self.i < len(s) and s[self.i] == "^"
                self.i += negated
                ranges = []
                while self.i < len(s) and s[self.i] != "]":
                    low = self.char()
                    high = low
                    if s.startswith("-", self.i) and self.i + 1 < len(s) and s[self.i + 1] != "]":
                        self.i += 1
                        high = self.char()
                    ranges.append((low, high))
                self.expect("]")
                items.append(("class", negated, ranges))
            elif ch == ".":
                self.i += 1
                items.append(("class", True, []))
            elif ch == "(":
                self.i += 1
                self.space(newlines=True)
                items.append(self.alternatives(nested=True))
                self.expect(")")
            elif _NAME.match(ch):
                items.append(("ref", self.name()))
            elif ch in "*+?" and items:
                self.i += 1
                items[-1] = ("rep", items[-1], {"*": 0, "+": 1, "?": 0}[ch])
            elif ch == "{" and items:
                end = s.index("}", self.i)
                low = s[self.i + 1:end].split(",")[0].strip()
                items[-1] = ("rep", items[-1], int(low or 0))
                self.i = end + 1
            else:
                break  # |, ), or the end of the rule
            self.space(newlines=nested)
        return ("seq", items)

    def expect(self, ch: str) -> None:
        if self.i >= len(self.s) or self.s[self.i] != ch:
            self.fail(f"expected {ch!r}")
        self.i += 1

    def char(self) -> str:
        s = self.s
        if s[self.i] != "\\":
            self.i += 1
            return s[self.i - 1]
        code = s[self.i + 1] if self.i + 1 < len(s) else ""
        digits = {"x": 2, "u": 4, "U": 8}.get(code)
        if digits:
            value = s[self.i + 2:self.i + 2 + digits]
            self.i += 2 + digits
            return chr(int(value, 16))
        self.i += 2
        return {"n": "\n", "r": "\r", "t": "\t"}.get(code, code)
