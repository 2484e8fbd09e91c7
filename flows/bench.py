"""Benchmarks, each printed as ratios against a baseline run in the same sitting:
`python -m flows.bench [summarize|extract|startup] [options]`.

- summarize (W1: 48 SciTLDR dev abstracts, max_tokens 64) and extract (W2: the first 200
  distinct E2E dev rows, the restaurants schema, max_tokens 160): the full flow against a
  plain llama-cpp-python loop over the same prompts (one create_completion per row), and
  against the engine's ceiling: prompt tokens evaluated / prefill rate + completion tokens /
  batched decode rate, with the rates from a repeated probe (median and spread) and, when
  the peers are set up, from llama.cpp's own llama-batched-bench. Then where the engine's
  time went. extract adds grammar rows against free rows on the same prompts.
- startup: wall times of whole commands (a refused command, a one-row job, a rerun with
  nothing to do, W1 from the command line).
- scale: tokenmill's own cost per row and its memory on the zero-cost echo backend, 1,000,000
  rows by default (`python -m flows.bench scale --help`; flows/bench_scale.py).
- `--peers`: also run ../shared/peers' llama-server script for the workload and print the ratio.
Run it on a quiet machine: the load average is printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

import flows  # noqa: F401  sets Prefect's environment defaults
from flows import _peers
from tokenmill.tasks.runner import Job, JobConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def scitldr_input(rows: int, folder: Path) -> Path:
    records = [json.loads(line) for line in (SHARED / "scitldr" / "dev.jsonl").open()][:rows]
    path = folder / "scitldr.parquet"
    pl.DataFrame({"text": [" ".join(r["source"]) for r in records]}).write_parquet(path)
    return path


def e2e_input(rows: int, folder: Path) -> Path:
    """The first `rows` distinct meaning representations, as the W2 peer reads them."""
    path = folder / "e2e.parquet"
    frame = pl.read_csv(SHARED / "e2e" / "dev.csv").unique(subset=["mr"], keep="first", maintain_order=True)
    frame.head(rows).select(pl.col("ref").alias("text")).write_parquet(path)
    return path


def run_flow(kind: str, config: JobConfig) -> tuple[float, dict]:
    if kind == "summarize":
        from flows.summarize import summarize_flow as flow_fn
    else:
        from flows.extract import extract_flow as flow_fn
    started = time.perf_counter()
    result = flow_fn(config, progress=False)
    return time.perf_counter() - started, result


def plain_loop(job: Job, max_tokens: int, grammar_schema: dict | None) -> tuple[float, int, int]:
    """The for-loop a user would write: one Llama, one create_completion per row."""
    from llama_cpp import Llama, LlamaGrammar

    started = time.perf_counter()
    llm = Llama(str(job.model_path), n_ctx=job.config.n_ctx, n_batch=512, verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(grammar_schema), verbose=False) if grammar_schema else None
    prompt_tokens = completion_tokens = 0
    for chunk in job.table.chunks(64):
        for row in chunk.iter_rows(named=True):
            out = llm.create_completion(job.render(row), max_tokens=max_tokens, temperature=0.0, grammar=grammar)
            prompt_tokens += out["usage"]["prompt_tokens"]
            completion_tokens += out["usage"]["completion_tokens"]
    llm.close()
    return time.perf_counter() - started, prompt_tokens, completion_tokens


def engine_alone(job: Job, max_tokens: int, rows: int, grammar: bool, jump: bool) -> tuple[float, dict, dict]:
    """The engine without the flow on the job's first `rows` prompts: (seconds, stats, completions)."""
    from dataclasses import replace

    from tokenmill.models.base import GenerationRequest
    from tokenmill.models.llama_batched import LlamaBatchedBackend

    prompts = [job.render(row) for chunk in job.table.chunks(64) for row in chunk.iter_rows(named=True)][:rows]
    requests = [GenerationRequest(index=i, prompt=p, max_tokens=max_tokens, temperature=0.0, seed=job.config.seed,
                                  stop=list(job.task.stop), grammar=job.task.grammar if grammar else None)
                for i, p in enumerate(prompts)]
    backend = LlamaBatchedBackend(replace(job.settings(), jump_forward=jump))
    try:
        started = time.perf_counter()
        done = {c.index: c for c in backend.generate(requests)}
        return time.perf_counter() - started, dict(backend.stats), done
    finally:
        backend.close()


