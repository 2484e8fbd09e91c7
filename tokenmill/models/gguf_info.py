"""A model's tokenizer and metadata, loaded without its weights (vocab only)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

from tokenmill.errors import ModelError, TemplateError


@contextlib.contextmanager
def captured_stderr():
    """Keep what C code writes straight to fd 2 (llama.cpp's and GPT4All's load logs) off the
    terminal; the yielded list holds that text once the block ends."""
    captured: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", errors="replace"))


class _UncompiledChatFormatter:
    """Stands in for llama-cpp-python's Jinja2ChatFormatter while a model loads: keeps the
    template as text and never compiles it."""

    def __init__(self, template: str, eos_token: str = "", bos_token: str = "", *args: Any, **kwargs: Any):
        self.template = template
        self.eos_token = eos_token
        self.bos_token = bos_token

    def to_chat_handler(self) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise TemplateError("tokenmill renders chat templates itself (tokenmill.prompts.ChatTemplate); "
                                "llama-cpp-python's create_chat_completion is not available")

        return refuse


_LOAD_LOCK = threading.RLock()  # re-entrant: a caller may already hold it around load_llama


@contextlib.contextmanager
def llama_cpp_without_chat_templates() -> Iterator[None]:
    """Wrap `llama_cpp.Llama(...)` in this so llama-cpp-python does not compile the GGUF's chat
    templates while loading.

    `Llama.__init__` compiles every `tokenizer.chat_template*` of the file with its own
    `Jinja2ChatFormatter`, whatever `chat_format` says, and Jinja folds constants while compiling:
    a GGUF whose template holds `{{ 'x' * 10**12 }}` or `{{ 2 ** 10**10 }}` would exhaust memory or
    CPU during the load, before tokenmill's sandbox ever sees the template. tokenmill renders chat
    templates itself (ChatTemplate) and never calls create_chat_completion, so nothing is lost.
    """
    import llama_cpp.llama_chat_format as chat_format

    with _LOAD_LOCK:
        original = chat_format.Jinja2ChatFormatter
        chat_format.Jinja2ChatFormatter = _UncompiledChatFormatter  # type: ignore[misc,assignment]
        try:
            yield
        finally:
            chat_format.Jinja2ChatFormatter = original  # type: ignore[misc]


def load_llama(path: Path, **kwargs):
    """Load a `llama_cpp.Llama`, turning llama.cpp's load failures into a ModelError."""
    import llama_cpp


    try:
        # llama-cpp-python would compile the GGUF's chat template outside our sandbox.
        with captured_stderr(), llama_cpp_without_chat_templates():
            return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelError(
            f"llama.cpp could not load {path}: {exc}; the file may be truncated, not a GGUF model, "
            "or of an architecture this llama.cpp build does not support"
        ) from None


class ModelInfo:
    """Tokenizer and GGUF metadata of a model file; cheap to load (no weights)."""

    has_tokenizer = True  # exact counts (server_info.ServerModelInfo may have none)

    def __init__(self, path: Path):
        self.path = path
        self._llm = load_llama(path, vocab_only=True)
        self.metadata: dict[str, str] = dict(self._llm.metadata)

    def tokenize(self, text: str) -> list[int]:
        """Tokens exactly as llama-cpp-python's create_completion would feed the model."""
        return self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def count_tokens(self, text: str) -> int:
        """Tokens of a full prompt (BOS included when the model adds one, special tokens parsed)."""
        return len(self.tokenize(text))

    def count_text_tokens(self, text: str) -> int:
        """Tokens of plain text inside a prompt: no BOS, special-token names as ordinary text."""
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    @cached_property
    def bos_token(self) -> str:
        return self._token_text(self._llm.token_bos())

    @cached_property
    def eos_token(self) -> str:
        return self._token_text(self._llm.token_eos())

    @cached_property
    def adds_bos(self) -> bool:
        return self._llm._model.add_bos_token()

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "unknown")

    @property
    def name(self) -> str:
        return self.metadata.get("general.name") or self.path.stem

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of f16 K and V cache one token takes in every layer (0 when the metadata lacks the sizes)."""
        m, arch = self.metadata, self.architecture
        try:
            layers, heads = int(m[f"{arch}.block_count"]), int(m[f"{arch}.attention.head_count"])
            kv_heads = int(m.get(f"{arch}.attention.head_count_kv") or heads)
            head_dim = int(m.get(f"{arch}.attention.key_length") or int(m[f"{arch}.embedding_length"]) // heads)
        except (KeyError, ValueError, ZeroDivisionError):
            return 0
        return 2 * layers * kv_heads * head_dim * 2

    @property
    def n_ctx_train(self) -> int:
        return int(self.metadata.get(f"{self.architecture}.context_length", 0) or 0)


def write_gguf_copy(source: Path, dest: Path, overrides: dict[str, Any], tensors: bool = True, reader=None) -> Path:
    """Write `dest`, a copy of the GGUF `source` whose metadata keys in `overrides` hold new
    values (each key keeps its type); every other key and, with `tensors`, the weights are
    copied as they are. Without tensors the copy serves vocab-only loads (ModelInfo)."""
    import gguf

    reader = reader or gguf.GGUFReader(source)
    arch = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    writer = gguf.GGUFWriter(str(dest), arch=arch, endianess=reader.endianess)
    try:
        for field in reader.fields.values():
            # The writer adds the architecture and the GGUF.* header fields itself.
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            if field.name == gguf.Keys.General.ALIGNMENT:
                writer.add_custom_alignment(int(field.contents()))
                continue
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            value = overrides[field.name] if field.name in overrides else field.contents()
            writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
        for tensor in reader.tensors if tensors else ():
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                   tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors if tensors else ():
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    finally:
        writer.close()
    return dest
