"""Agent simulation: `python -m flows.simulate SPEC.yaml [--steps N] [--out DIR] [--fork-from K] [options]`."""

from __future__ import annotations

import argparse
import os
import sys

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from flows._cli import EXIT_OK, EXIT_ROW_ERRORS, run_cli
from tokenmill.models.family import FAMILIES
from tokenmill.models.registry import NAMES as BACKENDS
from tokenmill.progress import progress_bar
from tokenmill.sim.run import SimConfig, Simulation, effective_spec

EXIT_STATUS_HELP = """exit status:
  0    every step ran and every model call succeeded
  1    the run could not start or go on (the reason is printed on one line)
  2    bad command-line usage
  3    finished, but some agents' calls failed: they waited those steps (see llm_calls.parquet)
  130  interrupted (Ctrl-C); committed steps are kept: run the same command again to continue
"""


@task(name="prepare-simulation", cache_policy=NO_CACHE)
def prepare(config: SimConfig) -> tuple[Simulation, int]:
    """Check the spec and templates, take the output folder, restore committed steps, load the model."""
    sim = Simulation(config)
    last = sim.open()
    try:
        if last < sim.spec.steps:
            sim.start()
    except BaseException:
        sim.close()
        raise
    return sim, last


@task(name="step", cache_policy=NO_CACHE)
def run_step(sim: Simulation, step: int) -> dict:
    """One step, committed atomically: every agent acts (one batch), the world applies, agents perceive, reflect."""
    return sim.step(step)


def publish(sim: Simulation, row: dict | None) -> None:
    lines = ["| metric | value |", "| --- | --- |"] + [
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in (row or {}).items() if k != "params"]
    create_markdown_artifact(key="simulate-run", markdown=f"# simulate: {sim.spec.name}\n\n{sim.summary_line()}\n\n"
                             + "\n".join(lines), description=f"tokenmill simulation, results in {sim.out}")


@flow(name="simulate", log_prints=False)
def simulate_flow(config: SimConfig, progress: bool = True) -> dict:
    """Run the steps of `config.spec` not yet committed in OUT; a task run per step."""
    sim, last = prepare(config)
    errors = 0
    try:
        total = sim.spec.steps
        artifact = create_progress_artifact(progress=100.0 * min(last, total) / total,
                                            description=f"steps of {sim.spec.name} committed")
        bar = progress_bar(total=total, initial=min(last, total), unit="step", disable=not progress,
                   dynamic_ncols=True)
        for step in range(last + 1, total + 1):
            result = run_step.with_options(task_run_name=f"step-{step}")(sim, step)
            errors += result["errors"]
            bar.update(1)
            bar.set_postfix_str(sim.postfix())
            update_progress_artifact(artifact_id=artifact, progress=100.0 * step / total)
        bar.close()
    finally:
        row = sim.close()
    publish(sim, row)
    return {"out": str(sim.out), "summary": sim.summary_line(), "errors": errors}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.simulate", epilog=EXIT_STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run an agent simulation from a YAML spec: every step, all agents' actions are decoded in one "
                    "batch as schema-constrained JSON, applied in a seeded order, perceived and remembered. Each "
                    "step is committed atomically to OUT (events, llm_calls, memories, agents, usage, transcript.md); "
                    "the same command again continues from the last committed step.")
    p.add_argument("spec", metavar="SPEC", help="simulation spec (.yaml), e.g. jobs/harbor.yaml")
    p.add_argument("--steps", type=int, help="run up to step N (default: the spec's `steps`); more extends a finished run")
    p.add_argument("--out", help="output folder (default: a folder beside SPEC named <stem>.simulate)")
    p.add_argument("--fork-from", type=int, metavar="K",
                   help="start a new run (--out NEW) from step K of an existing one (--from); SPEC may differ after K")
    p.add_argument("--from", dest="fork_source", metavar="DIR",
                   help="with --fork-from: the run to fork (default: SPEC's default output folder)")
    p.add_argument("--model", help="GGUF model file (default: the spec's model.path, else the embedded SmolLM2-135M)")
    p.add_argument("--prompt", help="template: a name under prompts/simulate/ or a path to a Jinja file")
    p.add_argument("--prompt-family", choices=FAMILIES, help="template family (default: detected from the model)")
    p.add_argument("--show-prompt", action="store_true",
                   help="print the first agent's next prompt (special tokens visible) and exit")
    p.add_argument("--max-tokens", type=int, help="most tokens of one action (default: the spec's sampling.max_tokens)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the spec's)")
    p.add_argument("--seed", type=int, help="run seed; each agent's call at each step gets its own seed from it")
    p.add_argument("--n-ctx", type=int, help="context tokens one agent's call may use (default: the spec's model.n_ctx)")
    p.add_argument("--n-seq", type=int, default=0,
                   help="calls decoded together (default 0: one per agent, at most 16); each gets its own --n-ctx")
    p.add_argument("--n-gpu-layers", type=int, default=-1, help="layers to offload to a GPU (default -1: all)")
    p.add_argument("--backend", choices=BACKENDS, default=os.environ.get("TOKENMILL_BACKEND", "llama"),
                   help="llama: continuous batching (default); llama-simple: one call at a time")
    p.add_argument("--price-input", type=float, default=0.15, help="USD per million prompt tokens (estimate)")
    p.add_argument("--price-output", type=float, default=0.60, help="USD per million completion tokens (estimate)")
    p.add_argument("--worker-timeout", type=float, default=300.0,
                   help="seconds without output after which the model worker counts as hung and is restarted")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--verbose", action="store_true", help="show Prefect's own logging on the console")
    p.add_argument("--debug", action="store_true", help="print tracebacks for errors")
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(spec=args.spec, out=args.out, steps=args.steps, fork_from=args.fork_from,
                     fork_source=args.fork_source, model=args.model, n_ctx=args.n_ctx, n_seq=args.n_seq,
                     n_gpu_layers=args.n_gpu_layers, backend=args.backend, temperature=args.temperature,
                     seed=args.seed, max_tokens=args.max_tokens, prompt=args.prompt, prompt_family=args.prompt_family,
                     hang_timeout_s=args.worker_timeout, price_input_per_mtok=args.price_input,
                     price_output_per_mtok=args.price_output)


def job_config(args: argparse.Namespace) -> SimConfig:
    """The run a parsed command line (or a job spec, see tokenmill.jobspec) asks for, its spec checked:
    a bad spec fails here, on one line, before any model starts."""
    config = config_from_args(args)
    if args.fork_from is not None and (args.fork_from < 0 or not args.out):
        from tokenmill.errors import InputError
        raise InputError("--fork-from K needs K >= 0 and a new --out for the what-if run")
    effective_spec(config)
    return config


def main(args: argparse.Namespace) -> int:
    config = job_config(args)
    if args.show_prompt:
        sim = Simulation(config)
        prompt = sim.show_prompt()
        print(prompt)
        print(f"({sim.info.count_tokens(prompt)} tokens; family {sim.prompts.family}; "
              f"template {sim.prompts.template.name}; {sim.prompts.chat.name})", file=sys.stderr)
        return EXIT_OK
    Simulation(config).check()  # a folder holding another run, a bad fork: one line, before Prefect starts
    result = simulate_flow(config, progress=not args.no_progress)
    print(result["summary"], file=sys.stderr)
    return EXIT_ROW_ERRORS if result["errors"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(run_cli("python -m flows.simulate", main, parser()))
