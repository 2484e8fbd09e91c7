"""Per-row pieces of the batched llama.cpp engine: tokenizing, sampler chains, text and stops.

Everything here mirrors `llama_cpp.Llama.create_completion` so that a row decoded in a
batch gives the same tokens, text, finish reason and usage as that reference call.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import llama_cpp

from tokenmill.models.base import GenerationRequest

# create_completion's Llama keeps the last 64 tokens for its repeat penalty.
PENALTY_LAST_N = 64


class RowError(Exception):
    """A problem with one row (bad grammar, too long, ...): that row fails, the batch goes on."""


def tokenize_prompt(vocab, prompt: str) -> list[int]:
    """Tokens exactly as create_completion builds them: [BOS/CLS if the vocab asks] + text (+ EOS/SEP)."""
    text = prompt.encode("utf-8")
    tokens = _tokenize(vocab, text) if text else []
    bos = llama_cpp.llama_vocab_bos(vocab)
    cls = llama_cpp.llama_vocab_cls(vocab)
    sep = llama_cpp.llama_vocab_sep(vocab)
    head = [cls if cls != -1 else bos]
    if not llama_cpp.llama_vocab_get_add_bos(vocab) or head[0] == -1:
        head = []
    tail = [sep if sep != -1 else llama_cpp.llama_vocab_eos(vocab)]
    if not llama_cpp.llama_vocab_get_add_eos(vocab) and sep == -1:
        tail = []
    return head + tokens + tail


def _tokenize(vocab, text: bytes) -> list[int]:
    size = len(text) + 16  # a token covers at least one byte, plus specials
    buf = (llama_cpp.llama_token * size)()
    n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, size, False, True)
    if n < 0:  # buffer too small: llama.cpp tells us the size it needs
        size = -n
        buf = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, size, False, True)
        if n < 0:
            raise RowError(f"could not tokenize the prompt (llama_tokenize returned {n})")
    return list(buf[:n])


def token_piece(vocab, token: int) -> bytes:
    """The bytes of one token, special tokens rendered as nothing (as create_completion does)."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, 64, 0, False)
    if n < 0:  # piece longer than the buffer
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, -n, 0, False)
    return buf.raw[:n]


def build_sampler(vocab, req: GenerationRequest):
    """A llama_sampler chain for one row, in create_completion's order; caller frees it.

    Raises RowError for a grammar llama.cpp cannot parse (init_grammar returns NULL).
    """
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    parts = [
        llama_cpp.llama_sampler_init_penalties(
            llama_cpp.llama_vocab_n_tokens(vocab), PENALTY_LAST_N, req.repeat_penalty, 0.0, 0.0
        )
    ]
    if req.grammar is not None:
        grammar = llama_cpp.llama_sampler_init_grammar(vocab, req.grammar.encode("utf-8"), b"root")
        if not grammar:
            _free_all(chain, parts)
            raise RowError("invalid grammar: llama.cpp could not parse the GBNF (needs a `root` rule)")
        parts.append(grammar)
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
    for part in parts:
        llama_cpp.llama_sampler_chain_add(chain, part)  # the chain now owns it
    return chain


def _free_all(chain, parts) -> None:
    llama_cpp.llama_sampler_free(chain)
    for part in parts:
        llama_cpp.llama_sampler_free(part)


def _incomplete_utf8(text: bytes) -> bool:
    """True when `text` ends inside a multi-byte UTF-8 character (create_completion's check)."""
    pending = 0
    for k, char in enumerate(text[-3:]):
        k = 3 - k
        for num, pattern in ((2, 192), (3, 224), (4, 240)):
            if num > k and pattern & char == pattern:
                pending = num - k
    return pending > 0


@dataclass
class RowText:
    """Generated tokens and bytes of one row, with create_completion's stop-string rules."""

    stop: list[bytes]
    bos: int
    tokens: list[int] = field(default_factory=list)
    data: bytes = b""
    cut: int | None = None  # byte offset where a stop string begins

    def add(self, token: int, piece: bytes) -> bool:
        """Append a non-EOG token; True when a stop string has appeared."""
        self.tokens.append(token)
        self.data += piece
        if not self.stop or _incomplete_utf8(self.data):
            return False  # create_completion defers the stop check until the character is whole
        found = [s for s in self.stop if s in self._visible()]
        if found:
            self.cut = self._visible().index(found[0])
            return True
        return False

    def _visible(self) -> bytes:
        # Llama.detokenize drops a leading space after a BOS token.
        if self.tokens and self.tokens[0] == self.bos and self.data[:1] == b" ":
            return self.data[1:]
        return self.data

    def text(self) -> str:
        visible = self._visible()
        if self.cut is not None:
            visible = visible[: self.cut]
        return visible.decode("utf-8", errors="ignore")
