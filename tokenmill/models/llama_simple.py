"""One row at a time through llama-cpp-python's high-level `Llama`: the plain-loop baseline."""

from __future__ import annotations

import time
from typing import Iterable, Iterator

from tokenmill.models.base import Completion, GenerationRequest, ModelSettings, default_threads
from tokenmill.models.gguf_info import load_llama

from llama_cpp import LlamaGrammar, LogitsProcessorList


def gpu_layers(requested: int) -> int:
    """-1 means every layer when this llama.cpp build can offload, none otherwise."""
    import llama_cpp

    if requested >= 0:
        return requested
    return -1 if llama_cpp.llama_supports_gpu_offload() else 0


def describe_device(n_gpu_layers: int, n_threads: int) -> str:
    import llama_cpp

    if n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload():
        return f"gpu offload ({'all' if n_gpu_layers < 0 else n_gpu_layers} layers), {n_threads} cpu threads"
    return f"cpu ({n_threads} threads)"


class LlamaSimpleBackend:
    """Sequential `Llama.create_completion` calls; simple, and the reference for correctness."""

    polls_input = False  # one row at a time: waiting for the next request costs nothing

    def __init__(self, settings: ModelSettings):
        self.settings = settings
        self.on_step = None
        self.stats: dict = {}
        self.n_threads = settings.n_threads or default_threads()
        self.n_gpu_layers = gpu_layers(settings.n_gpu_layers)
        self.llm = load_llama(
            settings.model_path,
            n_ctx=settings.n_ctx,
            n_batch=settings.n_batch,
            n_threads=self.n_threads,
            n_gpu_layers=self.n_gpu_layers,
            main_gpu=settings.main_gpu,
            tensor_split=settings.tensor_split,
        )

    def device(self) -> str:
        return describe_device(self.n_gpu_layers, self.n_threads)

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Completion]:
        for request in requests:
            yield self._one(request)

    def _one(self, request: GenerationRequest) -> Completion:
        started = time.perf_counter()
        tokens = self.llm.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=True)
        if request.max_tokens <= 0:
            return Completion(request.index, None, "error", f"max_tokens must be positive, got {request.max_tokens}",
                              prompt_tokens=len(tokens))
        need = len(tokens) + request.max_tokens
        if need > self.settings.n_ctx:
            return Completion(
                request.index, None, "error",
                f"row needs {need} tokens (prompt {len(tokens)} + max_tokens {request.max_tokens}) but the context "
                f"holds only {self.settings.n_ctx}; raise --n-ctx or lower --max-tokens",
                prompt_tokens=len(tokens),
            )
        self.llm.reset()  # no prefix reuse across rows: this backend is the plain baseline
        out = self.llm.create_completion(
            tokens,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            min_p=request.min_p,
            repeat_penalty=request.repeat_penalty,
            seed=request.seed,
            stop=request.stop or None,
            grammar=LlamaGrammar.from_string(request.grammar, verbose=False) if request.grammar else None,
            logits_processor=LogitsProcessorList([self._heartbeat]) if self.on_step else None,
        )
        choice = out["choices"][0]
        usage = out["usage"]
        elapsed = (time.perf_counter() - started) * 1000
        return Completion(
            request.index,
            choice["text"],
            "length" if choice["finish_reason"] == "length" else "stop",
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            decode_ms=elapsed,
        )

    def _heartbeat(self, _input_ids, scores):
        self.on_step()
        return scores

    def close(self) -> None:
        self.llm.close()