def probe_rates(job: Job, repeats: int = 5) -> dict:
    """The engine's prefill and batched-decode rates, `repeats` probes: median, min, max."""
    from tokenmill.models.llama_batched import LlamaBatchedBackend

    backend = LlamaBatchedBackend(job.settings())
    try:
        backend.measure_rates(prompt_tokens=64, steps=4)  # warm-up
        probes = [backend.measure_rates(prompt_tokens=256, steps=48) for _ in range(repeats)]
    finally:
        backend.close()
    out = {"n_seq": probes[0]["n_seq"], "threads": backend.n_threads}
    for key in ("prefill_tok_s", "decode_tok_s"):
        values = [p[key] for p in probes]
        out[key], out[key + "_range"] = statistics.median(values), (min(values), max(values))
    return out


def breakdown(engine: dict, flow_s: float) -> str:
    """Where the flow's time went, from the engine's counters (seconds)."""
    parts = {"decode (prompts)": engine.get("prompt_s", 0.0), "decode (generation)": engine.get("generate_s", 0.0),
             "sampling": engine.get("sample_s", 0.0), "detokenize, stops, jump-forward": engine.get("text_s", 0.0),
             "admission (tokenize, samplers)": engine.get("admit_s", 0.0),
             "engine idle, waiting for requests": engine.get("idle_s", 0.0)}
    run_s = engine.get("run_s", 0.0)
    parts["engine loop other"] = max(0.0, run_s - sum(parts.values()))
    parts["outside the engine (start-up, model load, queues, Prefect, writing)"] = max(0.0, flow_s - run_s)
    lines = [f"    {name:<70} {seconds:7.2f} s  {100 * seconds / flow_s:5.1f} %" for name, seconds in parts.items()]
    if engine.get("thread_changes"):  # other programs took cores for a while (models/machine.py)
        lines.append(f"    thread count changes while other programs kept cores busy: {engine['thread_changes']}")
    return "\n".join(lines)


def _gen_rate(seconds_stats: dict, completion: int) -> float:
    gen = seconds_stats["generate_s"] + seconds_stats["sample_s"] + seconds_stats["text_s"]
    return completion / gen if gen else 0.0


def grammar_vs_free(job: Job, max_tokens: int, rows: int) -> None:
    """Generation speed of grammar rows against free rows on the same prompts (engine alone)."""
    print(f"  grammar rows against free rows (engine alone, first {rows} rows; generation tok/s = completion "
          "tokens / (generation decode + sampling + text time)):")
    runs = {name: engine_alone(job, max_tokens, rows, grammar, jump) for name, grammar, jump in
            (("free", False, False), ("grammar", True, False), ("grammar + jump-forward", True, True))}
    free_rate = None
    for name, (seconds, stats, done) in runs.items():
        completion = sum(c.completion_tokens for c in done.values())
        rate = _gen_rate(stats, completion)
        free_rate = free_rate or rate
        extra = ""
        if stats.get("grammar_samples"):
            extra = (f"; {stats['grammar_rejections']} of {stats['grammar_samples']} sampled tokens rejected by the "
                     f"grammar, forced {stats['forced_tokens']}")
        print(f"    {name:<24} {seconds:6.1f} s  {completion:6d} completion tokens  {rate:6.1f} tok/s  "
              f"({rate / free_rate:.2f}x free){extra}")


def print_peer(workload: str, script: str, ours_s: float, label: str) -> None:
    peer = _peers.server_run(script, slots=4)
    if peer is None:
        print("  peers not set up (../shared/peers/setup.sh): no llama-server comparison")
        return
    print(f"  {peer['peer']}: {peer['wall_s']:.1f} s for the requests ({workload})")
    print(f"  {label} / llama-server: {peer['wall_s'] / ours_s:.2f}x as fast")


