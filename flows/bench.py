"""Benchmark the full flow against a plain llama-cpp-python loop: `python -m flows.bench [summarize|extract]`.

Both sides get the same rendered prompts and the same generation settings, run one after
the other in this process on this machine, and are reported as ratios, so a noisy shared
machine moves both. The engine's ceiling is estimated from its own measured prefill and
batched-decode rates: prompt tokens evaluated / prefill rate + completion tokens / decode rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

import flows  # noqa: F401  sets Prefect's environment defaults
from tokenmill.tasks.runner import Job, JobConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def scitldr_input(rows: int, folder: Path) -> Path:
    records = [json.loads(line) for line in (SHARED / "scitldr" / "dev.jsonl").open()][:rows]
    path = folder / "scitldr.parquet"
    pl.DataFrame({"text": [" ".join(r["source"]) for r in records]}).write_parquet(path)
    return path


def e2e_input(rows: int, folder: Path) -> Path:
    path = folder / "e2e.parquet"
    pl.read_csv(SHARED / "e2e" / "dev.csv").head(rows).select(pl.col("ref").alias("text")).write_parquet(path)
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


def jump_forward_runs(job: Job, max_tokens: int) -> dict:
    """The engine alone on the job's rows, jump-forward on then off: {on: (seconds, stats, completions)}."""
    from dataclasses import replace

    from tokenmill.models.base import GenerationRequest
    from tokenmill.models.llama_batched import LlamaBatchedBackend

    prompts = [job.render(row) for chunk in job.table.chunks(64) for row in chunk.iter_rows(named=True)]
    runs = {}
    for jump in (True, False):
        requests = [GenerationRequest(index=i, prompt=p, max_tokens=max_tokens, temperature=0.0, seed=job.config.seed,
                                      stop=list(job.task.stop), grammar=job.task.grammar) for i, p in enumerate(prompts)]
        backend = LlamaBatchedBackend(replace(job.settings(), jump_forward=jump))
        try:
            started = time.perf_counter()
            done = {c.index: c for c in backend.generate(requests)}
            runs[jump] = (time.perf_counter() - started, dict(backend.stats), done)
        finally:
            backend.close()
    return runs


def engine_rates(job: Job) -> dict:
    from tokenmill.models.llama_batched import LlamaBatchedBackend

    backend = LlamaBatchedBackend(job.settings())
    try:
        return backend.measure_rates()
    finally:
        backend.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", nargs="?", choices=["summarize", "extract"], default="summarize")
    p.add_argument("--rows", type=int, help="rows to run (default 48 for summarize, 200 for extract)")
    p.add_argument("--max-tokens", type=int, help="default 64 for summarize, 192 for extract")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--n-seq", type=int, default=0)
    args = p.parse_args(argv)
    from flows._cli import quiet_prefect_console

    quiet_prefect_console()
    rows = args.rows or (48 if args.kind == "summarize" else 200)
    max_tokens = args.max_tokens or (64 if args.kind == "summarize" else 192)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = scitldr_input(rows, folder) if args.kind == "summarize" else e2e_input(rows, folder)
        schema_path = str(Path(__file__).resolve().parents[1] / "jobs" / "restaurants.yaml")
        config = JobConfig(input=str(data), out=str(folder / "out"), max_tokens=max_tokens, temperature=0.0,
                           n_ctx=args.n_ctx, n_seq=args.n_seq, cache=False,
                           schema=schema_path if args.kind == "extract" else None)
        if args.kind == "summarize":
            from tokenmill.tasks.summarize import prepare_summarize as prepare
        else:
            from tokenmill.tasks.extract import prepare_extract as prepare
        job = prepare(config, create_out=False)
        schema = json.loads(job.task.variables["schema"]) if args.kind == "extract" else None

        rates = engine_rates(job)
        plain_s, plain_prompt, plain_completion = plain_loop(job, max_tokens, schema)
        run_flow(args.kind, JobConfig(**{**config.__dict__, "out": str(folder / "warmup"), "limit": 1}))
        flow_s, result = run_flow(args.kind, config)
        results = pl.read_parquet(folder / "out" / "results.parquet")
        jump = jump_forward_runs(job, max_tokens) if job.task.grammar else None

    evaluated = int(results["prompt_tokens"].sum() - results["cached_tokens"].sum())
    completion = int(results["completion_tokens"].sum())
    ceiling_s = evaluated / rates["prefill_tok_s"] + completion / rates["decode_tok_s"]
    flow_tok = (results["prompt_tokens"].sum() + completion) / flow_s
    plain_tok = (plain_prompt + plain_completion) / plain_s
    print(f"tokenmill bench: {args.kind}, {rows} rows, max_tokens {max_tokens}, temperature 0, "
          f"n_ctx {args.n_ctx}, {rates['n_seq']} slots, device {result['device']}")
    print(f"  engine rates: prefill {rates['prefill_tok_s']:.0f} tok/s, batched decode "
          f"{rates['decode_tok_s']:.0f} tok/s")
    print(f"  plain llama-cpp-python loop: {plain_s:7.1f} s  {plain_tok:6.0f} tok/s  "
          f"({plain_prompt} prompt + {plain_completion} completion tokens)")
    print(f"  tokenmill flow (end to end): {flow_s:7.1f} s  {flow_tok:6.0f} tok/s  "
          f"({results['prompt_tokens'].sum()} prompt, {results['cached_tokens'].sum()} from the shared prefix, "
          f"{completion} completion; {int((results['status'] == 'ok').sum())}/{results.height} ok)")
    print(f"  engine ceiling estimate:     {ceiling_s:7.1f} s")
    print(f"  speed-up over the plain loop: {plain_s / flow_s:.2f}x   flow / ceiling: {flow_s / ceiling_s:.2f}x")
    if jump:
        (on_s, on, on_rows), (off_s, off, off_rows) = jump[True], jump[False]
        same = sum(c.text == off_rows[i].text for i, c in on_rows.items())
        completion = sum(c.completion_tokens for c in on_rows.values())
        print(f"  engine alone, jump-forward on: {on_s:7.1f} s  off: {off_s:7.1f} s   "
              f"jump-forward speed-up: {off_s / on_s:.2f}")
        print(f"    on: {on['forced_tokens']} of {completion} completion tokens forced, "
              f"{on['generate_calls']} generation decode calls (off: {off['generate_calls']}), "
              f"{on['jump_forward_s']:.2f} s finding forced text; decode {on['decode_s']:.1f} s (off: "
              f"{off['decode_s']:.1f} s); {same}/{len(on_rows)} outputs identical on vs off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
