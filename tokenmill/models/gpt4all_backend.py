"""One row at a time through GPT4All's llama.cpp build (the `gpt4all` Python package).

GPT4All ships its own, older llama.cpp. Two things make it usable for tokenmill:

* It does not know newer pre-tokenizer names (SmolLM2's `smollm`) and refuses such a model
  with "unknown pre-tokenizer type". llama.cpp treats some names identically, so
  `gpt4all_model_file` writes a copy of the GGUF whose `tokenizer.ggml.pre` says an equivalent
  name GPT4All knows, once, into tokenmill's cache. The original file is never touched.
* `GPT4All.generate` without a chat session sends the prompt through the template "%1" (no
  wrapping) with a fresh context, but tokenizes it with special-token parsing OFF, so
  `<|im_start|>` would become ordinary text tokens; and after the reply it also decodes a
  default "\n\n" assistant suffix into the context. tokenmill's prompts are fully rendered chat
  prompts, so this backend calls the lower-level `LLModel.prompt_model(..., special=True)` with
  the template "%1%2" (nothing before, between or after) and a fresh context per row. The
  tokens fed to the model are then exactly those llama-cpp-python feeds (BOS only when the
  model asks for it).

GPT4All quirks that remain: it always stops generating at "### Instruction", "### Prompt",
"### Response", "### Human", "### Assistant" and "### Context"; it has no sampling seed; it
caps the prompt batch at 128 tokens; and it would shift (erase) the context instead of failing
when a row outgrows it, so rows that cannot fit are refused before generation.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable, Iterator

from tokenmill.errors import ModelError
from tokenmill.models.base import Completion, GenerationRequest, ModelSettings
from tokenmill.models.gguf_header import read_header_file
from tokenmill.models.gguf_info import captured_stderr, write_gguf_copy
from tokenmill.models.resolve import cache_root, model_sha256

# Pre-tokenizer names GPT4All 2.8's llama.cpp does not know -> a name it treats identically.
# (llama.cpp handles `smollm`, `refact` and `starcoder` with the same regex and settings.)
PRE_TOKENIZER_FALLBACKS = {"smollm": "refact"}
PRE_KEY = "tokenizer.ggml.pre"

# GPT4All's own default prompt batch is 8-9 tokens, which makes prompt evaluation crawl;
# its llama.cpp context is built with a batch of 128, and larger values are capped there.
GPT4ALL_MAX_BATCH = 128

def _read_pre_tokenizer(path: Path) -> str | None:
    """The model's pre-tokenizer name, from its GGUF header alone (gguf.GGUFReader maps every
    tensor too: about 3 s per read of the default model)."""
    value = read_header_file(path).metadata.get(PRE_KEY)
    return None if value is None else str(value)


def gpt4all_model_file(path: Path) -> Path:
    """A GGUF GPT4All can load: `path` itself, or a cached copy with a pre-tokenizer it knows.

    The copy is keyed by the source's SHA-256 (itself cached by path, size and mtime), made
    once, and written atomically (a temporary file renamed into place).
    """
    path = Path(path)
    try:
        pre = _read_pre_tokenizer(path)
    except Exception as exc:  # a damaged file: ModelError, ValueError and friends
        raise ModelError(f"cannot read the GGUF metadata of {path}: {exc}") from None
    replacement = PRE_TOKENIZER_FALLBACKS.get(pre or "")
    if replacement is None:
        return path
    folder = cache_root() / "gpt4all-models" / f"{model_sha256(path)[:32]}-pre-{replacement}"
    dest = folder / path.name
    if dest.is_file():
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        write_gguf_copy(path, tmp, {PRE_KEY: replacement})
        os.replace(tmp, dest)
    except OSError as exc:
        raise ModelError(f"cannot write a GPT4All-compatible copy of {path} into {folder}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _gpu_device(n_gpu_layers: int) -> str | None:
    """The first GPU GPT4All can use when layers are requested, else None (CPU)."""
    if n_gpu_layers == 0:
        return None
    from gpt4all import GPT4All

    try:
        with captured_stderr():  # it prints every GPU runtime it fails to find
            gpus = GPT4All.list_gpus()
    except Exception:  # "Unable to retrieve available GPU devices": none
        return None
    cuda = [g for g in gpus if g.startswith("cuda:")]
    return (cuda or gpus or [None])[0]


def _load_errors(log: str) -> str:
    """The lines of GPT4All's load log that explain a failure (not its CUDA probing noise)."""
    lines = [line.strip() for line in log.splitlines()
             if "error" in line.lower() and "libcudart" not in line and "cuda" not in line.lower()]
    return "; ".join(lines[-3:])


