"""Measured prefill and batched-decode rates of a LlamaBatchedBackend (its `measure_rates`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import llama_cpp

from tokenmill.models.llama_sampling import tokenize_prompt

if TYPE_CHECKING:
    from tokenmill.models.llama_batched import LlamaBatchedBackend


def measure(e: "LlamaBatchedBackend", prompt_tokens: int, steps: int) -> dict:
    """Time one prompt's prefill, then `steps` decode steps of n_seq rows that share it.

    Prefill tokens/s (one prompt) and batched decode tokens/s (n_seq rows). Decode steps
    include greedy sampling and attend to a `prompt_tokens` context, like rows do (in a
    unified cache the rows share that prompt's cells, so real rows, each with its own
    cells, decode slower than this). Returns prefill_tok_s, decode_tok_s, n_seq,
    prompt_tokens. Ceiling estimate for a run:
    uncached prompt tokens / prefill_tok_s + completion tokens / decode_tok_s.
    """
    # unified: the prompt's cells are shared by all rows; isolated: each stream holds a copy
    room = e.n_ctx - len(e._prefix) - e.n_seq * steps if e.kv_unified else e.stream_ctx - steps
    n_prompt = min(prompt_tokens, room)
    if n_prompt < 16:
        raise RuntimeError(f"the context ({e.n_ctx}) is too small to measure rates")
    filler = tokenize_prompt(e._vocab, "The quick brown fox jumps over the lazy dog. " * 32)
    tokens = (filler * (n_prompt // len(filler) + 1))[:n_prompt]
    greedy = llama_cpp.llama_sampler_init_greedy()
    for seq in range(1, e.n_seq + 1):  # what rows left in their slots is given up
        llama_cpp.llama_memory_seq_rm(e._mem, seq, -1, -1)
    e._forget_slots()
    try:
        e._put(0, tokens[0], 0, 1, True)  # warm-up: the first decode pays one-time setup
        _decode_or_raise(e, 1)
        llama_cpp.llama_memory_seq_rm(e._mem, 1, -1, -1)
        t0 = time.perf_counter()
        for start in range(0, n_prompt, e.n_batch):
            chunk = tokens[start : start + e.n_batch]
            for j, tok in enumerate(chunk):
                e._put(j, tok, start + j, 1, start + j == n_prompt - 1)
            _decode_or_raise(e, len(chunk))
        prefill_s = time.perf_counter() - t0
        nexts = [llama_cpp.llama_sampler_sample(greedy, e._ctx, len(chunk) - 1)] * e.n_seq
        for seq in range(2, e.n_seq + 1):
            e._copy_prefix(1, seq, n_prompt)
        t0 = time.perf_counter()
        for step in range(steps):
            for i in range(e.n_seq):
                e._put(i, nexts[i], n_prompt + step, i + 1, True)
            _decode_or_raise(e, e.n_seq)
            nexts = [llama_cpp.llama_sampler_sample(greedy, e._ctx, i) for i in range(e.n_seq)]
        decode_s = time.perf_counter() - t0
    finally:
        llama_cpp.llama_sampler_free(greedy)
        for seq in range(1, e.n_seq + 1):
            llama_cpp.llama_memory_seq_rm(e._mem, seq, -1, -1)
    return {"prefill_tok_s": n_prompt / prefill_s, "decode_tok_s": e.n_seq * steps / decode_s,
            "n_seq": e.n_seq, "prompt_tokens": n_prompt}


def _decode_or_raise(e: "LlamaBatchedBackend", n_tokens: int) -> None:
    ret = e._decode(n_tokens)
    if ret != 0:
        raise RuntimeError(f"llama_decode failed (returned {ret}) while measuring rates")
