"""The one registry of backends: what each takes as a model, what it can do, its options, how it loads.

Everything that differs between backends lives in its `BackendKind` here; the runner, the
worker pool and the command lines ask the registry and never name a backend. A backend's
options (`--backend-option KEY=VALUE`, `--concurrency`) are checked by its pydantic model
(`extra="forbid"`) before any model loads, so a misspelt option is a one-line error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenmill.errors import InputError, ModelError
from tokenmill.models.base import ModelSettings

# A request's JSON Schema becomes, per backend: a GBNF grammar (in-process llama.cpp), the
# server's `json_schema` response format, or nothing (the caller validates and repairs).
SchemaMode = Literal["grammar", "json_schema", "none"]


class Options(BaseModel):
    """A backend's options; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(Options):
    """A backend without options of its own (its model settings come from the common options)."""


class HTTPOptions(Options):
    concurrency: int = Field(0, ge=0, description="requests in flight at once (0: the server's slot count from "
                                                  "/props, else 4); also --concurrency")
    timeout_s: float = Field(600.0, gt=0, description="seconds one request may take")
    connect_timeout_s: float = Field(5.0, gt=0, description="seconds to connect")
    retries: int = Field(3, ge=0, description="new tries after a connection error, timeout, 408, 429 or 5xx")
    backoff_s: float = Field(0.5, ge=0, description="first wait between tries; doubles each time")
    max_backoff_s: float = Field(8.0, ge=0, description="longest wait between tries")
    tokenizer: Literal["auto", "none"] = Field("auto", description="auto: count and render prompts with the "
                                               "server's tokenize endpoint where it has one (llama-server, "
                                               "llama-cpp-python); none: send chat messages and count from the "
                                               "server's usage, as for servers without one (Ollama, vLLM)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the server's API key "
                                                           "(the key itself is never an option: options are logged)")


def _llama(settings: ModelSettings, options: Options, tokenizer: Any):
    from tokenmill.models.llama_batched import LlamaBatchedBackend

    return LlamaBatchedBackend(settings)


def _llama_simple(settings: ModelSettings, options: Options, tokenizer: Any):
    from tokenmill.models.llama_simple import LlamaSimpleBackend

    return LlamaSimpleBackend(settings)


def _gpt4all(settings: ModelSettings, options: Options, tokenizer: Any):
    from tokenmill.models.gpt4all_backend import Gpt4AllBackend

    return Gpt4AllBackend(settings)


def _echo(settings: ModelSettings, options: Options, tokenizer: Any):
    from tokenmill.models.echo import EchoBackend

    return EchoBackend(settings, tokenizer, exact=False)


def _echo_exact(settings: ModelSettings, options: Options, tokenizer: Any):
    from tokenmill.models.echo import EchoBackend

    return EchoBackend(settings, tokenizer, exact=True)


def _http(settings: ModelSettings, options: HTTPOptions, tokenizer: Any):
    from tokenmill.models.openai_http import OpenAIHTTPBackend

    values = options.model_dump()
    values.pop("tokenizer")  # the planner's choice (reference.open_model), made before the backend loads
    key = os.environ.get(values.pop("api_key_env") or "")
    return OpenAIHTTPBackend(settings, api_key=key or None, **values)


@dataclass(frozen=True)
class BackendKind:
    name: str
    help: str
    model: Literal["file", "url"]  # what --model names: a GGUF on disk, or a server
    schema: SchemaMode
    # Backends of one runtime give the same text for the same request (tests/test_batched_engine.py
    # checks llama against llama-simple), so they share row keys; others get keys of their own.
    runtime: str
    # KV streams the backend's context holds: one per slot plus the shared-prefix stream, one, or
    # none here (a server sizes its own context).
    streams: Literal["per-slot", "one", "server"]
    in_process: bool  # cheap enough to run in the caller's process (no worker process to start)
    options: type[Options]
    load: Callable[[ModelSettings, Any, Any], Any]
    # Takes chat messages (GenerationRequest.messages) and applies the model's template itself:
    # how rows reach a model whose tokenizer tokenmill cannot use (a server without a tokenize endpoint).
    chat: bool = False

    def context_tokens(self, n_ctx: int, slots: int) -> int:
        """The context to create for `slots` rows of `n_ctx` tokens each."""
        return n_ctx * (slots + 1) if self.streams == "per-slot" else n_ctx

    @property
    def constrains(self) -> bool:
        """Whether a request's JSON Schema (or grammar) constrains what this backend generates."""
        return self.schema != "none"