def row_bench(args: argparse.Namespace) -> int:
    kind = args.kind
    rows = args.rows or (48 if kind == "summarize" else 200)
    max_tokens = args.max_tokens or (64 if kind == "summarize" else 160)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = scitldr_input(rows, folder) if kind == "summarize" else e2e_input(rows, folder)
        config = JobConfig(input=str(data), out=str(folder / "out"), max_tokens=max_tokens, temperature=0.0,
                           n_ctx=args.n_ctx, n_seq=args.n_seq, n_threads=args.threads, cache=False,
                           schema=str(REPO / "jobs" / "restaurants.yaml") if kind == "extract" else None)
        if kind == "summarize":
            from tokenmill.tasks.summarize import prepare_summarize as prepare
        else:
            from tokenmill.tasks.extract import prepare_extract as prepare
        job = prepare(config, create_out=False)
        schema = json.loads(job.task.variables["schema"]) if kind == "extract" else None

        rates = probe_rates(job)
        peer_rates = _peers.batched_bench(str(job.model_path), rates["n_seq"], rates["threads"]) if args.peers else None
        plain = None if args.no_loop else plain_loop(job, max_tokens, schema)
        run_flow(kind, JobConfig(**{**config.__dict__, "out": str(folder / "warmup"), "limit": 1}))  # Prefect up
        flow_s, result = run_flow(kind, config)
        results = pl.read_parquet(folder / "out" / "results.parquet")

        evaluated = int(results["prompt_tokens"].sum() - results["cached_tokens"].sum())
        completion = int(results["completion_tokens"].sum())
        ceiling_s = evaluated / rates["prefill_tok_s"] + completion / rates["decode_tok_s"]
        flow_tok = (results["prompt_tokens"].sum() + completion) / flow_s
        pr, dr = rates["prefill_tok_s_range"], rates["decode_tok_s_range"]
        print(f"tokenmill bench: {kind}, {rows} rows, max_tokens {max_tokens}, temperature 0, n_ctx {args.n_ctx}, "
              f"{rates['n_seq']} slots, device {result['device']}; load average at start {args.load:.2f}")
        print(f"  engine rates (5 probes, median [min-max]): prefill {rates['prefill_tok_s']:.0f} [{pr[0]:.0f}-{pr[1]:.0f}] "
              f"tok/s, batched decode {rates['decode_tok_s']:.0f} [{dr[0]:.0f}-{dr[1]:.0f}] tok/s")
        if peer_rates:
            print(f"  llama-batched-bench at {peer_rates['n_seq']} sequences: prefill {peer_rates['prefill_tok_s']:.0f} "
                  f"tok/s, decode {peer_rates['decode_tok_s']:.0f} tok/s")
        if plain:
            plain_s, plain_prompt, plain_completion = plain
            print(f"  plain llama-cpp-python loop: {plain_s:7.1f} s  {(plain_prompt + plain_completion) / plain_s:6.0f} "
                  f"tok/s  ({plain_prompt} prompt + {plain_completion} completion tokens)")
        else:
            print("  plain llama-cpp-python loop: not run (--no-loop)")
        print(f"  tokenmill flow (end to end): {flow_s:7.1f} s  {flow_tok:6.0f} tok/s  "
              f"({results['prompt_tokens'].sum()} prompt, {results['cached_tokens'].sum()} from the shared prefix, "
              f"{completion} completion; {int((results['status'] == 'ok').sum())}/{results.height} ok)")
        print(f"  engine ceiling (probe rates): {ceiling_s:7.1f} s")
        if peer_rates:
            peer_ceiling = evaluated / peer_rates["prefill_tok_s"] + completion / peer_rates["decode_tok_s"]
            print(f"  engine ceiling (llama-batched-bench rates): {peer_ceiling:7.1f} s   flow / that ceiling: "
                  f"{flow_s / peer_ceiling:.2f}x")
        print(f"  speed-up over the plain loop: {f'{plain[0] / flow_s:.2f}x' if plain else 'not measured'}   "
              f"flow / ceiling: {flow_s / ceiling_s:.2f}x")
        print("  where the flow's time went:")
        print(breakdown(result.get("engine") or {}, flow_s))
        if kind == "extract":
            grammar_vs_free(job, max_tokens, min(rows, args.grammar_rows))
        if args.peers:
            print_peer("W1" if kind == "summarize" else "W2",
                       "llama_server.py" if kind == "summarize" else "llama_server_extract.py", flow_s, "tokenmill flow")
    return 0


