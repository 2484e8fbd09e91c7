"""Continuous batching of many rows in one llama.cpp context, through the low-level bindings.

Design (see LlamaBatchedBackend's docstring for the public contract):
- One context with a *unified* KV cache (`kv_unified=True`): all sequences draw cells from
  one pool of n_ctx cells, so short and long rows share the context freely, and
  `llama_memory_seq_cp` only tags existing cells with another sequence id (no copy).
- Sequence 0 holds the most recently seen common prompt prefix; rows live in sequences
  1..S. A new row copies the prefix it shares and decodes only the rest of its prompt.
- Each `llama_decode` carries the next token of every generating row, then prefix tokens,
  then prompt chunks of rows being admitted, up to n_batch tokens.
- A row is admitted only when its cells (prompt + max_tokens, minus cells it shares) fit
  next to what the running rows and the prefix have reserved, so the cache never overflows.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import llama_cpp

from tokenmill.errors import ModelError
from tokenmill.models.base import Completion, GenerationRequest, ModelSettings
from tokenmill.models.llama_sampling import (
    RowError,
    RowText,
    build_sampler,
    token_piece,
    tokenize_prompt,
)

PREFIX_SEQ = 0
MIN_SHARED = 8  # a shorter common prefix is not worth trimming the cached one for
DEFAULT_SLOTS = 16
_SPLIT_MODES = {
    "none": llama_cpp.LLAMA_SPLIT_MODE_NONE,
    "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
    "row": llama_cpp.LLAMA_SPLIT_MODE_ROW,
}


@dataclass(eq=False)
class _Row:
    req: GenerationRequest
    tokens: list[int]
    sampler: object
    text: RowText
    t_pulled: float
    slot: int = -1
    shared: int = 0  # prompt tokens copied from the prefix sequence
    counted: int = 0  # of those, cells the prefix reservation still pays for
    n_past: int = 0  # this row's positions now in the KV cache
    started: bool = False  # prefix copied, own tokens being decoded
    next_token: int = -1  # sampled, decoded in the next step; -1 while prompting
    t_admit: float = 0.0
    t_prompt_end: float = 0.0

    @property
    def cells(self) -> int:
        return len(self.tokens) + self.req.max_tokens - self.counted


class _LogCapture:
    """Swallow llama.cpp's log while loading, keeping error lines for our one-line message."""

    def __init__(self) -> None:
        self.errors: deque[str] = deque(maxlen=4)
        self._callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes, _user) -> None:
        if level == 3 and text:  # GGML_LOG_LEVEL_ERROR
            self.errors.append(text.decode("utf-8", "replace").strip())

    def __enter__(self) -> "_LogCapture":
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *_exc) -> None:
        from llama_cpp import _logger  # the default sink llama_cpp installs at import

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


