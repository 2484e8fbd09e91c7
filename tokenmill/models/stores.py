"""Where other runtimes keep their models, and how to get a GGUF path out of each.

- Ollama's store (used without Ollama running): `manifests/HOST/NAMESPACE/MODEL/TAG` is a JSON
  manifest whose layer of media type `application/vnd.ollama.image.model` names the GGUF blob,
  `blobs/sha256-<hex>`. Stores are looked for in `$OLLAMA_MODELS`, `~/.ollama/models` and
  `/usr/share/ollama/.ollama/models` (the Linux service's home).
- GPT4All's model folder: `$GPT4ALL_MODEL_PATH` (tokenmill's own override), `~/.cache/gpt4all`
  (the Python bindings' default) and `~/.local/share/nomic.ai/GPT4All` (the desktop app's
  default download path on Linux).
- llamafiles: an executable that is also a zip archive holding the GGUF as an uncompressed
  (stored), page-aligned entry. Its metadata is read at that entry's offset; llama.cpp itself
  needs a path to a whole GGUF, so running it uses one cached extraction per llamafile version.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tokenmill.errors import ModelError

OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"
OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_NAMESPACE = "library"


# ---------------------------------------------------------------- Ollama


def ollama_roots() -> list[Path]:
    roots = [os.environ["OLLAMA_MODELS"]] if os.environ.get("OLLAMA_MODELS") else []
    roots += ["~/.ollama/models", "/usr/share/ollama/.ollama/models"]
    return _unique(Path(r).expanduser() for r in roots)


def _unique(paths: Iterator[Path]) -> list[Path]:
    seen: list[Path] = []
    for p in paths:
        if p not in seen:
            seen.append(p)
    return seen


def split_ollama_name(name: str) -> tuple[str, str, str, str]:
    """`NAME[:TAG]` -> (host, namespace, model, tag); NAME is `model`, `ns/model` or `host/ns/model`."""
    head, sep, last = name.rpartition("/")
    model_part, _, tag = last.partition(":")
    parts = [p for p in (head + sep + model_part).split("/") if p]
    if not parts or len(parts) > 3 or any(p in (".", "..") for p in parts) or ":" in tag:
        raise ModelError(f"--model ollama:{name} is not an Ollama model name; write ollama:NAME[:TAG], "
                         "e.g. ollama:llama3.2:1b")
    host, namespace = OLLAMA_REGISTRY, OLLAMA_NAMESPACE
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        namespace, model = parts
    else:
        (model,) = parts
    return host, namespace, model, tag or "latest"


def ollama_display_name(host: str, namespace: str, model: str, tag: str) -> str:
    if host != OLLAMA_REGISTRY:
        return f"{host}/{namespace}/{model}:{tag}"
    return f"{model}:{tag}" if namespace == OLLAMA_NAMESPACE else f"{namespace}/{model}:{tag}"


def _ollama_blob(root: Path, manifest: Path, label: str) -> Path:
    try:
        data = json.loads(manifest.read_text())
        layers = data["layers"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"Ollama manifest {manifest} is unreadable or not a manifest") from None
    models = [layer for layer in layers if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_MEDIA]
    if not models:
        raise ModelError(f"Ollama manifest {manifest} has no model layer ({OLLAMA_MODEL_MEDIA}); "
                         f"is {label} a model?")
    digest = str(models[0].get("digest", ""))
    if not digest.startswith("sha256:") or len(digest) != 71:
        raise ModelError(f"Ollama manifest {manifest} names a model layer without a sha256 digest")
    blob = root / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise ModelError(f"Ollama model {label}: its blob {blob} is missing (run `ollama pull {label}`)")
    size = models[0].get("size")
    if isinstance(size, int) and blob.stat().st_size != size:
        raise ModelError(f"Ollama model {label}: its blob {blob} holds {blob.stat().st_size} bytes, the manifest "
                         f"says {size} (an interrupted pull? run `ollama pull {label}`)")
    return blob


def ollama_manifest_paths(name: str) -> list[tuple[Path, Path]]:
    host, namespace, model, tag = split_ollama_name(name)
    return [(root, root / "manifests" / host / namespace / model / tag) for root in ollama_roots()]


def resolve_ollama(name: str) -> Path | None:
    """The GGUF blob of Ollama model `name`, or None when no store has its manifest."""
    label = ollama_display_name(*split_ollama_name(name))
    for root, manifest in ollama_manifest_paths(name):
        if manifest.is_file():
            blob = _ollama_blob(root, manifest, label)
            verify_blob_digest(blob, label)
            return blob
    return None


def verify_blob_digest(blob: Path, label: str) -> None:
    """A blob's name is its SHA-256; the hash is cached (tokenmill hashes every model it runs anyway)."""
    from tokenmill.models.resolve import model_sha256

    expected = blob.name.removeprefix("sha256-")
    if model_sha256(blob) != expected:
        raise ModelError(f"Ollama model {label}: its blob {blob} does not match its SHA-256 name (a corrupt or "
                         f"partial file; run `ollama pull {label}`)")