DEFAULT_RUNTIME = "llama-cpp-python"
BACKENDS: dict[str, BackendKind] = {kind.name: kind for kind in (
    BackendKind("llama", "continuous batching of many rows in llama.cpp, in a worker process (default for "
                "model files)", "file", "grammar", DEFAULT_RUNTIME, "per-slot", False, NoOptions, _llama),
    BackendKind("llama-simple", "one row at a time through llama-cpp-python's Llama (the plain baseline)",
                "file", "grammar", DEFAULT_RUNTIME, "one", False, NoOptions, _llama_simple),
    BackendKind("gpt4all", "one row at a time through the gpt4all package's own llama.cpp (no grammar: "
                "extraction validates and repairs)", "file", "none", "gpt4all", "one", False, NoOptions, _gpt4all),
    BackendKind("http", "an OpenAI-compatible server named by --model http://HOST:PORT[/v1][#MODEL] (default "
                "for URLs); JSON Schemas go as its json_schema response format; rows go as chat messages where the "
                "server has no tokenize endpoint (Ollama, vLLM, LM Studio)", "url", "json_schema", "http",
                "server", False, HTTPOptions, _http, chat=True),
    BackendKind("echo", "zero-cost, no model runs: a short text derived from the prompt (the shortest "
                "grammar-valid text for extraction), token counts estimated, for measuring overhead and "
                "testing orchestration", "file", "grammar", "echo", "one", True, NoOptions, _echo),
    BackendKind("echo-exact", "echo, counted by the model's real tokenizer", "file", "grammar", "echo", "one",
                True, NoOptions, _echo_exact),
)}
NAMES = tuple(BACKENDS)


def get(name: str) -> BackendKind:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ModelError(f"unknown backend {name!r}; choose one of: {', '.join(NAMES)}") from None


def choose(requested: str | None, model_kind: Literal["file", "url"], model: str) -> BackendKind:
    """The backend for a model: the one asked for, which must take this kind of model, else the
    default for it (llama for files, http for servers)."""
    if requested is None:
        return BACKENDS["http" if model_kind == "url" else "llama"]
    kind = get(requested)
    if kind.model != model_kind:
        wants = "a server URL (--model http://HOST:PORT)" if kind.model == "url" else "a model file"
        fits = ", ".join(k.name for k in BACKENDS.values() if k.model == model_kind)
        raise InputError(f"--backend {requested} needs {wants}, not --model {model}; for that model use "
                         f"--backend {fits}, or leave --backend out")
    return kind


def parse_option_items(items: list[str] | None) -> dict[str, str]:
    """`KEY=VALUE` strings from the command line -> a dict (values are typed by the backend's model)."""
    options: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--backend-option {item!r} is not KEY=VALUE")
        options[key.strip().replace("-", "_")] = value.strip()
    return options


def validate_options(kind: BackendKind, options: dict[str, Any]) -> dict[str, Any]:
    """`options` checked by `kind`'s model; a one-line error names the option. Returns them typed."""
    try:
        return kind.options.model_validate(options).model_dump()
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(p) for p in error["loc"]) or "?"
        known = ", ".join(kind.options.model_fields) or "none"
        if error["type"] == "extra_forbidden":
            raise InputError(f"--backend-option {key}: --backend {kind.name} has no such option "
                             f"(its options: {known})") from None
        raise InputError(f"--backend-option {key}={options.get(key)!r}: {error['msg']} "
                         f"(--backend {kind.name})") from None


def load(settings: ModelSettings, tokenizer: Any = None):
    """Load `settings.backend` with its options (in the worker process, or here for in-process
    backends). `tokenizer`: the caller's loaded ModelInfo, for a backend that only counts tokens."""
    kind = get(settings.backend)
    return kind.load(settings, kind.options.model_validate(settings.options), tokenizer)
