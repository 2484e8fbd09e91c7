"""Jump-forward decoding: text a row's grammar forces is appended without sampling.

After a grammar row samples a token, this module finds the text the grammar now allows
in one way only (a JSON key after its opening quote, the rest of an enum value, `ull`
after `n`), tokenizes it, and the engine appends those tokens to the row: they count as
completion tokens and are evaluated with the sampled token in the row's next decode, so
the row needs one decode step and one sampling for the whole run instead of one each.

How the forced text is found. The obvious test, "all tokens the grammar allows share a
common prefix", needs the grammar applied to the whole vocabulary (49152 tokens for
SmolLM2) and only proves the shortest allowed token forced ("e" when "e", "eat" and
"eatType" are allowed), so it would be repeated once per byte. Instead the grammar is
asked byte by byte: a scratch clone of the row's grammar sampler is applied to one token
per byte value (the vocabulary's single-byte tokens) plus an end-of-generation token.
Every continuation the grammar allows starts with one of those bytes (or ends), so when
exactly one byte token survives and EOG does not, that byte is forced; the clone accepts
it and the probe repeats. A probe is ~257 candidates instead of 49152, and the clone
keeps the row's own sampler untouched until the text is known to be forced.

The forced bytes (cut to whole UTF-8 characters) are tokenized on their own, without
special tokens, and kept only if the tokens spell exactly those bytes. The engine then
feeds each token once to the row's sampler chain with `llama_sampler_accept` (grammar
and repeat-penalty history advance as if sampled; a second accept of a sampled token
would abort the process). Tokenizing forced text alone may split it differently from
what the model would sample, so the last forced token is left out: the model samples
it, or a longer token that starts with it. Forcing `name"` whole gave `name`+`"`, after
which SmolLM2 wrote `"name" : ...` (a lone `"` token is rare in its training) where it
writes `"name": ...` (`":` is one token) when it may choose. Text can still differ from
a run without jump-forward (forced runs split as the tokenizer splits them alone, and
the logits after them differ slightly); it always stays valid for the grammar.

A byte that no token can produce needs no probe. A vocabulary where some byte appears in
tokens but has no single-byte token could hide an allowed continuation from the probe;
jump-forward is then off for that engine (`available`). SmolLM2 passes: every byte its
tokens use has its own token.
"""

from __future__ import annotations

import ctypes
import time

import llama_cpp
import numpy as np

from tokenmill.models.llama_sampling import token_piece, tokenize_text

MAX_FORCED = 16  # tokens appended after one sampled token, at most
MAX_FORCED_BYTES = 96  # probes per sampled token, at most
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class JumpForward:
    """Per engine: finds the tokens a row's grammar forces next. Built lazily (one vocab scan)."""

    def __init__(self, vocab, stats: dict):
        self.vocab = vocab
        self.stats = stats  # the engine's: jump_forward_s grows by the time spent here
        self._ready = False
        self.available = False

    def _build(self) -> None:
        self._ready = True
        vocab = self.vocab
        byte_token: dict[int, int] = {}
        used: set[int] = set()  # every byte some token can produce
        for tok in range(llama_cpp.llama_vocab_n_tokens(vocab)):
            if llama_cpp.llama_vocab_is_control(vocab, tok) or llama_cpp.llama_vocab_is_eog(vocab, tok):
                continue
            piece = token_piece(vocab, tok)
            used.update(piece)
            if len(piece) == 1:
                byte_token.setdefault(piece[0], tok)
        eog = next((t for t in (llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab))
                    if t >= 0 and llama_cpp.llama_vocab_is_eog(vocab, t)), -1)
        if not used <= set(byte_token) or eog < 0:
            return  # a byte only reachable inside longer tokens would be missed by the probe
        self._bytes = np.array(sorted(byte_token), dtype=np.uint8)  # candidate i -> its byte
        ids = [byte_token[b] for b in self._bytes.tolist()] + [eog]
        self._data = np.zeros(len(ids), dtype=_TOKEN_DATA)
        self._data["id"] = ids
        self._array = llama_cpp.llama_token_data_array(
            data=self._data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
            size=len(ids), selected=-1, sorted=False)
        self.available = True

    def forced_tokens(self, grammar, limit: int) -> list[int]:
        """Up to `limit` tokens the grammar (a sampler in its current state) forces next."""
        if limit <= 0:
            return []
        if not self._ready:
            self._build()
        if not self.available:
            return []
        t0 = time.perf_counter()
        text = self._forced_bytes(grammar, min(MAX_FORCED_BYTES, 4 * (limit + 1)))
        tokens = self._tokens(_whole_chars(text))[:-1][:limit]  # the last one is left to the model
        self.stats["jump_forward_s"] = self.stats.get("jump_forward_s", 0.0) + time.perf_counter() - t0
        return tokens

    def _forced_bytes(self, grammar, limit: int) -> bytes:
        scratch = llama_cpp.llama_sampler_clone(grammar)
        out = bytearray()
        try:
            logits, arr = self._data["logit"], self._array
            while len(out) < limit:
                logits[:] = 0.0
                arr.size, arr.selected, arr.sorted = len(self._data), -1, False
                llama_cpp.llama_sampler_apply(scratch, ctypes.byref(arr))
                allowed = np.flatnonzero(np.isfinite(logits))
                if len(allowed) != 1 or allowed[0] == len(self._bytes):  # a choice, or EOG allowed
                    break
                out.append(int(self._bytes[allowed[0]]))
                llama_cpp.llama_sampler_accept(scratch, int(self._data["id"][allowed[0]]))
        finally:
            llama_cpp.llama_sampler_free(scratch)
        return bytes(out)

    def _tokens(self, text: bytes) -> list[int]:
        if not text:
            return []
        tokens = tokenize_text(self.vocab, text, special=False)
        if b"".join(token_piece(self.vocab, t) for t in tokens) != text:
            return []  # e.g. a tokenizer that adds a leading space: not the forced text
        return tokens


def _whole_chars(text: bytes) -> bytes:
    """`text` without a split UTF-8 character at its end."""
    for cut in range(len(text), max(len(text) - 4, -1), -1):
        try:
            text[:cut].decode("utf-8")
            return text[:cut]
        except UnicodeDecodeError:
            continue
    return b""