def _timed(*argv: str, threads: int = 0) -> tuple[float, int, str]:
    import subprocess

    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *argv, "--no-progress"] + (["--threads", str(threads)] if threads else []), cwd=REPO, capture_output=True, text=True)
    return time.perf_counter() - started, proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]


def startup_bench(args: argparse.Namespace) -> int:
    """Whole commands as a user runs them, each in a fresh process (interpreter start included)."""
    api = os.environ.get("PREFECT_API_URL")
    print(f"tokenmill bench: startup (process wall, fresh interpreter each); Prefect: "
          f"{'server at ' + api if api else 'temporary server started by each command'}; load average at start {args.load:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = scitldr_input(48, folder)
        cases = [
            ("refused: input file not found", ["flows.extract", str(folder / "missing.csv"), "--schema",
                                               str(REPO / "jobs" / "restaurants.yaml")]),
            ("one row, one token", ["flows.summarize", str(data), "--limit", "1", "--max-tokens", "1", "--no-cache",
                                    "--out", str(folder / "one")]),
            ("rerun with nothing to do", ["flows.summarize", str(data), "--limit", "1", "--max-tokens", "1",
                                          "--no-cache", "--out", str(folder / "one")]),
            ("W1 from the command line (48 rows, max_tokens 64)", ["flows.summarize", str(data), "--max-tokens", "64",
                                                                   "--no-cache", "--out", str(folder / "w1")]),
        ]
        walls = {}
        for name, argv in cases:
            wall, code, last = _timed(*argv, threads=args.threads if argv[0] == "flows.summarize" else 0)
            walls[name] = wall
            print(f"  {name:<52} {wall:6.1f} s  exit {code}: {last[:150]}")
    if args.peers:
        print_peer("W1", "llama_server.py", walls[cases[-1][0]], "W1 command (start-up included)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["scale"]:
        from flows import bench_scale

        return bench_scale.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m flows.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", nargs="?", choices=["summarize", "extract", "startup", "scale"], default="summarize")
    p.add_argument("--rows", type=int, help="rows to run (default 48 for summarize, 200 for extract)")
    p.add_argument("--max-tokens", type=int, help="default 64 for summarize, 160 for extract")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--n-seq", type=int, default=0, help="slots (default: the flows' default)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads for the engine (default: all cores; the bench wants a quiet machine)")
    p.add_argument("--no-loop", action="store_true",
                   help="skip the plain llama-cpp-python loop (extract's loop, with its grammar, is very slow: "
                        "it had not finished its 200 rows after 9 minutes on 2 cores)")
    p.add_argument("--grammar-rows", type=int, default=48, help="extract: rows for grammar against free rows")
    p.add_argument("--calibrate", action="store_true",
                   help="measure prefill and decode rates at several slot and thread counts (under a minute on the "
                        "default model), print the table and store the best for this model and machine: jobs use "
                        "it unless --n-seq or --threads say otherwise (flows/calibrate.py)")
    p.add_argument("--model", help="--calibrate: the model (default: the embedded default model)")
    p.add_argument("--peers", action="store_true",
                   help="also run ../shared/peers (llama-server, llama-batched-bench) in the same sitting")
    args = p.parse_args(argv)
    args.load = os.getloadavg()[0]
    if args.calibrate:
        from flows.calibrate import calibrate

        calibrate(args.model)
        return 0
    if args.peers and not _peers.available():
        p.error("--peers: the peers are not set up; run ../shared/peers/setup.sh first")
    if args.kind == "startup":
        return startup_bench(args)
    from flows._cli import quiet_prefect_console
    from flows.summarize import summarize_flow  # noqa: F401  Prefect imported, so its console can be quieted

    quiet_prefect_console()
    return row_bench(args)


if __name__ == "__main__":
    sys.exit(main())