class Gpt4AllBackend:
    """Sequential generation through GPT4All; the prompt goes in verbatim, special tokens parsed.
    It has no grammar support: the registry says so (tokenmill.models.registry, schema "none")."""

    polls_input = False

    def __init__(self, settings: ModelSettings):
        from gpt4all import GPT4All
        from gpt4all._pyllmodel import llmodel

        self.settings = settings
        self.on_step = None
        self.stats: dict = {}
        self.n_threads = settings.n_threads or os.cpu_count() or 1
        self.n_batch = max(1, min(settings.n_batch, GPT4ALL_MAX_BATCH))
        source = Path(settings.model_path)
        self.model_file = gpt4all_model_file(source)
        gpu = _gpu_device(settings.n_gpu_layers)
        ngl = (100 if settings.n_gpu_layers < 0 else settings.n_gpu_layers) if gpu else 0
        log: list[str] = []
        try:
            # GPT4All probes its CUDA builds and prints every miss; keep that off the user's terminal.
            with captured_stderr() as log:
                self.gpt = GPT4All(self.model_file.name, model_path=self.model_file.parent, allow_download=False,
                                   n_threads=self.n_threads, device=gpu or "cpu", n_ctx=settings.n_ctx, ngl=ngl,
                                   verbose=False)
            loaded = bool(llmodel.llmodel_isModelLoaded(self.gpt.model.model))
            failure = None
        except Exception as exc:  # with n_threads set, a refused model surfaces as "Model not loaded"
            loaded, failure = False, exc
        # GPT4All ignores the result of its own load call; the reason is only in its log.
        if not loaded:
            if failure is None:
                self.gpt.close()
            why = _load_errors("".join(log)) or str(failure or "no reason given")
            raise ModelError(f"GPT4All could not load {source}: {why}; its llama.cpp may not support this "
                             "model's architecture or tokenizer")
        self.gpu = gpu
        self._tokenizer = None
        self.last_prompt_tokens: list[int] = []  # what GPT4All fed the model for the last row

    def device(self) -> str:
        if self.gpu:
            return f"{self.gpu} (gpt4all, {self.gpt.backend})"
        return f"cpu (gpt4all, {self.n_threads} threads)"

    def count_prompt_tokens(self, prompt: str) -> int:
        """Prompt tokens as llama.cpp tokenizes them (special tokens parsed), without the weights."""
        if self._tokenizer is None:
            from tokenmill.models.gguf_info import ModelInfo

            self._tokenizer = ModelInfo(Path(self.settings.model_path))
        return self._tokenizer.count_tokens(prompt)

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Completion]:
        for request in requests:
            try:
                yield self._one(request)
            except Exception as exc:  # one bad row must not end the others
                yield Completion(request.index, None, "error", f"gpt4all: {type(exc).__name__}: {exc}")

    def _beat(self) -> None:
        if self.on_step is not None:
            self.on_step()

    def _one(self, request: GenerationRequest) -> Completion:
        started = time.perf_counter()
        if request.max_tokens <= 0:
            return Completion(request.index, None, "error", f"max_tokens must be positive, got {request.max_tokens}")
        expected = self.count_prompt_tokens(request.prompt)
        need = expected + request.max_tokens
        if need > self.settings.n_ctx:
            # GPT4All would silently shift (erase) the context instead of failing.
            return Completion(
                request.index, None, "error",
                f"row needs {need} tokens (prompt {expected} + max_tokens {request.max_tokens}) but the context "
                f"holds only {self.settings.n_ctx}; raise --n-ctx or lower --max-tokens",
                prompt_tokens=expected,
            )

        model = self.gpt.model  # gpt4all._pyllmodel.LLModel
        prompt_ids: list[int] = []
        pieces: list[str] = []
        state = {"prompt_done": None, "stop_at": None, "error": None, "raised": None}
        stops = [s for s in request.stop if s]
        longest_stop = max((len(s) for s in stops), default=0)
        text_len = 0

        def on_prompt(token_id: int) -> bool:
            try:
                prompt_ids.append(token_id)
                state["prompt_done"] = time.perf_counter()
                self._beat()
                return True
            except BaseException as exc:  # an exception must not cross the C callback
                state["raised"] = exc
                return False

        def on_response(token_id: int, piece: str) -> bool:
            nonlocal text_len
            try:
                if token_id == -1:  # GPT4All reports its own errors through the response callback
                    state["error"] = piece
                    return False
                self._beat()
                pieces.append(piece)
                before = text_len
                text_len += len(piece)
                if stops:
                    text = "".join(pieces)
                    window = max(0, before - longest_stop + 1)
                    hits = [i for s in stops if (i := text.find(s, window)) >= 0]
                    if hits:
                        state["stop_at"] = min(hits)
                        return False
                return True
            except BaseException as exc:
                state["raised"] = exc
                return False

        greedy = request.temperature <= 0
        # LLModel.prompt_model calls `self._prompt_callback` for every prompt token once its batch is
        # evaluated; the instance attribute replaces the no-op static method for this call.
        model._prompt_callback = on_prompt
        try:
            model.prompt_model(
                request.prompt, "%1%2", on_response,
                n_predict=request.max_tokens,
                top_k=1 if greedy else request.top_k,
                top_p=1.0 if greedy else request.top_p,
                min_p=0.0 if greedy else request.min_p,
                temp=0.0 if greedy else request.temperature,
                n_batch=self.n_batch,
                repeat_penalty=request.repeat_penalty,
                repeat_last_n=64,
                reset_context=True,  # a fresh context per row: no history from the previous row
                special=True,  # `<|im_start|>` and friends are single special tokens, as llama-cpp parses them
            )
        finally:
            del model._prompt_callback
        finished = time.perf_counter()
        self.last_prompt_tokens = prompt_ids
        if state["raised"] is not None:
            raise state["raised"]
        if state["error"] is not None:
            return Completion(request.index, None, "error", f"gpt4all: {state['error']}",
                              prompt_tokens=len(prompt_ids) or expected)
        # The context holds the prompt and every generated token except the end-of-generation one.
        completion_tokens = max(0, int(model.context.tokens_size) - len(prompt_ids))
        text = "".join(pieces)
        if state["stop_at"] is not None:
            text, finish = text[: state["stop_at"]], "stop"
        else:
            finish = "length" if completion_tokens >= request.max_tokens else "stop"
        prompt_done = state["prompt_done"] or started
        return Completion(
            request.index, text, finish,
            prompt_tokens=len(prompt_ids),
            completion_tokens=completion_tokens,
            prompt_ms=(prompt_done - started) * 1000,
            decode_ms=(finished - prompt_done) * 1000,
        )

    def close(self) -> None:
        self.gpt.close()
        if self._tokenizer is not None:
            self._tokenizer._llm.close()
