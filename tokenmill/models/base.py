"""The interface every model backend implements: requests in, completions out."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal, Protocol

FinishReason = Literal["stop", "length", "error"]


@dataclass
class GenerationRequest:
    """One row's generation job: a fully rendered `prompt` (chat template applied), or chat
    `messages` for a backend that applies the model's template itself (registry: `chat`).

    `prompt` is tokenized with special tokens parsed (so `<|im_start|>` becomes one token)
    and with the model's BOS added when the model asks for it, exactly as
    `llama_cpp.Llama.create_completion` does.
    """

    index: int
    prompt: str
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    grammar: str | None = None  # GBNF text constraining this row only (the in-process form of json_schema)
    # The JSON Schema the reply must match, for a backend that takes schemas rather than GBNF (an
    # OpenAI-compatible server's json_schema response format). A backend uses what it supports
    # (tokenmill.models.registry, `schema`); the caller validates every reply either way.
    json_schema: dict | None = None
    # Requests that continue one another (one agent of a simulation, step after step) share a
    # session key. An engine may keep a finished request's KV cells in its slot and seat the next
    # request of the session there, decoding only what follows the tokens it still holds. None:
    # no affinity. Engines that do not retain KV across requests ignore it.
    session: str | None = None
    # Grammar rows only: sum the log-probability of each chosen token among the tokens the
    # grammar allows at that step (Completion.logprob); costs a whole-vocabulary pass per token.
    logprobs: bool = False
    # A conversation sent instead of `prompt`, to a model server that renders it with its own chat
    # template (one without a tokenizer tokenmill can use: see server_info.py); `prompt` then holds
    # tokenmill's local rendering of it, for logs. Backends without `chat` never get one.
    messages: list[dict[str, str]] | None = None
    # The least prompt tokens the backend should read, by tokenmill's count: a server that reports
    # fewer cut the prompt (see openai_http.truncation). None: the backend judges from the text.
    expected_prompt_tokens: int | None = None


@dataclass
class Completion:
    """What came back for one request; `text` is None when `finish_reason` is "error"."""

    index: int
    text: str | None
    finish_reason: FinishReason
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float = 0.0
    prompt_ms: float = 0.0
    decode_ms: float = 0.0
    logprob: float | None = None  # with GenerationRequest.logprobs, where the backend supports it


@dataclass
class ModelSettings:
    """How to load a model; passed to a worker process, so plain data only."""

    model_path: str
    n_ctx: int = 4096
    n_seq: int = 0  # parallel sequence slots; 0 lets the backend choose
    n_batch: int = 512
    n_threads: int = 0  # 0: default_threads()
    # llama on CPU: use fewer than n_threads while other programs keep cores busy, and n_threads
    # again once they stop (models/machine.py CoreWatch); for thread counts tokenmill chose itself.
    # Read by the batched llama engine only; other backends ignore it
    adapt_threads: bool = False
    n_gpu_layers: int = -1  # -1: all layers when the build can offload, else 0
    main_gpu: int = 0
    split_mode: str = "layer"  # none | layer | row
    tensor_split: list[float] | None = None
    backend: str = "llama"  # a name in tokenmill.models.registry.BACKENDS
    options: dict = field(default_factory=dict)  # the backend's own options, checked by its registry entry
    jump_forward: bool = True  # llama: append tokens a row's grammar forces without sampling them
    # llama, isolated streams: the cells each stream starts with; 0: small (llama_load.FIRST_STREAM_CELLS),
    # grown when a longer row comes, which drops what the slots hold (see LlamaBatchedBackend)
    stream_cells: int = 0


def default_threads() -> int:
    """CPU threads for llama.cpp when none are asked for: every core.

    llama.cpp's threads wait for each other at every step, so on a machine that is already
    busy fewer threads can be much faster (on a loaded 2-core machine 24 tokens took 1.7 s
    with 1 thread and 32 s with 2): pass `--threads`. A default from the load average was
    tried and dropped: the average still counts the last minute of tokenmill's own work, so
    back-to-back runs on an idle machine chose 1 thread of 2.
    """
    return os.cpu_count() or 1


class Backend(Protocol):
    """A loaded model that turns a stream of requests into a stream of completions."""

    settings: ModelSettings
    # Whether generate() accepts None from its request iterable ("nothing to send now"): a backend
    # that runs many rows at once must keep decoding while no new request comes.
    polls_input: bool
    # The backend's own counters (seconds per phase, tokens), reported with the heartbeat.
    stats: dict
    # Called by the backend after every model step (a decode call, a token); the worker uses
    # it as a heartbeat, so a silent worker can be told from a slow one.
    on_step: Callable[[], None] | None

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Completion]:
        """Yield one Completion per request, in any order, as each finishes."""
        ...

    def device(self) -> str:
        """Describe where the model runs, e.g. "cpu (2 threads)" or "cuda: NVIDIA H100"."""
        ...

    def close(self) -> None: ...