def list_ollama() -> list[tuple[str, Path]]:
    """(name, blob) for every model manifest in every store, names as `ollama list` prints them."""
    found: list[tuple[str, Path]] = []
    for root in ollama_roots():
        base = root / "manifests"
        if not base.is_dir():
            continue
        for manifest in sorted(base.glob("*/*/*/*")):
            if not manifest.is_file():
                continue
            host, namespace, model, tag = manifest.relative_to(base).parts
            label = ollama_display_name(host, namespace, model, tag)
            try:
                found.append((label, _ollama_blob(root, manifest, label)))
            except ModelError:
                continue  # not a model (an adapter, a half-finished pull): not listed
    return found


# ---------------------------------------------------------------- GPT4All


def gpt4all_folders() -> list[Path]:
    folders = [os.environ["GPT4ALL_MODEL_PATH"]] if os.environ.get("GPT4ALL_MODEL_PATH") else []
    folders += ["~/.cache/gpt4all", "~/.local/share/nomic.ai/GPT4All"]
    return _unique(Path(f).expanduser() for f in folders)


def gpt4all_candidates(name: str) -> list[Path]:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ModelError(f"--model gpt4all:{name} must name a file in GPT4All's model folder, e.g. "
                         "gpt4all:Llama-3.2-1B-Instruct-Q4_0.gguf")
    names = [name] if name.endswith(".gguf") else [name, name + ".gguf"]
    return [folder / n for folder in gpt4all_folders() for n in names]


def resolve_gpt4all(name: str) -> Path | None:
    return next((p for p in gpt4all_candidates(name) if p.is_file()), None)


def list_gpt4all() -> list[tuple[str, Path]]:
    found = []
    for folder in gpt4all_folders():
        if folder.is_dir():
            found += [(f"gpt4all:{p.name}", p) for p in sorted(folder.glob("*.gguf")) if p.is_file()]
    return found


# ---------------------------------------------------------------- llamafile


def llamafile_folders() -> list[Path]:
    folders = [os.environ["TOKENMILL_LLAMAFILE_DIR"]] if os.environ.get("TOKENMILL_LLAMAFILE_DIR") else []
    return _unique(Path(f).expanduser() for f in [*folders, "~/llamafiles"])


def list_llamafiles(folders: list[Path] | None = None) -> list[tuple[str, Path]]:
    found = []
    for folder in folders if folders is not None else llamafile_folders():
        if folder.is_dir():
            found += [(str(p), p) for p in sorted(folder.glob("*.llamafile")) if p.is_file()]
    return found


def resolve_llamafile_by_name(name: str) -> Path | None:
    names = [name] if name.endswith(".llamafile") else [name, name + ".llamafile"]
    return next((f / n for f in llamafile_folders() for n in names if (f / n).is_file()), None)