class LlamaBatchedBackend:
    """Many rows decoded together in one llama.cpp context, with continuous batching.

    `generate` pulls requests lazily, admits one whenever a sequence slot is free and its
    prompt + max_tokens fits the KV cache, shares the common prompt prefix across rows, and
    yields each Completion as soon as its row finishes. Output for a row matches
    `Llama.create_completion` on the same prompt and settings (up to float rounding in
    batched matrix products). Attributes: `n_ctx`, `n_batch`, `n_seq` (slots), `n_threads`,
    `n_gpu_layers`, `stats` (cumulative decode counters). `measure_rates()` benchmarks
    prefill and batched-decode tokens/s.
    """

    def __init__(self, settings: ModelSettings):
        self.settings = settings
        self._model = self._ctx = self._batch = None
        self._busy = False
        self.n_threads = settings.n_threads or os.cpu_count() or 1
        offload = llama_cpp.llama_supports_gpu_offload()
        layers = settings.n_gpu_layers
        self.n_gpu_layers = (0x7FFFFFFF if offload else 0) if layers == -1 else (layers if offload else 0)
        self._load_model(Path(settings.model_path))
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._create_context()
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._prefix: list[int] = []  # tokens sequence 0 should hold
        self._prefix_done = 0  # how many of them it holds now
        self.stats = {"decode_calls": 0, "decode_s": 0.0, "prompt_tokens": 0, "generated_tokens": 0}

    # ---- loading -------------------------------------------------------------------

    def _load_model(self, path: Path) -> None:
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelError(f"{path} is not a GGUF model file (no GGUF magic bytes)")
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = self.n_gpu_layers
        params.split_mode = _SPLIT_MODES.get(self.settings.split_mode, llama_cpp.LLAMA_SPLIT_MODE_LAYER)
        params.main_gpu = self.settings.main_gpu
        if self.settings.tensor_split:
            split = list(self.settings.tensor_split)[: llama_cpp.LLAMA_MAX_DEVICES]
            self._tensor_split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*split)
            params.tensor_split = self._tensor_split  # kept on self: C holds the pointer
        with _LogCapture() as log:
            self._model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not self._model:
            why = log.errors[-1] if log.errors else "truncated file or unsupported architecture"
            raise ModelError(f"cannot load model {path}: {why}")

    def _create_context(self) -> None:
        s = self.settings
        n_ctx = s.n_ctx or llama_cpp.llama_model_n_ctx_train(self._model)
        self.n_batch = max(1, min(s.n_batch, n_ctx))
        # Slots cost no KV memory with a unified cache; the cell budget limits concurrency.
        # Bound them so each step still has room for prompt tokens.
        slots = s.n_seq or min(DEFAULT_SLOTS, max(1, n_ctx // 128))
        self.n_seq = max(1, min(slots, llama_cpp.llama_max_parallel_sequences() - 1, self.n_batch // 2 or 1))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = self.n_seq + 1  # + the prefix sequence
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = self.n_threads
        # CPU: no flash attention, like Llama()'s default, so results match create_completion.
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if self.n_gpu_layers else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        with _LogCapture() as log:
            self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            why = log.errors[-1] if log.errors else "llama_init_from_model failed"
            self.close()
            raise ModelError(f"cannot create a context for {s.model_path}: {why}")
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)  # llama.cpp pads to a multiple of 256

    # ---- public API ----------------------------------------------------------------

    def device(self) -> str:
        if self.n_gpu_layers:
            return f"gpu: {_gpu_names()} (main_gpu={self.settings.main_gpu}, split={self.settings.split_mode})"
        return f"cpu ({self.n_threads} threads)"

    def close(self) -> None:
        """Free the batch, context and model; safe to call twice."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
        self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
        self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Completion]:
        """Yield one Completion per request, as each finishes (order not kept)."""
        if self._busy:
            raise RuntimeError("LlamaBatchedBackend.generate is already running; one at a time")
        self._busy = True
        run = _Run(self, iter(requests))
        try:
            yield from run.loop()
        finally:
            run.release_all()
            self._busy = False

    def measure_rates(self, prompt_tokens: int = 256, steps: int = 16) -> dict:
        """Measure prefill tokens/s (one prompt) and batched decode tokens/s (n_seq rows).

        Decode steps include greedy sampling and attend to a `prompt_tokens` context, like
        real rows. Ceiling estimate: prompt_tokens/prefill + completion_tokens/decode.
        """
        if self._busy:
            raise RuntimeError("measure_rates cannot run while generate is running")
        return _measure(self, prompt_tokens, steps)

    # ---- helpers shared with the run loop ------------------------------------------

    def _decode(self, n_tokens: int, prompt_tokens: int) -> int:
        self._batch.n_tokens = n_tokens
        t0 = time.perf_counter()
        ret = llama_cpp.llama_decode(self._ctx, self._batch)
        self.stats["decode_s"] += time.perf_counter() - t0
        self.stats["decode_calls"] += 1
        if ret == 0:
            self.stats["prompt_tokens"] += prompt_tokens
            self.stats["generated_tokens"] += n_tokens - prompt_tokens
        return ret

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits


class _Run:
    """The state of one `generate` call: slots, rows, the prefix sequence and the step loop."""

    def __init__(self, engine: LlamaBatchedBackend, source: Iterator[GenerationRequest]):
        self.e = engine
        self.source = source
        self.exhausted = False
        self.pending: _Row | None = None  # pulled, waiting for a slot or KV cells
        self.rows: list[_Row] = []  # admitted, in admission order
        self.free = list(range(engine.n_seq, 0, -1))  # sequence ids 1..S, PREFIX_SEQ excluded
        self.out: list[Completion] = []

    # -- loop --

    def loop(self) -> Iterator[Completion]:
        while True:
            self.admit()
            yield from self.flush()
            if not self.rows:
                return  # admit() seats any pending row when nothing runs, so all is done
            self.start_ready()
            plan, n, n_prompt = self.build()
            ret = self.e._decode(n, n_prompt)
            if ret != 0:
                self.on_decode_failure(ret, plan)
            else:
                self.after_decode(plan)
            yield from self.flush()

    def flush(self) -> Iterator[Completion]:
        out, self.out = self.out, []
        yield from out

    # -- admission --

    def admit(self) -> None:
        while self.free:
            if self.pending is None and not self.pull():
                return
            row = self.pending
            plan = self.choose_plan(row)
            if plan is None:
                return  # full: wait for a running row to finish
            self.pending = None
            self.seat(row, *plan)

    def pull(self) -> bool:
        """Fetch and validate the next request into self.pending; False when none is left."""
        while not self.exhausted:
            try:
                req = next(self.source)
            except StopIteration:
                self.exhausted = True
                return False
            row = self.prepare(req)
            if row is not None:
                self.pending = row
                return True
        return False

    def prepare(self, req: GenerationRequest) -> _Row | None:
        t = time.perf_counter()
        e, tokens = self.e, []
        try:
            tokens = tokenize_prompt(e._vocab, req.prompt)
            if req.max_tokens <= 0:
                raise RowError(f"max_tokens must be at least 1 (got {req.max_tokens})")
            if not tokens:
                raise RowError("the prompt is empty (it tokenizes to no tokens)")
            need = len(tokens) + req.max_tokens
            if need > e.n_ctx:
                raise RowError(
                    f"row needs {need} tokens (prompt {len(tokens)} + max_tokens {req.max_tokens}) "
                    f"but the context holds only {e.n_ctx}; raise --n-ctx or lower --max-tokens"
                )
            sampler = build_sampler(e._vocab, req)
        except RowError as err:
            self.out.append(Completion(req.index, None, "error", error=str(err), prompt_tokens=len(tokens)))
            return None
        stop = [s.encode("utf-8") for s in req.stop if s]
        text = RowText(stop=stop, bos=llama_cpp.llama_vocab_bos(e._vocab))
        return _Row(req=req, tokens=tokens, sampler=sampler, text=text, t_pulled=t)

    def choose_plan(self, row: _Row) -> tuple[str, int] | None:
        """How the row will use the prefix sequence, or None if its cells do not fit yet."""
        e, n = self.e, len(row.tokens)
        lcp = _common_prefix(e._prefix, row.tokens, n - 1)
        nobody_waits = all(r.started for r in self.rows)
        options = []
        if lcp >= MIN_SHARED:
            options.append(("share", lcp))
        elif nobody_waits and n - 1 >= MIN_SHARED:
            options.append(("replace", n - 1))
        options.append(("none", 0))
        if nobody_waits:
            options.append(("drop", 0))  # free the prefix's cells when memory is tight
        for mode, shared in options:
            if self.cells_after(row, mode, shared) <= e.n_ctx:
                return mode, shared
        return None

    def cells_after(self, row: _Row, mode: str, shared: int) -> int:
        """KV cells reserved once `row` is seated with `mode` (conservative: never too low)."""
        base = len(row.tokens) + row.req.max_tokens
        if mode == "share":
            return shared + sum(r.cells + r.counted - min(r.counted, shared) for r in self.rows) + base - shared
        if mode in ("replace", "drop"):  # the prefix then holds only this row's own cells
            return sum(r.cells + r.counted for r in self.rows) + base
        return len(self.e._prefix) + sum(r.cells for r in self.rows) + base

    def seat(self, row: _Row, mode: str, shared: int) -> None:
        e = self.e
        if mode == "share":
            self.trim_prefix(shared)
        elif mode in ("replace", "drop"):
            llama_cpp.llama_memory_seq_rm(e._mem, PREFIX_SEQ, -1, -1)
            for r in self.rows:
                r.counted = 0  # their copied cells are now theirs alone
            e._prefix = row.tokens[:shared] if mode == "replace" else []
            e._prefix_done = 0
        row.shared = row.counted = shared
        row.slot = self.free.pop()
        row.t_admit = time.perf_counter()
        self.rows.append(row)

    def trim_prefix(self, length: int) -> None:
        e = self.e
        if length >= len(e._prefix):
            return
        e._prefix = e._prefix[:length]
        if e._prefix_done > length:
            llama_cpp.llama_memory_seq_rm(e._mem, PREFIX_SEQ, length, -1)
            e._prefix_done = length
        for r in self.rows:
            r.counted = min(r.counted, length)
            if not r.started:
                r.shared = min(r.shared, length)

    def start_ready(self) -> None:
        """Copy the shared prefix into rows whose part of it is now in the cache."""
        e = self.e
        for r in self.rows:
            if not r.started and e._prefix_done >= r.shared:
                if r.shared:
                    llama_cpp.llama_memory_seq_cp(e._mem, PREFIX_SEQ, r.slot, 0, r.shared)
                r.n_past, r.started = r.shared, True

    # -- one decode step --

    def build(self) -> tuple[list[tuple[_Row | None, int, int]], int, int]:
        """Fill the batch: generated tokens first, then prefix, then prompt chunks."""
        e, plan, n = self.e, [], 0
        for r in self.rows:
            if r.next_token >= 0:
                e._put(n, r.next_token, r.n_past, r.slot, True)
                plan.append((r, n, 1))
                n += 1
        n_gen = n
        todo = len(e._prefix) - e._prefix_done
        if todo > 0 and n < e.n_batch:
            k = min(todo, e.n_batch - n)
            for j in range(k):
                pos = e._prefix_done + j
                e._put(n + j, e._prefix[pos], pos, PREFIX_SEQ, False)
            plan.append((None, -1, k))
            n += k
        for r in self.rows:
            if not r.started or r.next_token >= 0 or n >= e.n_batch:
                continue
            k = min(len(r.tokens) - r.n_past, e.n_batch - n)
            last = r.n_past + k == len(r.tokens)
            for j in range(k):
                e._put(n + j, r.tokens[r.n_past + j], r.n_past + j, r.slot, last and j == k - 1)
            plan.append((r, n + k - 1 if last else -1, k))
            n += k
        return plan, n, n - n_gen

    def after_decode(self, plan) -> None:
        e, now = self.e, time.perf_counter()
        for row, idx, k in plan:
            if row is None:
                e._prefix_done += k
                continue
            row.n_past += k
            if idx < 0:
                continue  # prompt chunk, more to come
            if row.next_token < 0:
                row.t_prompt_end = now
            token = llama_cpp.llama_sampler_sample(row.sampler, e._ctx, idx)  # also accepts it
            self.consume(row, token)

    def consume(self, row: _Row, token: int) -> None:
        e = self.e
        if llama_cpp.llama_vocab_is_eog(e._vocab, token):
            return self.finish(row, "stop")
        if row.text.add(token, token_piece(e._vocab, token)):
            return self.finish(row, "stop")
        if len(row.text.tokens) >= row.req.max_tokens:
            return self.finish(row, "length")
        row.next_token = token

    def finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        now = time.perf_counter()
        end = row.t_prompt_end or now
        self.out.append(
            Completion(
                index=row.req.index,
                text=None if error else row.text.text(),
                finish_reason="error" if error else reason,
                error=error,
                prompt_tokens=len(row.tokens),
                cached_tokens=row.shared if row.started else 0,
                completion_tokens=len(row.text.tokens),
                queue_ms=(row.t_admit - row.t_pulled) * 1000,
                prompt_ms=(end - row.t_admit) * 1000 if row.t_admit else 0.0,
                decode_ms=(now - end) * 1000 if row.t_prompt_end else 0.0,
            )
        )
        self.release(row)

    def release(self, row: _Row) -> None:
        if row.sampler is not None:
            llama_cpp.llama_sampler_free(row.sampler)
            row.sampler = None
        if row in self.rows:
            self.rows.remove(row)
            llama_cpp.llama_memory_seq_rm(self.e._mem, row.slot, -1, -1)
            self.free.append(row.slot)

    def release_all(self) -> None:
        """Free what an interrupted run still holds (the prefix sequence stays cached)."""
        for row in list(self.rows):
            self.release(row)
        if self.pending is not None:
            self.release(self.pending)
            self.pending = None

    def on_decode_failure(self, ret: int, plan) -> None:
        """Fail rows instead of the whole run; llama.cpp restored the cache when ret == 1."""
        e = self.e
        if ret == 1:  # no KV slot: our budget should prevent it; drop the newest row
            victim = self.rows[-1]
            return self.finish(victim, "error", "the KV cache is full (llama_decode returned 1); lower --n-seq")
        for row, _idx, _k in plan:
            if row is not None and row in self.rows:
                self.finish(row, "error", f"llama_decode failed (returned {ret})")
        if any(row is None for row, _i, _k in plan):  # the prefix may be half written
            llama_cpp.llama_memory_seq_rm(e._mem, PREFIX_SEQ, -1, -1)
            e._prefix, e._prefix_done = [], 0
            for r in self.rows:
                r.counted = 0
                if not r.started:
                    r.shared = 0


def _measure(e: LlamaBatchedBackend, prompt_tokens: int, steps: int) -> dict:
    """Time one prompt's prefill, then `steps` decode steps of n_seq rows sharing it."""
    n_seq = e.n_seq
    room = e.n_ctx - len(e._prefix) - n_seq * steps
    n_prompt = min(prompt_tokens, room)
    if n_prompt < 16:
        raise RuntimeError(f"the context ({e.n_ctx}) is too small to measure rates")
    filler = tokenize_prompt(e._vocab, "The quick brown fox jumps over the lazy dog. " * 32)
    tokens = (filler * (n_prompt // len(filler) + 1))[:n_prompt]
    greedy = llama_cpp.llama_sampler_init_greedy()
    try:
        e._put(0, tokens[0], 0, 1, True)  # warm-up: first decode pays one-time setup
        _decode_or_raise(e, 1)
        llama_cpp.llama_memory_seq_rm(e._mem, 1, -1, -1)
        t0 = time.perf_counter()
        for start in range(0, n_prompt, e.n_batch):
            chunk = tokens[start : start + e.n_batch]
            for j, tok in enumerate(chunk):
                e._put(j, tok, start + j, 1, start + j == n_prompt - 1)
            _decode_or_raise(e, len(chunk))
        prefill_s = time.perf_counter() - t0
        token = llama_cpp.llama_sampler_sample(greedy, e._ctx, len(chunk) - 1)
        for seq in range(2, n_seq + 1):
            llama_cpp.llama_memory_seq_cp(e._mem, 1, seq, 0, n_prompt)
        nexts = [token] * n_seq
        t0 = time.perf_counter()
        for step in range(steps):
            for i in range(n_seq):
                e._put(i, nexts[i], n_prompt + step, i + 1, True)
            _decode_or_raise(e, n_seq)
            nexts = [llama_cpp.llama_sampler_sample(greedy, e._ctx, i) for i in range(n_seq)]
        decode_s = time.perf_counter() - t0
    finally:
        llama_cpp.llama_sampler_free(greedy)
        for seq in range(1, n_seq + 1):
            llama_cpp.llama_memory_seq_rm(e._mem, seq, -1, -1)
    return {
        "prefill_tok_s": n_prompt / prefill_s,
        "decode_tok_s": n_seq * steps / decode_s,
        "n_seq": n_seq,
        "prompt_tokens": n_prompt,
    }


def _decode_or_raise(e: LlamaBatchedBackend, n_tokens: int) -> None:
    e._batch.n_tokens = n_tokens
    ret = llama_cpp.llama_decode(e._ctx, e._batch)
    if ret != 0:
        raise RuntimeError(f"llama_decode failed (returned {ret}) while measuring rates")


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _gpu_names() -> str:
    """Names of the GPUs ggml sees, via libggml's device registry; "gpu" if unavailable."""
    try:
        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so"))
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        lib.ggml_backend_dev_type.restype = ctypes.c_int
        lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_description.restype = ctypes.c_char_p
        lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
        names = []
        for i in range(lib.ggml_backend_dev_count()):
            dev = lib.ggml_backend_dev_get(i)
            if lib.ggml_backend_dev_type(dev) in (1, 2):  # GPU, integrated GPU
                names.append(lib.ggml_backend_dev_description(dev).decode("utf-8", "replace"))
        return ", ".join(names) or "gpu"
    except (OSError, AttributeError):
        return "gpu"
