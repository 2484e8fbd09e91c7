"""A `--model` reference resolved once: where the model is, what identifies it, how to count its tokens.

A model file (a GGUF path, `ollama:NAME`, `gpt4all:FILE`, a llamafile, a bare name: see
resolve.py) is identified by the file's SHA-256 and counted with its own tokenizer, loaded
vocab-only. A server (`http://HOST:PORT[/v1][#MODEL]`) is identified by its model id and
whatever digest or description it gives (server_info.py), and counted with its own tokenize
endpoint, or, where it has none, sent chat messages and counted from its usage. The backend that
runs it comes from the registry (registry.choose).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tokenmill.models import registry
from tokenmill.models.openai_http import is_http_model


@dataclass
class ModelReference:
    spec: str | None  # what the user wrote (None: the default model)
    kind: Literal["file", "url"]
    location: str  # the GGUF path, or the server URL; what the backend loads (ModelSettings.model_path)
    info: Any  # gguf_info.ModelInfo or server_info.ServerModelInfo: tokenizer, metadata, chat template
    identity: str  # row keys' model part: the file's sha256, or the server model's identity

    @property
    def path(self) -> Path | None:
        return Path(self.location) if self.kind == "file" else None


def model_kind(spec: str | None) -> Literal["file", "url"]:
    return "url" if is_http_model(spec) else "file"


def backend_for(spec: str | None, requested: str | None) -> registry.BackendKind:
    """The registry's backend for `--model spec` (see registry.choose)."""
    return registry.choose(requested, model_kind(spec), spec or "default")


def open_model(spec: str | None, options: dict | None = None) -> ModelReference:
    """Resolve `--model` once; a missing file, unknown name or unreachable server is a ModelError
    (one line, naming where tokenmill looked or the URL). `options`: the backend's, checked (a
    server's `tokenizer`: "none" treats it as one without a tokenize endpoint)."""
    if model_kind(spec) == "url":
        from tokenmill.models.server_info import ServerModelInfo

        info = ServerModelInfo(str(spec), tokenizer=(options or {}).get("tokenizer", "auto"))
        return ModelReference(spec, "url", str(spec), info, info.identity)
    from tokenmill.models.gguf_info import ModelInfo
    from tokenmill.models.resolve import model_sha256, resolve_model

    path = resolve_model(spec)
    return ModelReference(spec, "file", str(path), ModelInfo(path), model_sha256(path))