@dataclass
class ZipEntry:
    """A GGUF stored in a llamafile: where its bytes start and how many there are."""

    archive: Path
    name: str
    offset: int
    size: int
    stored: bool


def is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def llamafile_entry(path: Path, entry: str | None = None) -> ZipEntry:
    """The GGUF entry of a llamafile (or `entry`, when it holds several)."""
    try:
        with zipfile.ZipFile(path) as zf:
            ggufs = [i for i in zf.infolist() if i.filename.endswith(".gguf")]
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{path} is neither a GGUF file nor a readable llamafile (zip): {exc}") from None
    if entry is not None:
        ggufs = [i for i in ggufs if i.filename == entry]
    if len(ggufs) != 1:
        names = ", ".join(i.filename for i in ggufs) or "none"
        if entry is not None:
            raise ModelError(f"llamafile {path} has no GGUF entry {entry!r}")
        raise ModelError(f"llamafile {path} must hold exactly one .gguf entry, it holds: {names}"
                         + ("; pick one with --model PATH#ENTRY" if ggufs else ""))
    info = ggufs[0]
    with path.open("rb") as fh:  # the data starts after the local header, whose extra field may differ
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise ModelError(f"llamafile {path}: the zip entry {info.filename} has a corrupt local header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
    offset = info.header_offset + 30 + name_len + extra_len
    return ZipEntry(path, info.filename, offset, info.file_size, info.compress_type == zipfile.ZIP_STORED)


def split_entry(spec: str) -> tuple[str, str | None]:
    """`x.llamafile#inner.gguf` -> (path, entry)."""
    if "#" in spec and spec.rsplit("#", 1)[1].endswith(".gguf"):
        path, entry = spec.rsplit("#", 1)
        return path, entry
    return spec, None


def extract_llamafile(entry: ZipEntry, cache: Path) -> Path:
    """The llamafile's GGUF as a file of its own, extracted once into `cache` (atomically);
    an older extraction of the same llamafile is removed."""
    path = entry.archive.resolve()
    stat = path.stat()
    owner = hashlib.sha256(f"{path}#{entry.name}".encode()).hexdigest()[:16]
    version = hashlib.sha256(f"{stat.st_size}|{stat.st_mtime_ns}|{entry.offset}|{entry.size}".encode()).hexdigest()[:12]
    folder = cache / "llamafile"
    target = folder / f"{owner}-{version}-{Path(entry.name).name}"
    if target.is_file() and target.stat().st_size == entry.size:
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{target.name}.{os.getpid()}.tmp"
        try:
            _copy_entry(entry, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot extract the GGUF of llamafile {entry.archive} into {folder}: "
                         f"{exc.strerror or exc} (set TOKENMILL_CACHE_DIR to a writable folder with "
                         f"{entry.size / 1e9:.1f} GB free)") from None
    for old in folder.glob(f"{owner}-*"):
        if old != target and not old.name.endswith(".tmp"):
            old.unlink(missing_ok=True)
    return target


def _copy_entry(entry: ZipEntry, dest: Path) -> None:
    if not entry.stored:  # a compressed entry cannot be read in place; zipfile inflates it
        with zipfile.ZipFile(entry.archive) as zf, zf.open(entry.name) as src, dest.open("wb") as out:
            while block := src.read(1 << 24):
                out.write(block)
        return
    with entry.archive.open("rb") as src, dest.open("wb") as out:
        left, position = entry.size, entry.offset
        try:  # in-kernel copy (a reflink on filesystems that have them)
            while left:
                n = os.copy_file_range(src.fileno(), out.fileno(), min(left, 1 << 30), position)
                if n == 0:
                    break
                left, position = left - n, position + n
        except (AttributeError, OSError):
            out.seek(entry.size - left)
        src.seek(position)
        while left:
            block = src.read(min(left, 1 << 24))
            if not block:
                raise OSError(f"{entry.archive} ends inside its GGUF entry")
            out.write(block)
            left -= len(block)
