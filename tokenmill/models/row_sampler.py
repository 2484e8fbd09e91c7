"""One row's sampler: its llama.cpp chain, and its grammar checked on the chosen token first.

A grammar applied to every candidate costs a pass over the whole vocabulary per token
(about 8.5 ms for SmolLM2's 49,152 tokens on this CPU, more than a batched decode step per
row). llama.cpp's own server avoids that: it samples from the chain without the grammar,
asks the grammar about that one token, and applies the grammar to the whole vocabulary
only when the token is rejected. `RowSampler` does the same; a greedy row first looks for
the best allowed token among the 64 best (exact: every token outside them scores lower),
so a whole-vocabulary pass is left for the rare step where none of those is allowed. For greedy rows the result
is the token grammar-first sampling gives (the best token, if the grammar allows it, is
also the best allowed token); for temperature sampling it draws from the same allowed
distribution, with another use of the row's seeded generator.

llama_sampler_sample both picks and accepts a token; a token accepted twice advances a
grammar twice and aborts the process. Here a row without grammar uses llama_sampler_sample
alone; a grammar row picks with llama_sampler_apply and accepts each token exactly once,
in its chain and its grammar (`accept`, also used for jump-forward's forced tokens).
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

from tokenmill.models.base import GenerationRequest
from tokenmill.models.llama_sampling import PENALTY_LAST_N, LogCapture, RowError, token_piece

TOP_K_FIRST = 64  # greedy grammar rows: where to look for the best allowed token before the whole vocabulary
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


class Candidates:
    """A reusable llama_token_data_array over the whole vocabulary (one per engine)."""

    def __init__(self, vocab):
        self.vocab = vocab
        self._quotes: np.ndarray | None = None
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self.data = np.zeros(self.n_vocab, dtype=TOKEN_DATA)
        self.array = llama_cpp.llama_token_data_array(
            data=self.data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
            size=self.n_vocab, selected=-1, sorted=False)
        self._one = np.zeros(1, dtype=TOKEN_DATA)
        self._one_array = llama_cpp.llama_token_data_array(
            data=self._one.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
            size=1, selected=-1, sorted=False)

    def fill(self, ctx, idx: int):
        """The logits of batch position `idx` as candidates; returns the array to apply samplers to."""
        logits = self.logits(ctx, idx)
        self.data["id"] = self._ids
        self.data["logit"] = logits
        self.data["p"] = 0.0
        a = self.array
        a.size, a.selected, a.sorted = self.n_vocab, -1, False
        return ctypes.byref(a)

    def selected(self) -> int:
        a = self.array
        if not 0 <= a.selected < a.size:
            raise RowError("the sampler chain selected no token")
        return int(self.data["id"][a.selected])

    def logits(self, ctx, idx: int) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))

    def best_allowed(self, grammar, logits: np.ndarray, k: int = TOP_K_FIRST) -> int | None:
        """The highest-logit token `grammar` allows, looked for among the `k` best only: None
        when none of them is allowed (the caller then asks about the whole vocabulary)."""
        top = np.argpartition(logits, -k)[-k:]
        top = top[np.argsort(-logits[top], kind="stable")]
        data = np.zeros(k, dtype=TOKEN_DATA)
        data["id"], data["logit"] = top, logits[top]
        arr = llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), size=k, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(arr))
        allowed = np.flatnonzero(np.isfinite(data["logit"]))
        return int(data["id"][allowed[0]]) if len(allowed) else None

    def quote_tokens(self) -> np.ndarray:
        """Tokens whose text starts with a double quote (what closes a JSON string), found once."""
        if self._quotes is None:
            self._quotes = np.array([t for t in range(self.n_vocab) if token_piece(self.vocab, t)[:1] == b'"'],
                                    dtype=np.int64)
        return self._quotes

    def best_closing(self, grammar, logits: np.ndarray) -> int | None:
        """The highest-logit token starting with `"` that `grammar` allows, or None."""
        quotes = self.quote_tokens()
        data = np.zeros(len(quotes), dtype=TOKEN_DATA)
        data["id"], data["logit"] = quotes, logits[quotes]
        arr = llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), size=len(quotes), selected=-1,
            sorted=False)
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(arr))
        allowed = np.flatnonzero(np.isfinite(data["logit"]))
        return int(data["id"][allowed[np.argmax(data["logit"][allowed])]]) if len(allowed) else None

    def allows(self, grammar, token: int) -> bool:
        """Whether `grammar` (in its current state) accepts `token` next."""
        one = self._one
        one["id"], one["logit"], one["p"] = token, 0.0, 0.0
        a = self._one_array
        a.size, a.selected, a.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(a))
        return bool(np.isfinite(one["logit"][0]))


class RowSampler:
    """The sampler chain of one row (create_completion's order) plus its grammar, if any.

    Raises RowError when llama.cpp cannot parse the grammar. `stats` (the engine's) counts
    grammar rows' sampled tokens (`grammar_samples`) and those the grammar rejected
    (`grammar_rejections`: each cost a whole-vocabulary pass).
    """

    def __init__(self, vocab, req: GenerationRequest, candidates: Candidates, stats: dict):
        self.candidates = candidates
        self.stats = stats
        self.grammar = None
        if req.grammar is not None:
            with LogCapture() as log:
                self.grammar = llama_cpp.llama_sampler_init_grammar(vocab, req.grammar.encode("utf-8"), b"root")
            if not self.grammar:
                self.grammar = None
                raise RowError(f"invalid GBNF grammar: {log.reason('llama.cpp could not parse it')}")
        self.chain = _chain(vocab, req)
        # plain greedy (no penalty changes a logit): the best allowed token can be found without the chain
        self.greedy = req.temperature == 0 and req.repeat_penalty == 1.0
        self.closing = False  # a string repeats itself: end it with the best allowed `"` token (see watch)
        self.logprob = 0.0 if req.logprobs and self.grammar is not None else None  # see _score

    def watch(self, text: bytes) -> None:
        """After each token of a grammar row: a JSON string that repeats a phrase is closed next."""
        if self.grammar is not None and not self.closing:
            self.closing = repeats(open_string(text))

    def sample(self, ctx, idx: int) -> int:
        """Pick the next token from batch position `idx` and accept it."""
        if self.grammar is None:
            return llama_cpp.llama_sampler_sample(self.chain, ctx, idx)  # picks and accepts
        c = self.candidates
        if self.logprob is not None:
            return self._score(ctx, idx)
        if self.closing:
            self.closing = False
            token = c.best_closing(self.grammar, c.logits(ctx, idx))
            if token is not None:
                self.stats["repeats_stopped"] = self.stats.get("repeats_stopped", 0) + 1
                self.accept(token)
                return token
        if self.greedy:
            token = self._greedy(ctx, idx)
            self.accept(token)
            return token
        llama_cpp.llama_sampler_apply(self.chain, c.fill(ctx, idx))
        token = c.selected()
        self.stats["grammar_samples"] = self.stats.get("grammar_samples", 0) + 1
        if not c.allows(self.grammar, token):  # only now pay for the whole vocabulary
            self.stats["grammar_rejections"] = self.stats.get("grammar_rejections", 0) + 1
            self.stats["grammar_full_passes"] = self.stats.get("grammar_full_passes", 0) + 1
            cur = c.fill(ctx, idx)
            llama_cpp.llama_sampler_apply(self.grammar, cur)
            llama_cpp.llama_sampler_apply(self.chain, cur)
            token = c.selected()
        self.accept(token)
        return token

    def _score(self, ctx, idx: int) -> int:
        """Sample as usual from the grammar-allowed tokens, and add log p(chosen | allowed) (the
        model's softmax renormalized over what the grammar allows: for a choice among labels, the
        probability of the chosen one among them)."""
        c = self.candidates
        cur = c.fill(ctx, idx)
        llama_cpp.llama_sampler_apply(self.grammar, cur)
        logits = c.data["logit"].astype(np.float64)
        allowed = np.isfinite(logits)
        llama_cpp.llama_sampler_apply(self.chain, cur)
        token = c.selected()
        top = logits[allowed].max()
        self.logprob += float(logits[token] - top - np.log(np.exp(logits[allowed] - top).sum()))
        self.accept(token)
        return token

    def _greedy(self, ctx, idx: int) -> int:
        """Exactly grammar-first greedy: the best token if allowed, else the best allowed one among
        the TOP_K_FIRST best, else (rarely) among all."""
        c = self.candidates
        logits = c.logits(ctx, idx)
        token = int(np.argmax(logits))  # the first maximum, as llama.cpp's greedy sampler picks
        self.stats["grammar_samples"] = self.stats.get("grammar_samples", 0) + 1
        if c.allows(self.grammar, token):
            return token
        self.stats["grammar_rejections"] = self.stats.get("grammar_rejections", 0) + 1
        token = c.best_allowed(self.grammar, logits)
        if token is None:
            self.stats["grammar_full_passes"] = self.stats.get("grammar_full_passes", 0) + 1
            cur = c.fill(ctx, idx)
            llama_cpp.llama_sampler_apply(self.grammar, cur)
            llama_cpp.llama_sampler_apply(self.chain, cur)
            token = c.selected()
        return token

    def accept(self, token: int) -> None:
        """Advance chain and grammar by a token nothing accepted yet (never a sampled one twice)."""
        llama_cpp.llama_sampler_accept(self.chain, token)
        if self.grammar is not None:
            llama_cpp.llama_sampler_accept(self.grammar, token)

    def free(self) -> None:
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar is not None:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None


def open_string(text: bytes) -> bytes:
    """What follows the opening quote when `text` (JSON being written) ends inside a string, else b""."""
    inside, escaped, start = False, False, 0
    for i, byte in enumerate(text):
        if inside and escaped:
            escaped = False
        elif inside and byte == 0x5C:  # backslash
            escaped = True
        elif byte == 0x22:  # a quote
            inside, start = not inside, i + 1
    return text[start:] if inside else b""


REPEAT_MIN_CHARS = 12  # a phrase repeated this many characters' worth (and at least 3 times) is a loop


def repeats(text: bytes) -> bool:
    """Whether `text` ends with one phrase written three times or more in a row, covering at least
    REPEAT_MIN_CHARS characters ("one of the one of the one of the", "!!!!!!!!!!!!")."""
    for length in range(1, len(text) // 3 + 1):
        unit = text[-length:]
        times = max(3, -(-REPEAT_MIN_CHARS // length))
        if len(text) >= length * times and text.endswith(unit * times):
            return True
    return False


def _chain(vocab, req: GenerationRequest):
    """create_completion's chain without its grammar: penalties, then greedy or the sampling steps."""
    parts = [llama_cpp.llama_sampler_init_penalties(
        llama_cpp.llama_vocab_n_tokens(vocab), PENALTY_LAST_N, req.repeat_penalty, 0.0, 0.0)]
    seed = req.seed & 0xFFFFFFFF
    if req.temperature < 0:
        parts.append(llama_cpp.llama_sampler_init_dist(seed))
    elif req.temperature == 0:
        parts.append(llama_cpp.llama_sampler_init_greedy())
    else:
        parts += [
            llama_cpp.llama_sampler_init_top_k(req.top_k),
            llama_cpp.llama_sampler_init_typical(1.0, 1),
            llama_cpp.llama_sampler_init_top_p(req.top_p, 1),
            llama_cpp.llama_sampler_init_min_p(req.min_p, 1),
            llama_cpp.llama_sampler_init_temp(req.temperature),
            llama_cpp.llama_sampler_init_dist(seed),
        ]
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for part in parts:
        llama_cpp.llama_sampler_chain_add(chain, part)  # the chain owns and frees it
    return chain
