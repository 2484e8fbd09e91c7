"""A `--model` reference resolved once: where the model is, what identifies it, how to count its tokens.

A model file (a GGUF path, `ollama:NAME`, `gpt4all:FILE`, a llamafile, a bare name: see
resolve.py) is identified by the file's SHA-256 and counted with its own tokenizer, loaded
vocab-only. A server (`http://HOST:PORT[/v1][#MODEL]`) is identified by its model id and
whatever digest or description it gives (server_info.py), and counted with its own tokenize
endpoint. The backend that runs it comes from the registry (registry.choose).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tokenmill.errors import ModelError
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


def open_model(spec: str | None) -> ModelReference:
    """Resolve `--model` once; a missing file, unknown name or unreachable server is a ModelError
    (one line, naming where tokenmill looked or the URL)."""
    if is_http_model(spec):
        from tokenmill.models.server_info import ServerModelInfo

        info = ServerModelInfo(str(spec))
        if not info.has_tokenizer:
            raise ModelError(f"the model server {spec} has no tokenize endpoint tokenmill knows (llama-server's "
                             "/tokenize or llama-cpp-python's /extras/tokenize), which the row jobs need to fit "
                             "prompts to --n-ctx; run the model with llama-server, or point --model at its GGUF "
                             "(for Ollama: ollama:NAME runs its stored file in-process)")
        return ModelReference(spec, "url", str(spec), info, info.identity)
    from tokenmill.models.gguf_info import ModelInfo
    from tokenmill.models.resolve import model_sha256, resolve_model

    path = resolve_model(spec)
    return ModelReference(spec, "file", str(path), ModelInfo(path), model_sha256(path))


def backend_for(reference: ModelReference, requested: str | None) -> registry.BackendKind:
    return registry.choose(requested, reference.kind, reference.spec or "default")
