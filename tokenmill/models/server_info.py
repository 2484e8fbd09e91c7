"""What the row jobs need to know about a model behind an OpenAI-compatible server, asked of
the server itself: the ModelInfo stand-in for `--model http://...` (see README, "OpenAI-compatible
servers").

The runner uses ModelInfo for four things: counting a prompt's tokens (does it fit --n-ctx?),
the chat template and its BOS/EOS, the model's name, and metadata for the prompt family. A local
GGUF answers all four; a server answers what its API exposes:

- llama-server and llamafile: `/props` (chat template, BOS/EOS text, context size) and
  `/tokenize` (with and without special tokens) - everything, as exact as in-process;
- llama-cpp-python's server: `/extras/tokenize` (BOS added, special tokens parsed);
- Ollama, vLLM, LM Studio and others (or any server with `tokenizer="none"`): no tokenizer
  tokenmill can rely on; `has_tokenizer` is False, the planner sends `messages` (the server applies
  its own template), token counts come from the server's usage, and fit planning counts with a
  generous estimate (estimate.most_tokens; openai_http.truncation catches a prompt the server cut).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import httpx

from tokenmill.errors import ModelError
from tokenmill.models.estimate import most_tokens
from tokenmill.models.openai_http import parse_url

# What llama-server says of a model at /v1/models that only its weights decide; other fields (the
# training context, new fields in new versions) may change for the same file, and row keys must not.
_WEIGHTS_META = ("n_params", "n_vocab", "n_embd", "size")


class ServerModelInfo:
    """The subset of ModelInfo's interface a server can answer; `has_tokenizer` tells the rest."""

    def __init__(self, url: str, timeout_s: float = 600.0, tokenizer: str = "auto"):
        # llama-cpp-python's server tokenizes behind the generations it is running (one lock):
        # a tokenize call may wait as long as a row takes
        self.path = url
        self.use_tokenizer = tokenizer != "none"  # "none": as if the server had no tokenize endpoint
        self.base, self.root, model = parse_url(url)
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=5.0))
        try:
            listed = self._client.get(f"{self.base}/models")
        except httpx.HTTPError as exc:
            reason = "connection refused" if "refused" in str(exc) or "111" in str(exc) else str(exc)
            raise ModelError(f"cannot reach the model server {url}: {reason} (is it running?)") from None
        if listed.status_code != 200:
            raise ModelError(f"the model server {url} answered GET {self.base}/models with HTTP {listed.status_code}")
        entries = [m for m in (listed.json().get("data") or []) if isinstance(m, dict)]
        ids = [m.get("id") for m in entries]
        self.model = model or (ids[0] if ids else "default")
        # what the server says of the model beyond its name (llama-server: parameters, size, vocab)
        meta = next((m.get("meta") for m in entries if m.get("id") == self.model), None) or {}
        self.model_meta = {k: meta[k] for k in _WEIGHTS_META if k in meta} if isinstance(meta, dict) else {}
        self.props: dict[str, Any] = self._json("GET", f"{self.root}/props") or {}
        self.kind = "llama-server" if self.props else "other"
        if self.kind == "other" and self._tokens_llama_cpp_python("x") is not None:
            self.kind = "llama-cpp-python"
        self.digest = self._ollama_digest()
        self.metadata: dict[str, str] = {"general.name": self.model}
        if self.props.get("chat_template"):
            self.metadata["tokenizer.chat_template"] = str(self.props["chat_template"])

    def _ollama_digest(self) -> str | None:
        """Ollama names each model's content by digest (`/api/tags`); other servers have no such list."""
        tags = self._json("GET", f"{self.root}/api/tags")
        listed = tags.get("models") if isinstance(tags, dict) else None
        for entry in listed or []:
            if isinstance(entry, dict) and self.model in (entry.get("name"), entry.get("model")):
                return entry.get("digest")
        return None

    @property
    def identity(self) -> str:
        """What row keys know the model by: a SHA-256 of the server's model id, its digest where the
        server gives one (Ollama) and what the server says that only the weights decide (llama-server's
        parameter count, size, vocabulary and width), so a different model behind the same name gets
        new keys where the server tells them apart, and the same weights keep theirs."""
        import hashlib
        import json

        described = {"model": self.model, "digest": self.digest, "meta": self.model_meta}
        return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()

    def _json(self, method: str, url: str, body: dict | None = None) -> Any:
        try:
            response = self._client.request(method, url, json=body)
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def _tokens_llama_cpp_python(self, text: str) -> list[int] | None:
        reply = self._json("POST", f"{self.root}/extras/tokenize", {"input": text, "model": self.model})
        return reply.get("tokens") if isinstance(reply, dict) else None

    def _tokens(self, text: str, special: bool) -> list[int]:
        """The server's tokens for `text`; a ModelError naming the URL when it does not answer."""
        if self.kind == "llama-server":
            url, body = f"{self.root}/tokenize", {"content": text, "add_special": special, "parse_special": special}
        else:
            url, body = f"{self.root}/extras/tokenize", {"input": text, "model": self.model}
        try:
            response = self._client.post(url, json=body)
            tokens = response.json().get("tokens") if response.status_code == 200 else None
        except httpx.HTTPError as exc:
            raise ModelError(f"the model server {self.path} did not tokenize a prompt: "
                             f"{str(exc).splitlines()[0][:200] or type(exc).__name__}") from None
        except (ValueError, AttributeError):
            tokens = None
        if not isinstance(tokens, list):
            raise ModelError(f"the model server {self.path} did not tokenize a prompt (POST {url} answered "
                             f"HTTP {response.status_code})")
        return tokens

    @property
    def has_tokenizer(self) -> bool:
        return self.use_tokenizer and self.kind in ("llama-server", "llama-cpp-python")

    def _require_tokenizer(self) -> None:
        if not self.has_tokenizer:
            raise ModelError(f"the model server {self.path} has no tokenize endpoint tokenmill uses; "
                             "its prompts are sent as messages and counted from its usage")

    def tokenize(self, text: str) -> list[int]:
        """Tokens as the server feeds its model: BOS added when the model wants one, special tokens parsed."""
        self._require_tokenizer()
        return self._tokens(text, special=True)

    def count_tokens(self, text: str) -> int:
        """The server's count; without a tokenizer, a generous estimate (estimate.most_tokens)."""
        if not self.has_tokenizer:
            return most_tokens(text)
        return len(self.tokenize(text))

    def count_text_tokens(self, text: str) -> int:
        """Plain text inside a prompt: no BOS (special-token names count as ordinary text where the
        server can say so; llama-cpp-python's server always parses them). Estimated without a tokenizer."""
        if not self.has_tokenizer:
            return most_tokens(text)
        if self.kind == "llama-server":
            return len(self._tokens(text, special=False))
        return max(0, len(self.tokenize(text)) - self._empty_tokens)

    @cached_property
    def _empty_tokens(self) -> int:
        return len(self.tokenize(""))

    @property
    def bos_token(self) -> str:
        return str(self.props.get("bos_token") or "")

    @property
    def eos_token(self) -> str:
        return str(self.props.get("eos_token") or "")

    @property
    def adds_bos(self) -> bool:
        return self.has_tokenizer and self._empty_tokens > 0

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    @property
    def architecture(self) -> str:
        return "unknown"

    @property
    def name(self) -> str:
        return self.model

    @property
    def kv_bytes_per_token(self) -> int:
        return 0  # the server holds the KV cache; its size is not tokenmill's to choose

    @property
    def n_ctx_train(self) -> int:
        settings = self.props.get("default_generation_settings") or {}
        return int(settings.get("n_ctx") or self.props.get("n_ctx") or 0)

    def close(self) -> None:
        self._client.close()
