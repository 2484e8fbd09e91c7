"""Model stores laid out as their runtimes leave them, built around a GGUF file: an Ollama store
(blobs named by digest, one manifest per tag) and a llamafile (an executable prefix, then a zip
whose GGUF entry is stored uncompressed and aligned). For tests and benchmarks that must show
tokenmill finding and running models where those runtimes keep them, without downloading any."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zipfile
from pathlib import Path

from tokenmill.models import stores
from tokenmill.models.resolve import file_sha256 as _sha256


def build_ollama_store(root: Path, gguf: Path, name: str = "smollm2", tag: str = "135m") -> Path:
    """An Ollama store as `ollama pull` leaves it: blobs named by digest, one manifest per tag."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True)
    digest = _sha256(gguf)
    shutil.copyfile(gguf, blobs / f"sha256-{digest}")
    template = b"{{ .Prompt }}"
    template_digest = hashlib.sha256(template).hexdigest()
    (blobs / f"sha256-{template_digest}").write_bytes(template)
    config = b'{"model_format":"gguf","model_family":"llama"}'
    config_digest = hashlib.sha256(config).hexdigest()
    (blobs / f"sha256-{config_digest}").write_bytes(config)
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": f"sha256:{config_digest}", "size": len(config)},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
             "size": gguf.stat().st_size},
            {"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{template_digest}",
             "size": len(template)},
        ],
    }
    folder = root / "manifests" / "registry.ollama.ai" / "library" / name
    folder.mkdir(parents=True)
    (folder / tag).write_text(json.dumps(manifest))
    return blobs / f"sha256-{digest}"


def build_llamafile(path: Path, gguf: Path, align: int = 4096) -> int:
    """A llamafile's layout: an executable prefix, then a zip whose GGUF entry is stored
    uncompressed and starts on an `align` boundary. Returns the entry's data offset."""
    prefix = b"#!/bin/sh\necho 'a llamafile stand-in'\nexit 1\n"
    inner = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with path.open("wb") as fh:
        fh.write(prefix)
        with zipfile.ZipFile(fh, "w") as zf:
            zf.writestr("args", "-m\nSmolLM2-135M-Instruct.Q4_1.gguf\n")
            info = zipfile.ZipInfo(inner, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            start = fh.tell() + 30 + len(inner)
            pad = (-(start + 4)) % align  # the extra field pads the data to the boundary
            info.extra = struct.pack("<HH", 0xCAFE, pad) + b"\0" * pad
            with zf.open(info, "w") as out, gguf.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
    return stores.llamafile_entry(path).offset
