"""Continuous batching of many rows in one llama.cpp context, through the low-level bindings.

How a run works (rows, slots, the shared prefix, the step loop): llama_run.py.

KV layouts (`kv_unified`); isolated is the default because it is exact and faster:
- isolated (not unified): llama.cpp gives each sequence its own stream of n_ctx/(S+1)
  cells. A row decodes bit-identically whatever else runs (the text create_completion
  gives; same seed, same text) and attends only over its own cells. A row must fit one
  stream (`row_ctx`); the prefix copy is a buffer copy.
- unified: one pool of n_ctx cells, so rows of any length share it, and a prefix copy only
  tags cells. But every token attends over all used cells (masked), which makes prompt
  chunks and decoding much slower with many long rows, and a row's rounding depends on
  where its cells lie, so near-ties flip: text often differs from a lone run after a while.
  Measured on 48 SciTLDR rows (2 CPU cores): isolated 48/48 identical texts and 1.3x the
  speed of a create_completion loop; unified 14/48 identical and slower than that loop.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator

import llama_cpp

from tokenmill.errors import ModelError
from tokenmill.models.base import Completion, GenerationRequest, ModelSettings, default_threads
from tokenmill.models.jump_forward import MAX_FORCED, JumpForward
from tokenmill.models.llama_load import FIRST_STREAM_CELLS, create_context, gpu_layers, grown_stream, load_model
from tokenmill.models.llama_rates import measure
from tokenmill.models.llama_run import Run
from tokenmill.models.llama_sampling import gpu_names
from tokenmill.models.machine import ADAPT_EVERY_S, CoreWatch, threads_beside
from tokenmill.models.row_sampler import Candidates

DEFAULT_KV_UNIFIED = False


class LlamaBatchedBackend:
    """Many rows decoded together in one llama.cpp context, with continuous batching.

    `generate` pulls requests lazily, admits one whenever a sequence slot is free and its
    prompt + max_tokens fits the KV cache, evaluates the common prompt prefix once, and
    yields each Completion as soon as its row finishes. Per row: its own sampler chain,
    stops, grammar and usage, as `Llama.create_completion` would give.

    `kv_unified` picks the KV layout (module docstring); None uses DEFAULT_KV_UNIFIED
    (isolated). With isolated streams `settings.n_ctx` is shared out: each row may use
    n_ctx/(n_seq+1) tokens, as llama.cpp's server splits -c across its slots.
    Attributes: `n_ctx` (all cells now), `row_ctx` (most tokens one row may use),
    `stream_ctx` (cells each isolated stream holds now: streams start small and grow to
    row_ctx when a longer row comes, once the rows before it are done), `n_seq`
    (slots), `n_batch`, `n_threads`, `n_gpu_layers`, `kv_unified`, and `stats` (cumulative
    llama_decode calls and seconds, prompt and generated tokens decoded, generate_calls:
    calls holding generated tokens, forced_tokens: completion tokens jump-forward appended,
    jump_forward_s: time spent finding them).
    """

    polls_input = True  # generate() accepts None from its request iterable: "nothing now"

    def __init__(self, settings: ModelSettings, *, kv_unified: bool | None = None):
        self.settings = settings
        self.on_step = None  # called after every llama_decode (Backend protocol)
        self.kv_unified = DEFAULT_KV_UNIFIED if kv_unified is None else kv_unified
        self._model = self._ctx = self._batch = None
        self._busy = False
        self.n_threads = self.most_threads = settings.n_threads or default_threads()
        self.n_gpu_layers = gpu_layers(settings)
        self._model, self._tensor_split = load_model(settings, self.n_gpu_layers)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        try:
            self._ctx, self.n_batch, self.n_seq, self.row_ctx = create_context(
                settings, self._model, self.kv_unified, self.n_gpu_layers, self.n_threads,
                settings.stream_cells or FIRST_STREAM_CELLS)
        except ModelError:
            self.close()
            raise
        self._context_created()
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._candidates = Candidates(self._vocab)  # grammar rows' sampling scratch (row_sampler.py)
        self._filler = max(llama_cpp.llama_vocab_bos(self._vocab), 0)  # stand-in token (see Run.fill_gaps)
        self.stats = {"decode_calls": 0, "decode_s": 0.0, "prompt_tokens": 0, "generated_tokens": 0,
                      "prompt_s": 0.0, "generate_s": 0.0, "generate_calls": 0, "forced_tokens": 0,
                      "jump_forward_s": 0.0, "sample_s": 0.0, "text_s": 0.0, "run_s": 0.0, "idle_s": 0.0, "admit_s": 0.0,
                      "grammar_samples": 0, "grammar_rejections": 0, "stream_resizes": 0, "thread_changes": 0}
        self.jump = JumpForward(self._vocab, self.stats) if settings.jump_forward else None
        self.max_forced = min(MAX_FORCED, self.n_batch // self.n_seq - 1)
        self.last_decode_s = 0.0
        self._cores = CoreWatch() if settings.adapt_threads and not self.n_gpu_layers else None

    def _context_created(self) -> None:
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)  # llama.cpp pads to multiples of 256
        self.stream_ctx = self.n_ctx if self.kv_unified else llama_cpp.llama_n_ctx_seq(self._ctx)
        self.row_ctx = max(self.row_ctx, self.stream_ctx)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._prefix: list[int] = []  # tokens sequence 0 should hold
        self._prefix_done = 0  # how many of them it holds now
        self._forget_slots()

    def _forget_slots(self) -> None:
        """No slot holds anything a row could reuse (a new context, or the rate probe used them)."""
        self._held: dict[int, list[int]] = {}  # isolated mode: free slot -> the tokens its stream holds
        self._last_used: dict[int, int] = {}  # slot -> when a row last left it (a counter)
        self._releases = 0

    def grow_streams(self, need: int) -> None:
        """A new context whose isolated streams hold `need` cells (see llama_load.grown_stream);
        only while no row is seated. The cached prefix goes with the old one."""
        cells = grown_stream(self.stream_ctx, need, self.row_ctx)
        llama_cpp.llama_free(self._ctx)
        self._ctx = None
        self._ctx, _, _, _ = create_context(self.settings, self._model, self.kv_unified, self.n_gpu_layers,
                                            self.n_threads, cells)
        self._context_created()
        self.stats["stream_resizes"] += 1

    def device(self) -> str:
        if self.n_gpu_layers:
            return f"gpu: {gpu_names()} (main_gpu={self.settings.main_gpu}, split={self.settings.split_mode})"
        return f"cpu ({self.most_threads} threads)"

    def close(self) -> None:
        """Free the batch, context and model; safe to call twice."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
        if self._model:
            llama_cpp.llama_model_free(self._model)
        self._ctx = self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit llama_cpp may already be torn down
            pass

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Completion]:
        """Yield one Completion per request, as each finishes (order not kept).

        Calls `next(requests)` whenever a slot is free. The iterable may yield None for
        "nothing to send now" (`polls_input`): rows already running go on, and an idle
        engine asks again shortly. A blocking iterable works too, but then a feeder must keep
        more requests coming than there are slots, or end the iterable.
        """
        if self._busy:
            raise RuntimeError("LlamaBatchedBackend.generate is already running; one run at a time")
        self._busy = True
        run = Run(self, iter(requests))
        try:
            yield from run.loop()
        finally:
            run.release_all()
            self._busy = False

    def measure_rates(self, prompt_tokens: int = 256, steps: int = 16) -> dict:
        """Measured prefill tokens/s (one prompt) and batched decode tokens/s (n_seq rows): see llama_rates."""
        if self._busy:
            raise RuntimeError("measure_rates cannot run while generate is running")
        return measure(self, prompt_tokens, steps)

    # -- used by Run (llama_run.py) and llama_rates.measure --

    def _decode(self, n_tokens: int) -> int:
        if self._cores is not None and self._cores.seconds() >= ADAPT_EVERY_S:
            self._adapt_threads()
        self._batch.n_tokens = n_tokens
        t0 = time.perf_counter()
        ret = llama_cpp.llama_decode(self._ctx, self._batch)
        self.last_decode_s = time.perf_counter() - t0
        self.stats["decode_s"] += self.last_decode_s
        self.stats["decode_calls"] += 1
        return ret

    def _adapt_threads(self) -> None:
        """Fewer threads while other programs keep cores busy: llama.cpp's threads wait for
        each other at every step, so one without a core of its own stalls them all."""
        threads = threads_beside(self._cores.elsewhere(), self.most_threads)
        if threads != self.n_threads:
            llama_cpp.llama_set_n_threads(self._ctx, threads, threads)
            self.n_threads = threads
            self.stats["thread_changes"] += 1

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self._batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq

    def _copy_prefix(self, src: int, dst: int, length: int) -> None:
        if self.kv_unified:  # tags the cells with dst: nothing is copied
            llama_cpp.llama_memory_seq_cp(self._mem, src, dst, 0, length)
        else:  # streams only copy whole; then drop what is not shared
            llama_cpp.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
            llama_cpp.llama_memory_seq_rm(self._mem, dst, length, -1)
