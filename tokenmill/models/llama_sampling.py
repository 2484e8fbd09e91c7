"""Per-row pieces of the batched llama.cpp engine: tokens, sampler chains, text and stops.

Everything here (and the sampler chain in row_sampler.py) mirrors `llama_cpp.Llama.create_completion`, so a row decoded in a batch
gets the same tokens, text, finish reason and usage as that reference call. Also two thin
helpers over the C library: log capture while loading, and GPU names for `device()`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp


# create_completion's Llama keeps the last 64 tokens for its repeat penalty.
PENALTY_LAST_N = 64


class RowError(Exception):
    """A problem with one row (bad grammar, too long, ...): that row fails, the batch goes on."""


def tokenize_prompt(vocab, prompt: str) -> list[int]:
    """Tokens as create_completion builds them: [BOS if the vocab asks] + text (+ EOS/SEP if asked)."""
    text = prompt.encode("utf-8")
    tokens = tokenize_text(vocab, text) if text else []
    bos = llama_cpp.llama_vocab_bos(vocab)  # create_completion's CLS is an alias of BOS
    sep = llama_cpp.llama_vocab_sep(vocab)
    head = [bos] if llama_cpp.llama_vocab_get_add_bos(vocab) and bos != -1 else []
    tail = [sep if sep != -1 else llama_cpp.llama_vocab_eos(vocab)]
    if not llama_cpp.llama_vocab_get_add_eos(vocab) and sep == -1:
        tail = []
    return head + tokens + tail


def tokenize_text(vocab, text: bytes, special: bool = True) -> list[int]:
    """Tokens of `text` alone (no BOS/EOS); `special`: parse `<|im_start|>` and the like."""
    size = len(text) + 16  # a token covers at least one byte
    buf = (llama_cpp.llama_token * size)()
    n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, size, False, special)
    if n < 0:  # buffer too small: llama.cpp says how many tokens it needs
        size = -n
        buf = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, size, False, special)
        if n < 0:
            raise RowError(f"could not tokenize the prompt (llama_tokenize returned {n})")
    return list(buf[:n])


def token_piece(vocab, token: int) -> bytes:
    """The bytes of one token, control tokens rendered as nothing (as create_completion does)."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, 64, 0, False)
    if n < 0:  # piece longer than the buffer
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, -n, 0, False)
    return buf.raw[:n]


def _incomplete_utf8(text: bytes) -> bool:
    """True when `text` ends inside a multi-byte UTF-8 character (create_completion's test)."""
    pending = 0
    for k, char in enumerate(text[-3:]):
        k = 3 - k
        for num, pattern in ((2, 192), (3, 224), (4, 240)):
            if num > k and pattern & char == pattern:
                pending = num - k
    return pending > 0


@dataclass
class RowText:
    """Generated tokens and bytes of one row, with create_completion's stop-string rules."""

    stop: list[bytes]
    bos: int
    tokens: list[int] = field(default_factory=list)
    data: bytes = b""
    cut: int | None = None  # byte offset where the stop string begins

    def add(self, token: int, piece: bytes) -> bool:
        """Append a non-EOG token; True when a stop string has appeared."""
        self.tokens.append(token)
        self.data += piece
        if not self.stop or _incomplete_utf8(self.data):
            return False  # like create_completion, wait until the character is whole
        visible = self._visible()
        found = [s for s in self.stop if s in visible]  # first in list order, as upstream
        if found:
            self.cut = visible.index(found[0])
        return bool(found)

    def _visible(self) -> bytes:
        # Llama.detokenize drops a leading space after a BOS token.
        if self.tokens and self.tokens[0] == self.bos and self.data[:1] == b" ":
            return self.data[1:]
        return self.data

    def text(self) -> str:
        visible = self._visible()
        if self.cut is not None:
            visible = visible[: self.cut]
        return visible.decode("utf-8", errors="ignore")  # a split character at the end is dropped


class LogCapture:
    """Silence llama.cpp's log for a moment, keeping its error lines for a one-line message."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._callback = llama_cpp.llama_log_callback(self._on_log)  # kept alive on self

    def _on_log(self, level: int, text: bytes, _user) -> None:
        if level == 4 and text and len(self.errors) < 8:  # GGML_LOG_LEVEL_ERROR in this ggml
            self.errors.append(text.decode("utf-8", "replace").strip())

    def reason(self, default: str) -> str:
        """The first error, without its C function name: usually the cause."""
        if not self.errors:
            return default
        first = self.errors[0]
        for marker in ("error loading model: ", "error parsing grammar: "):
            if marker in first:
                return first.split(marker, 1)[1]
        return first.split(": ", 1)[-1]

    def __enter__(self) -> "LogCapture":
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *_exc) -> None:
        from llama_cpp import _logger  # the sink llama_cpp installs at import

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def gpu_names() -> str:
    """Names of the GPUs ggml sees (its device registry in libggml); "gpu" if unavailable."""
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
            if lib.ggml_backend_dev_type(dev) in (1, 2):  # discrete or integrated GPU
                names.append(lib.ggml_backend_dev_description(dev).decode("utf-8", "replace"))
        return ", ".join(names) or "gpu"
    except (OSError, AttributeError):
        return "gpu"
