"""Benchmark: `python -m flows.bench_simulate [--agents 8] [--steps 20]`.

Runs the simulation (all agents' calls of a step in one batch through the batched engine; each
agent's prompt is its running chat, so the engine continues from what the agent's slot holds)
and, in the same process, a naive loop over the very same prompts: one
`Llama.create_chat_completion` per agent per step with the agent's whole chat sent every time, as
agent frameworks do (llama-cpp-python still reuses whatever prefix the previous call left in its
single context, which is another agent's). Same model, grammar, max_tokens, sampling and seeds.
`--naive single` also times a loop over one prompt per call rebuilt from the same state (persona,
retrieved memories, perception), as stateless frameworks build it. Prints the wall times, the
prompt tokens evaluated at steps 2 and N, and the ratios; writes OUT/bench_simulate.parquet.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import yaml

from flows._cli import run_cli
from tokenmill.io.parts import write_atomic
from tokenmill.models.gguf_info import load_llama
from tokenmill.prompts import ChatTemplate
from tokenmill.sim.run import SimConfig, Simulation

REPO = Path(__file__).resolve().parents[1]


def bench_spec(source: Path, agents: int, steps: int, folder: Path) -> Path:
    data = yaml.safe_load(source.read_text())
    if len(data["agents"]) < agents:
        raise SystemExit(f"{source} has {len(data['agents'])} agents, fewer than --agents {agents}")
    data["agents"], data["steps"] = data["agents"][:agents], steps
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_batched(spec: Path, out: Path, progress: bool):
    calls, steps = [], []
    sim = Simulation(SimConfig(spec=str(spec), out=str(out)))

    def on_prompt(step, agent, purpose, req):
        chat = sim.prompts.last_messages  # what the simulation sent: the agent's chat
        single = sim.prompts.next_prompt(sim.world, sim.streams[agent], step, purpose)  # the same state, one prompt
        calls.append({"step": step, "agent": agent, "purpose": purpose, "chat": chat,
                      "single": sim.prompts.last_messages, "request": req})
        sim.prompts.last_messages = chat

    sim.on_prompt = on_prompt
    t0 = time.perf_counter()
    sim.run(progress=progress, on_step=steps.append)
    wall = time.perf_counter() - t0
    llm = pl.read_parquet(out / "llm_calls.parquet")
    return sim, calls, steps, wall, llm


class _Formatter:
    """llama-cpp-python chat formatter that renders with tokenmill's sandboxed copy of the model's template."""

    def __init__(self, chat: ChatTemplate):
        self.chat = chat

    def __call__(self, *, messages, **kwargs):
        from llama_cpp.llama_chat_format import ChatFormatterResponse

        prompt = self.chat.render(messages)
        if self.chat.bos_token and prompt.startswith(self.chat.bos_token):
            prompt = prompt[len(self.chat.bos_token):]
        return ChatFormatterResponse(prompt=prompt, stop=[self.chat.eos_token] if self.chat.eos_token else None)


def run_naive(sim: Simulation, calls: list[dict], progress: bool, prompts: str) -> tuple[float, list[dict]]:
    from llama_cpp import LlamaGrammar
    from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler
    from tqdm import tqdm

    llm = load_llama(sim.model_path, n_ctx=sim.spec.model.n_ctx, n_batch=512, n_threads=os.cpu_count(),
                     n_gpu_layers=0)
    llm.chat_handler = chat_formatter_to_chat_completion_handler(_Formatter(sim.prompts.chat))
    evaluated: list[int] = []
    real_eval = llm.eval

    def counting_eval(tokens):
        evaluated.append(len(tokens))
        return real_eval(tokens)

    llm.eval = counting_eval
    grammars: dict[str, LlamaGrammar] = {}
    rows = []
    t0 = time.perf_counter()
    for call in tqdm(calls, unit="call", file=sys.stderr, disable=not progress, desc="naive loop"):
        req = call["request"]
        if req.grammar not in grammars:
            grammars[req.grammar] = LlamaGrammar.from_string(req.grammar, verbose=False)
        evaluated.clear()
        t = time.perf_counter()
        reply = llm.create_chat_completion(
            messages=call[prompts], grammar=grammars[req.grammar],
            max_tokens=req.max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
            min_p=req.min_p, seed=req.seed, repeat_penalty=req.repeat_penalty)
        usage = reply["usage"]
        rows.append({"step": call["step"], "agent": call["agent"], "purpose": call["purpose"],
                     "prompt_tokens": usage["prompt_tokens"], "evaluated_tokens": evaluated[0] if evaluated else 0,
                     "completion_tokens": usage["completion_tokens"], "latency_ms": (time.perf_counter() - t) * 1000})
    return time.perf_counter() - t0, rows


def main(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_simulate."))
    out.mkdir(parents=True, exist_ok=True)
    spec = bench_spec(Path(args.spec), args.agents, args.steps, out)
    sim_out = out / "run"
    if sim_out.exists():
        raise SystemExit(f"{sim_out} exists: the benchmark needs a fresh folder (--out)")
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    sim, calls, steps, batched_wall, llm_calls = run_batched(spec, sim_out, not args.no_progress)
    loops = [("batched", llm_calls.with_columns((pl.col("prompt_tokens") - pl.col("cached_tokens")).alias("evaluated_tokens")),
              sum(s["seconds"] for s in steps))]
    for prompts in args.naive:
        wall, naive = run_naive(sim, calls, not args.no_progress, prompts)
        loops.append((f"naive-{prompts}", pl.DataFrame(naive), wall))
        write_atomic(loops[-1][1], out / f"naive_{prompts}_calls.parquet")

    def at(df: pl.DataFrame, step: int, act_only: bool = False) -> int:
        df = df.filter(pl.col("step") == step)
        if act_only:
            df = df.filter(pl.col("purpose") == "act")
        return int(df["evaluated_tokens"].sum())

    last = args.steps
    rows = []
    for name, df, wall in loops:
        rows.append({"loop": name, "agents": args.agents, "steps": args.steps, "calls": df.height, "wall_s": wall,
                     "prompt_tokens": int(df["prompt_tokens"].sum()), "evaluated_tokens": int(df["evaluated_tokens"].sum()),
                     "completion_tokens": int(df["completion_tokens"].sum()),
                     "evaluated_step_2": at(df, 2), f"evaluated_step_{last}": at(df, last),
                     "act_evaluated_step_2": at(df, 2, True), f"act_evaluated_step_{last}": at(df, last, True),
                     "act_evaluated_by_step": [at(df, s, True) for s in range(1, last + 1)]})
    write_atomic(pl.DataFrame(rows), out / "bench_simulate.parquet")
    b = rows[0]
    growth = b[f"evaluated_step_{last}"] / max(b["evaluated_step_2"], 1)
    print(f"{args.agents} agents x {args.steps} steps, {b['calls']} calls each way, model {sim.info.name}, "
          f"device {sim.stats.device}")
    print(f"batched engine (simulation steps): {b['wall_s']:.1f} s wall ({batched_wall:.1f} s with model load and "
          f"commits); prompt tokens evaluated: step 2 {b['evaluated_step_2']}, step {last} {b[f'evaluated_step_{last}']} "
          f"(of {b['prompt_tokens']} prompt tokens, {b['evaluated_tokens']} evaluated in all)")
    print(f"  act prompt tokens evaluated, steps 1-{last}: {' '.join(map(str, b['act_evaluated_by_step']))}")
    print("  seconds per step: " + " ".join(f"{s['seconds']:.1f}" for s in steps))
    for n in rows[1:]:
        print(f"{n['loop']} create_chat_completion loop ({NAIVE[n['loop'][6:]]}): {n['wall_s']:.1f} s wall; prompt "
              f"tokens evaluated: step 2 {n['evaluated_step_2']}, step {last} {n[f'evaluated_step_{last}']} "
              f"({n['evaluated_tokens']} in all)")
        print(f"  speed: batched {n['wall_s'] / b['wall_s']:.2f}x the {n['loop']} loop (target >= 3x); step {last} / "
              f"step 2 evaluated prompt tokens: naive {n[f'evaluated_step_{last}'] / max(n['evaluated_step_2'], 1):.2f}")
    print(f"step {last} / step 2 evaluated prompt tokens, batched: {growth:.2f} (target <= 1.2)")
    e = (sim.stats.engine if sim.stats else None) or {}
    if e:
        print("batched engine time: " + ", ".join(
            f"{k} {e[k]:.1f} s" if isinstance(e[k], float) else f"{k} {e[k]}"
            for k in ("prompt_tokens", "prompt_s", "generated_tokens", "generate_s", "decode_calls", "sample_s",
                      "jump_forward_s", "text_s", "admit_s", "idle_s", "grammar_samples", "grammar_rejections")
            if k in e))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"results in {out}")
    return 0


NAIVE = {"chat": "each call sends the agent's whole chat, the very messages the simulation sent",
         "single": "each call sends one prompt rebuilt from the same state: persona, retrieved memories, perception"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.bench_simulate", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(REPO / "jobs" / "harbor.yaml"), help="spec to take agents from (default jobs/harbor.yaml)")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--naive", nargs="*", choices=sorted(NAIVE), default=["chat"],
                   help="naive loops to time against the batched run: chat (the very messages the simulation "
                        "sent, default), single (one prompt rebuilt from the same state per call); none: batched only")
    p.add_argument("--out", help="folder for the run and bench_simulate.parquet (default: a new temporary folder)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(run_cli("python -m flows.bench_simulate", main, parser()))
