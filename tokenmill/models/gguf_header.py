"""A GGUF file's metadata read straight from its header, at any offset of any file.

llama.cpp needs a path to a whole GGUF; a llamafile holds its GGUF inside a zip, and listing
a folder of models should not load any of them. This reader parses the header (key/value
pairs and tensor descriptions) from a file object, from a given offset, and never touches the
weights. Arrays other than short ones are skipped (the vocabulary is not needed to list a model).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tokenmill.errors import ModelError

MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 64  # arrays longer than this are summarized by their length only

# llama.cpp's file types (general.file_type), as printed by its quantizer.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0",
}


@dataclass
class GGUFHeader:
    """What `read_header` found: metadata, tensor count and where the header ends."""

    source: str
    version: int
    metadata: dict[str, Any]
    n_tensors: int
    tensor_types: dict[int, int] = field(default_factory=dict)  # ggml type -> tensors of that type

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, key: str, default: Any = 0) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def context_length(self) -> int:
        return int(self.arch_value("context_length", 0) or 0)

    @property
    def quantization(self) -> str:
        file_type = self.metadata.get("general.file_type")
        if isinstance(file_type, int):
            return FILE_TYPES.get(file_type, f"type {file_type}")
        if self.tensor_types:  # no file type recorded: the most common tensor type
            import gguf

            common = max(self.tensor_types, key=self.tensor_types.__getitem__)
            try:
                return gguf.GGMLQuantizationType(common).name
            except ValueError:
                return f"ggml type {common}"
        return "unknown"

    def string_metadata(self) -> dict[str, str]:
        """The metadata as ModelInfo exposes it (strings), for detect_family and friends."""
        return {k: str(v) for k, v in self.metadata.items() if not isinstance(v, (list, tuple))}


class _Reader:
    def __init__(self, fh: BinaryIO, source: str):
        self.fh = fh
        self.source = source

    def take(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise ModelError(f"{self.source} ends inside its GGUF header (a truncated or partial download?)")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        if n > 1 << 30:
            raise ModelError(f"{self.source} has a corrupt GGUF header (a {n}-byte string)")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.unpack("I"), self.unpack("Q")
            if n <= _KEEP_ARRAY:
                return [self.value(item) for _ in range(n)]
            if item in _SCALARS:
                self.fh.seek(n * struct.calcsize(_SCALARS[item]), 1)
            else:
                for _ in range(n):
                    self.value(item)
            return ArrayLength(n)
        raise ModelError(f"{self.source} has a corrupt GGUF header (value type {kind})")


class ArrayLength(int):
    """A long array's length, standing in for the array (e.g. the vocabulary)."""


def read_header(fh: BinaryIO, offset: int = 0, source: str = "model") -> GGUFHeader:
    """Parse the GGUF header that starts at `offset` of `fh`."""
    fh.seek(offset)
    r = _Reader(fh, source)
    if r.take(4) != MAGIC:
        raise ModelError(f"{source} is not a GGUF model file (it does not start with the GGUF magic bytes)")
    version = r.unpack("I")
    if version not in (2, 3):
        raise ModelError(f"{source} is GGUF version {version}; tokenmill reads versions 2 and 3")
    n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.unpack("I"))
    types: dict[int, int] = {}
    for _ in range(n_tensors):
        r.string()
        dims = r.unpack("I")
        r.take(8 * dims)
        kind = r.unpack("I")
        r.take(8)  # data offset
        types[kind] = types.get(kind, 0) + 1
    return GGUFHeader(source, version, metadata, n_tensors, types)


def read_header_file(path: Path, offset: int = 0) -> GGUFHeader:
    try:
        with Path(path).open("rb") as fh:
            return read_header(fh, offset, str(path))
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
