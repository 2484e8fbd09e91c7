"""Find, inspect and quantize models: `python -m flows.models list|show|quantize`.

- `list`: the embedded default, then Ollama's store, GPT4All's folder and the llamafile folders,
  each model's size, architecture, quantization, prompt family and context length (read from
  the GGUF header alone, at its offset inside a llamafile; nothing is loaded).
- `show MODEL`: metadata, the chat template checked in tokenmill's sandbox, the detected prompt
  family, and the memory the weights plus KV cache take for `--n-ctx` x `--n-seq`.
- `quantize IN OUT --type Q4_K_M`: llama.cpp's own quantizer, written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows._cli import EXIT_OK, run_cli
from tokenmill.errors import ModelError, TokenmillError
from tokenmill.models import stores
from tokenmill.models.family import detect_family
from tokenmill.models.gguf_header import ArrayLength, GGUFHeader, read_header_file
from tokenmill.models.quantize import human_size, quant_types

PROG = "python -m flows.models"
DEFAULT_SLOTS = 8  # the batched engine's slots when --n-seq is 0 (tokenmill.tasks.runner.DEFAULT_SLOTS)


def _header_of(ref: str) -> tuple[GGUFHeader, Path, int]:
    """(header, file, GGUF size) of a model reference; a llamafile is read in place."""
    file_part, entry = stores.split_entry(ref)
    path = Path(file_part).expanduser()
    if path.is_file() and (entry or path.suffix == ".llamafile"):
        zipped = stores.llamafile_entry(path, entry)
        if zipped.stored:
            return read_header_file(path, zipped.offset), path, zipped.size
    from tokenmill.models.resolve import resolve_model

    resolved = resolve_model(ref)
    return read_header_file(resolved), resolved, resolved.stat().st_size


def discovered(llamafile_dirs: list[Path] | None = None) -> list[tuple[str, str, Path]]:
    """(source, --model reference, file) of every model tokenmill can find."""
    from tokenmill.models.resolve import DEFAULT_MODEL_NAME, default_model_path

    found: list[tuple[str, str, Path]] = []
    try:
        found.append(("default", DEFAULT_MODEL_NAME, default_model_path()))
    except ModelError:
        pass
    found += [("ollama", f"ollama:{name}", blob) for name, blob in stores.list_ollama()]
    found += [("gpt4all", ref, path) for ref, path in stores.list_gpt4all()]
    found += [("llamafile", ref, path) for ref, path in stores.list_llamafiles(llamafile_dirs)]
    return found


def cmd_list(args: argparse.Namespace) -> int:
    dirs = [Path(d).expanduser() for d in args.llamafile_dir] if args.llamafile_dir else None
    rows = [("SOURCE", "MODEL", "SIZE", "ARCH", "QUANT", "FAMILY", "CONTEXT")]
    for source, ref, path in discovered(dirs):
        try:
            header, _, size = _header_of(ref if source != "default" else str(path))
            rows.append((source, ref, human_size(size), header.architecture, header.quantization,
                         detect_family(header.string_metadata()), str(header.context_length or "?")))
        except TokenmillError as exc:
            rows.append((source, ref, "?", "unreadable", str(exc)[:60], "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    looked = [*stores.ollama_roots(), *stores.gpt4all_folders(), *(dirs or stores.llamafile_folders())]
    print(f"\n{len(rows) - 1} models; searched {', '.join(str(p) for p in looked)}", file=sys.stderr)
    return EXIT_OK


def kv_cache_bytes(header: GGUFHeader, cells: int, bytes_per_value: int = 2) -> int:
    """K and V for `cells` token positions in every layer (F16 cache, llama.cpp's default)."""
    n_layer = int(header.arch_value("block_count", 0))
    n_embd = int(header.arch_value("embedding_length", 0))
    n_head = int(header.arch_value("attention.head_count", 0)) or 1
    n_head_kv = header.arch_value("attention.head_count_kv", n_head)
    if isinstance(n_head_kv, list):  # per-layer head counts
        n_head_kv = max(n_head_kv)
    key_length = int(header.arch_value("attention.key_length", n_embd // n_head))
    value_length = int(header.arch_value("attention.value_length", n_embd // n_head))
    return n_layer * cells * int(n_head_kv) * (key_length + value_length) * bytes_per_value


def _short(value) -> str:
    if isinstance(value, ArrayLength):
        return f"[{int(value)} items]"
    text = repr(value) if not isinstance(value, str) else value
    text = text.replace("\n", "\\n")
    return text if len(text) <= 100 else text[:97] + "..."


def cmd_show(args: argparse.Namespace) -> int:
    from tokenmill.models.gguf_info import ModelInfo
    from tokenmill.models.resolve import resolve_model
    from tokenmill.prompts import ChatTemplate

    header, path, size = _header_of(args.model)
    family = detect_family(header.string_metadata())
    print(f"model     {args.model}\nfile      {path}\nsize      {human_size(size)}")
    print(f"arch      {header.architecture}\nquant     {header.quantization}\nfamily    {family}")
    print(f"context   {header.context_length or '?'} tokens (trained)\ntensors   {header.n_tensors}")
    print("\nmetadata")
    for key in sorted(header.metadata):
        if key != "tokenizer.chat_template":
            print(f"  {key} = {_short(header.metadata[key])}")
    info = ModelInfo(resolve_model(args.model))  # vocab only: for the BOS/EOS the template writes
    try:
        chat = ChatTemplate.for_model(info, family)
        sample = chat.render([{"role": "system", "content": "You are brief."},
                              {"role": "user", "content": "Hello"}])
        verdict = f"renders in tokenmill's sandbox ({chat.name})"
    except TokenmillError as exc:
        chat, sample, verdict = None, "", f"REFUSED by tokenmill's sandbox: {exc}"
    print(f"\nchat template: {verdict}")
    if chat is not None:
        print("  " + chat.source.replace("\n", "\n  "))
        print("\nsample prompt (system + user turn):\n  " + sample.replace("\n", "\n  "))
    slots = args.n_seq or DEFAULT_SLOTS
    batched_cells = args.n_ctx * (slots + 1)  # one stream per slot plus the shared-prefix stream
    print(f"\nmemory for --n-ctx {args.n_ctx} x --n-seq {slots}")
    for label, cells in ((f"--backend llama ({slots}+1 streams)", batched_cells),
                         ("--backend llama-simple/gpt4all (1 stream)", args.n_ctx)):
        kv = kv_cache_bytes(header, cells)
        print(f"  {label}: weights {human_size(size)} + KV cache {human_size(kv)} (F16, {cells} cells) "
              f"= {human_size(size + kv)}, plus llama.cpp's compute buffers")
    return EXIT_OK if chat is not None else 1


def cmd_quantize(args: argparse.Namespace) -> int:
    from tokenmill.models.quantize import quantize
    from tokenmill.models.resolve import resolve_model

    source = resolve_model(args.input)
    out = Path(args.output).expanduser()
    before = source.stat().st_size
    quantize(source, out, args.type, threads=args.threads, progress=not args.no_progress)
    after = out.stat().st_size
    print(f"{source} ({human_size(before)}) -> {out} ({human_size(after)}, {args.type.upper()}, "
          f"{after / before:.0%} of the input)", file=sys.stderr)
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Find, inspect and quantize GGUF models.")
    p.add_argument("--debug", action="store_true", help="print tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="the models tokenmill can find, with their metadata")
    ls.add_argument("--llamafile-dir", action="append", metavar="DIR",
                    help="a folder of .llamafile files (repeatable; default $TOKENMILL_LLAMAFILE_DIR and ~/llamafiles)")
    ls.set_defaults(run=cmd_list)
    show = sub.add_parser("show", help="one model's metadata, chat template, family and memory need")
    show.add_argument("model", metavar="MODEL", help="a GGUF path, x.llamafile, ollama:NAME[:TAG], gpt4all:FILE or a name")
    show.add_argument("--n-ctx", type=int, default=4096, help="context tokens per row (default 4096)")
    show.add_argument("--n-seq", type=int, default=0, help="rows decoded together (default 0: 8)")
    show.set_defaults(run=cmd_show)
    q = sub.add_parser("quantize", help="quantize a GGUF with llama.cpp's own quantizer")
    q.add_argument("input", metavar="IN", help="the model to quantize (any --model reference)")
    q.add_argument("output", metavar="OUT", help="the GGUF file to write (atomically: it appears when complete)")
    q.add_argument("--type", required=True, metavar="TYPE",
                   help="Q4_K_M, Q5_K_M, Q8_0, F16, ... (one of: " + ", ".join(quant_types()) + ")")
    q.add_argument("--threads", type=int, default=0, help="quantizer threads (default: all cores)")
    q.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    q.set_defaults(run=cmd_quantize)
    return p


def main(args: argparse.Namespace) -> int:
    if getattr(args, "n_ctx", 1) <= 0:
        raise ModelError(f"--n-ctx must be positive, got {args.n_ctx}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(run_cli(PROG, main, parser()))
