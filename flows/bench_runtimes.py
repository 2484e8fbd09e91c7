"""Runtimes benchmarks: `python -m flows.bench_runtimes url|backends [options]`.

- url: W1 (the first 48 SciTLDR dev abstracts, "Summarize the following paper abstract in one
  sentence.", max_tokens 64, temperature 0) against llama.cpp's llama-server with 4 slots.
  The peer script ../shared/peers/llama_server.py drives such a server with a bare thread pool;
  then tokenmill drives a server started with the same command line by URL
  (`--model http://127.0.0.1:PORT`). Both times are the requests' wall time (server start
  excluded; tokenmill's includes counting every prompt at the server, rendering and writing
  Parquet). Prints the ratio peer / tokenmill (1.0: as fast as the bare thread pool; the target is
  at least 0.95). `--repeat N` alternates the two N times and compares medians.
- backends: the same rows through each backend in one process, one after the other: llama.cpp
  in-process (batched), GPT4All, the HTTP backend against llama-server (4 slots), and the default
  model from an Ollama-layout store and from a llamafile-layout zip (both run in-process by
  llama.cpp); rows/s of each, the model load excluded.
Run on a quiet machine: the load average is printed first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import flows  # noqa: F401  sets Prefect's environment defaults
from flows import _peers
from flows._servers import LoopbackServer
from flows.bench import scitldr_input
from tokenmill.models.resolve import default_model_path
from tokenmill.tasks.runner import JobConfig
from tokenmill.tasks.summarize import prepare_summarize

# The peer's instruction (../shared/peers/workload.py), as a task template: the same user turn.
W1_TEMPLATE = "Summarize the following paper abstract in one sentence.\n\n{{ text }}"


def w1_config(folder: Path, rows: int, max_tokens: int, **extra) -> JobConfig:
    template = folder / "w1.j2"
    template.write_text(W1_TEMPLATE)
    data = folder / "scitldr.parquet"
    if not data.exists():
        scitldr_input(rows, folder)
    return JobConfig(input=str(data), max_tokens=max_tokens, temperature=0.0, prompt=str(template), cache=False,
                     **extra)


def timed_run(config: JobConfig) -> tuple[float, dict]:
    """Prepare the job, load the model (not timed), then time the rows: (seconds, usage row)."""
    job = prepare_summarize(config)
    job.start_worker()
    if hasattr(job.worker, "wait_ready"):  # a worker process: let the model load before the clock starts
        job.worker.wait_ready()
    started = time.perf_counter()
    stats = job.run(progress=False)
    return time.perf_counter() - started, stats.row()


def url_bench(args: argparse.Namespace) -> int:
    if not _peers.available():
        print("bench_runtimes url: llama-server is not set up; run ../shared/peers/setup.sh", file=sys.stderr)
        return 1
    peer_walls, ours, rows_ok, tokens = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i in range(args.repeat):
            peer = _peers.server_run("llama_server.py", slots=args.slots)
            peer_walls.append(peer["wall_s"])
            print(f"  peer llama_server.py (thread pool of {args.slots}): {peer['wall_s']:.1f} s, "
                  f"{peer['prompt_tokens']} prompt + {peer['completion_tokens']} completion tokens", flush=True)
            with LoopbackServer("llama-server", default_model_path(), folder / "server.log", slots=args.slots,
                                n_ctx=args.slots * 1024) as server:
                config = w1_config(folder, args.rows, args.max_tokens, model=server.url, out=str(folder / f"out{i}"))
                wall, row = timed_run(config)
            ours.append(wall)
            rows_ok.append(row["rows_ok"])
            tokens.append((row["prompt_tokens"], row["completion_tokens"]))
            print(f"  tokenmill by URL ({row['device']}): {wall:.1f} s, {row['prompt_tokens']} prompt + "
                  f"{row['completion_tokens']} completion tokens, {row['rows_ok']}/{row['rows_total']} ok", flush=True)
    peer_s, our_s = statistics.median(peer_walls), statistics.median(ours)
    print(f"W1 by URL, llama-server -np {args.slots}: peer {peer_s:.1f} s, tokenmill {our_s:.1f} s (median of "
          f"{args.repeat}); tokenmill reaches {peer_s / our_s:.2f}x the peer's speed (target >= 0.95)")
    return 0


def backends_bench(args: argparse.Namespace) -> int:
    from tokenmill.models.layouts import build_llamafile, build_ollama_store

    gguf = default_model_path()
    chosen = args.only.split(",") if args.only else ["llama", "gpt4all", "http", "ollama", "llamafile"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["TOKENMILL_CACHE_DIR"] = str(folder / "cache")  # llamafile extraction, GPT4All's copy
        os.environ["OLLAMA_MODELS"] = str(folder / "ollama")
        build_ollama_store(folder / "ollama", gguf)
        build_llamafile(folder / "smollm2.llamafile", gguf)
        cases = {
            "llama": {}, "llama-simple": {"backend": "llama-simple"}, "gpt4all": {"backend": "gpt4all"}, "ollama": {"model": "ollama:smollm2:135m"},
            "llamafile": {"model": str(folder / "smollm2.llamafile")},
        }
        for name in chosen:
            server = None
            extra = dict(cases.get(name, {}))
            if name == "http":
                server = LoopbackServer("llama-server", gguf, folder / "server.log", slots=4, n_ctx=4 * 1024).start()
                extra["model"] = server.url
            try:
                wall, row = timed_run(w1_config(folder, args.rows, args.max_tokens, out=str(folder / name),
                                                n_threads=args.threads, **extra))
            finally:
                if server:
                    server.stop()
            results.append((name, wall, row))
            print(f"  {name:10s} {wall:6.1f} s  {row['rows_total'] / wall:5.2f} rows/s  "
                  f"{row['completion_tokens_per_s']:6.1f} completion tok/s  {row['rows_ok']}/{row['rows_total']} ok  "
                  f"({row['device']})", flush=True)
        shutil.rmtree(folder / "cache", ignore_errors=True)
    base = next((wall for name, wall, _ in results if name == "llama"), None)
    if base:
        print("relative to llama.cpp in-process: " + ", ".join(f"{n} {base / w:.2f}x" for n, w, _ in results))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.bench_runtimes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("url", "backends"))
    p.add_argument("--rows", type=int, default=48, help="SciTLDR dev rows (default 48; url: the peer's PEER_N)")
    p.add_argument("--max-tokens", type=int, default=64, help="default 64 (W1)")
    p.add_argument("--slots", type=int, default=4, help="url: llama-server slots (default 4)")
    p.add_argument("--repeat", type=int, default=1, help="url: alternate peer and tokenmill N times (default 1)")
    p.add_argument("--only", help="backends: a comma-separated subset of llama,gpt4all,http,ollama,llamafile,"
                                  "llama-simple")
    p.add_argument("--threads", type=int, default=0, help="backends: llama.cpp threads (default 0: every core)")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    print(f"tokenmill bench_runtimes {args.mode}: {args.rows} SciTLDR dev rows, max_tokens {args.max_tokens}; "
          f"load average at start {load:.2f}", flush=True)
    if args.mode == "url" and (args.rows != 48 or args.max_tokens != 64):
        os.environ["PEER_N"], os.environ["PEER_MAX_TOKENS"] = str(args.rows), str(args.max_tokens)
    return url_bench(args) if args.mode == "url" else backends_bench(args)


if __name__ == "__main__":
    sys.exit(main())
