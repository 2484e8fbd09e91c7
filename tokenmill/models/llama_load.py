"""Loading a GGUF model and creating the batched engine's context, through the low-level bindings."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
from llama_cpp import _logger

from tokenmill.errors import ModelError
from tokenmill.models.base import ModelSettings
from tokenmill.models.llama_sampling import LogCapture

MAX_SLOTS = 16
# Isolated streams start this small and grow when a row needs more (grown_stream): attention
# and KV upkeep cost grows with a stream's size even where its cells are unused (W1 engine
# alone, 2 cores: 1,024-cell streams 22 % faster than 4,096-cell ones, the same text).
FIRST_STREAM_CELLS = 1024
_SPLIT_MODES = {"none": llama_cpp.LLAMA_SPLIT_MODE_NONE, "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
                "row": llama_cpp.LLAMA_SPLIT_MODE_ROW}


def gpu_layers(settings: ModelSettings) -> int:
    """Layers to offload: 0 when the build cannot offload; -1 in the settings means all."""
    if not llama_cpp.llama_supports_gpu_offload():
        return 0
    return 0x7FFFFFFF if settings.n_gpu_layers == -1 else max(settings.n_gpu_layers, 0)


def load_model(settings: ModelSettings, n_gpu_layers: int):
    """(model, keep-alive): the second must live as long as the model (C keeps its pointer)."""
    path = Path(settings.model_path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF model file (no GGUF magic bytes)")
    # llama.cpp's info and debug lines (graph inputs at every new batch shape) would flood the
    # terminal; LogCapture keeps what an error message needs
    _logger.set_verbose(False)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.split_mode = _SPLIT_MODES.get(settings.split_mode, llama_cpp.LLAMA_SPLIT_MODE_LAYER)
    params.main_gpu = settings.main_gpu
    keep = None
    if settings.tensor_split:
        split = list(settings.tensor_split)[: llama_cpp.LLAMA_MAX_DEVICES]
        keep = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*split)
        params.tensor_split = keep
    with LogCapture() as log:
        model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
    if not model:
        raise ModelError(f"cannot load model {path}: {log.reason('unreadable or unsupported GGUF file')}")
    return model, keep


def stream_sizes(settings: ModelSettings, model, kv_unified: bool) -> tuple[int, int, int]:
    """(n_ctx, n_batch, n_seq) the settings ask for: all cells, tokens per decode, row slots."""
    s = settings
    n_ctx = s.n_ctx or llama_cpp.llama_model_n_ctx_train(model)
    n_batch = max(8, min(s.n_batch, n_ctx))
    # Unified: slots cost no cells, the cell budget limits concurrency. Isolated: each
    # slot gets n_ctx/(S+1) cells, so keep them at least 512 by default.
    per_slot = 128 if kv_unified else 512
    slots = s.n_seq or min(MAX_SLOTS, max(1, n_ctx // per_slot - (0 if kv_unified else 1)))
    n_seq = max(1, min(slots, llama_cpp.llama_max_parallel_sequences() - 1, n_batch // 2))
    return n_ctx, n_batch, n_seq


def grown_stream(current: int, need: int, row_ctx: int) -> int:
    """The next stream size for a row of `need` cells: at least double, at most row_ctx."""
    return min(row_ctx, max(2 * current, -(-need // 256) * 256))


def create_context(settings: ModelSettings, model, kv_unified: bool, n_gpu_layers: int, n_threads: int,
                   stream_cells: int = 0):
    """(context, n_batch, n_seq, row_ctx); raises ModelError when llama.cpp cannot create it.

    row_ctx: the most cells one row may ever use (all of them when unified; n_ctx/(S+1),
    as llama.cpp pads and splits it, when isolated). `stream_cells` (isolated only) makes
    each stream that size instead, up to row_ctx; the context's own llama_n_ctx_seq says
    what it holds now."""
    n_ctx, n_batch, n_seq = stream_sizes(settings, model, kv_unified)
    row_ctx = n_ctx if kv_unified else -(-n_ctx // 256) * 256 // (n_seq + 1)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx if kv_unified or not stream_cells or stream_cells >= row_ctx else stream_cells * (n_seq + 1)
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = n_seq + 1  # + the prefix sequence
    params.kv_unified = kv_unified
    params.n_threads = params.n_threads_batch = n_threads
    # On CPU no flash attention, like Llama()'s default, so results match create_completion.
    params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if n_gpu_layers
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    with LogCapture() as log:
        ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise ModelError(f"cannot create a context for {settings.model_path}: "
                         f"{log.reason('llama_init_from_model failed')}")
    return ctx, n_batch, n_seq, row_ctx
