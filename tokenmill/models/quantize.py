"""Quantize a GGUF with llama.cpp's own quantizer, and widen one back to F16 with the gguf package.

`quantize` calls `llama_model_quantize` through the bindings; it follows llama.cpp's per-tensor
log lines (`[  12/ 272] blk.1.attn_k.weight ...`) to draw a progress bar, and writes a temporary
file beside OUT that replaces OUT only once the quantizer succeeded.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path
from typing import Callable

from tokenmill.errors import InputError, ModelError
from tokenmill.models.gguf_header import read_header_file

_PREFIX = "LLAMA_FTYPE_MOSTLY_"
_TENSOR_LINE = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]")


def quant_types() -> dict[str, int]:
    """Type name -> llama.cpp file type, as llama-quantize names them (Q4_K_M, Q8_0, F16, ...)."""
    import llama_cpp

    types = {name.removeprefix(_PREFIX): getattr(llama_cpp, name) for name in dir(llama_cpp) if name.startswith(_PREFIX)}
    types["F32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    return dict(sorted(types.items()))


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _temporary(out: Path) -> Path:
    return out.parent / f".{out.name}.{os.getpid()}.tmp"


def quantize(source: Path, out: Path, type_name: str, threads: int = 0, progress: bool = True,
             on_tensor: Callable[[int, int], None] | None = None) -> Path:
    """Write `out`, `source` quantized to `type_name`; OUT appears only when complete."""
    import llama_cpp
    from tokenmill.progress import progress_bar

    types = quant_types()
    key = type_name.upper()
    if key not in types:
        raise InputError(f"--type {type_name} is not a llama.cpp quantization type; choose one of: "
                         f"{', '.join(types)}")
    if out.exists() and out.resolve() == source.resolve():
        raise InputError(f"OUT {out} is the input file; write the quantized model to another path")
    if not out.parent.is_dir():
        raise InputError(f"the folder of OUT {out} does not exist")
    total = read_header_file(source).n_tensors
    bar = progress_bar(total=total, unit="tensor", disable=not progress, dynamic_ncols=True,
               desc=f"quantize {key}")
    tail: list[str] = []

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace")
        tail.append(line)
        del tail[:-40]
        match = _TENSOR_LINE.search(line)
        if match:
            bar.n = int(match.group(1))
            bar.refresh()
            if on_tensor:
                on_tensor(int(match.group(1)), int(match.group(2)))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = types[key]
    params.nthread = threads or (os.cpu_count() or 1)
    params.allow_requantize = True  # the input may itself be quantized (quality is the user's call)
    tmp = _temporary(out)
    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        bar.close()
    try:
        if status != 0 or not tmp.is_file():
            reason = next((line.strip() for line in reversed(tail) if "error" in line.lower() or "failed" in line),
                          "see llama.cpp's log")
            raise ModelError(f"llama.cpp could not quantize {source} to {key}: {reason}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def dequantize_to_f16(source: Path, out: Path) -> Path:
    """Write `out`, a copy of `source` whose quantized weights are widened to F16 (F32 tensors,
    such as norms, stay F32): a higher-precision GGUF to quantize from. Written atomically."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(source)
    arch = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    tmp = _temporary(out)
    writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
    try:
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            if field.name == gguf.Keys.General.ALIGNMENT:
                writer.add_custom_alignment(int(field.contents()))
                continue
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            value = int(gguf.LlamaFileType.MOSTLY_F16) if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
            writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
        widened = []
        for tensor in reader.tensors:
            if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                data = np.asarray(tensor.data)
            else:
                data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float16)
            data = data.reshape(tuple(int(d) for d in reversed(tensor.shape)))
            widened.append((tensor.name, data))
            writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data in widened:
            writer.write_tensor_data(data)
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out
