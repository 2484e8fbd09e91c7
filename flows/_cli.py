"""What every flow's command line shares: common options, quiet Prefect, one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Callable

from tokenmill.errors import TokenmillError
from tokenmill.models.family import FAMILIES
from tokenmill.models import registry
from tokenmill.tasks.runner import JobConfig

EXIT_OK = 0
EXIT_FAILED = 1  # the job could not run; the reason is printed on one line
EXIT_USAGE = 2  # a bad option (argparse)
EXIT_ROW_ERRORS = 3  # the job finished, but some rows have status "error"
EXIT_INTERRUPTED = 130

EXIT_STATUS_HELP = """exit status:
  0    every row is ok
  1    the job could not run (the reason is printed on one line)
  2    bad command-line usage
  3    finished with row errors: see the status and error columns of results.parquet
  130  interrupted (Ctrl-C); finished rows are kept: run the same command again to continue
"""


def common_parser(prog: str, description: str, dataset: bool = True, input_metavar: str = "INPUT",
                  input_help: str = "dataset to read: .parquet, .csv, .jsonl or .ndjson") -> argparse.ArgumentParser:
    """The options every row job accepts; `dataset=False` leaves out the dataset's own options
    (--column, --id-column, --prompt) for a job whose rows bring their prompts (flows.batch)."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=EXIT_STATUS_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar=input_metavar, help=input_help)
    if dataset:
        p.add_argument("--column", help="text column (default: 'text', else the only string column)")
        p.add_argument("--id-column", help="column copied to the results' id (default: the row's position)")
    p.add_argument("--model", help="a GGUF file, ollama:NAME[:TAG], gpt4all:FILE, x.llamafile, a bare name, or an "
                                    "OpenAI-compatible server http://HOST:PORT[/v1][#MODEL] (default: the embedded "
                                    "SmolLM2-135M-Instruct)")
    p.add_argument("--out", help=f"output folder (default: a folder beside {input_metavar} named after it)")
    if dataset:
        p.add_argument("--prompt", help="task template: a name under prompts/<task>/ or a path to a Jinja file")
    p.add_argument("--prompt-family", choices=FAMILIES,
                   help="template family (default: detected from the model's metadata); picks "
                        "prompts/<task>/<family>.j2 and, for models without a chat template, prompts/chat/<family>.j2")
    p.add_argument("--show-prompt", action="store_true",
                   help="print the fully rendered prompt of the first row (special tokens visible) and exit")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per row (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed per row (default 0)")
    p.add_argument("--limit", type=int, help="process only the first N rows")
    p.add_argument("--n-ctx", type=int, default=4096,
                   help="context tokens one row may use: prompt + --max-tokens must fit (default 4096)")
    p.add_argument("--n-seq", type=int, default=0,
                   help="rows decoded together in one batch (default 0: what `python -m flows.bench --calibrate` "
                        "found best for the model on this machine, else as many, up to 16, as fit a 2 GiB KV cache; "
                        "16 for the default model); each gets its own --n-ctx of KV cache")
    p.add_argument("--n-gpu-layers", type=int, default=-1,
                   help="layers to offload to a GPU (default -1: all when the build supports it)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for llama.cpp (default 0: what `python -m flows.bench --calibrate` found best "
                        "for the model on this machine, else every core; either way no more than the cores other "
                        "programs leave free when the job starts, since llama.cpp slows down badly when its "
                        "threads compete with other programs for cores)")
    p.add_argument("--backend", choices=registry.NAMES, default=os.environ.get("TOKENMILL_BACKEND") or None,
                   help="what runs the model (default $TOKENMILL_BACKEND, else llama for model files and http "
                        "for server URLs): " + "; ".join(f"{k.name}: {k.help}" for k in registry.BACKENDS.values()))
    p.add_argument("--concurrency", type=int, default=None,
                   help="--backend http: requests in flight at once (default: the server's slot count where it "
                        "reports one, as llama-server does, else 4)")
    p.add_argument("--backend-option", action="append", metavar="KEY=VALUE",
                   help="an option of the chosen backend, checked before any row (repeatable); --backend http: "
                        + ", ".join(f"{name} ({f.description})" for name, f in registry.HTTPOptions.model_fields.items()))
    p.add_argument("--chunk-size", type=int, default=1024, help="rows read, rendered and looked up together (default 1024)")
    p.add_argument("--part-rows", type=int, default=50_000,
                   help="most finished rows in one Parquet part under OUT/parts (default 50000); a part is also "
                        "written every second while rows finish, so a killed run loses at most a second of work")
    p.add_argument("--no-strip", dest="strip", action="store_false",
                   help="keep whitespace around outputs (a parsing option: rows are re-parsed, not regenerated)")
    p.add_argument("--retry-errors", action=argparse.BooleanOptionalAction, default=True,
                   help="on a rerun into the same --out, regenerate rows that failed (default: on)")
    p.add_argument("--cache", metavar="DIR", help="results cache shared across runs (default: ~/.cache/tokenmill)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the shared results cache")
    p.add_argument("--price-input", type=float, default=0.15,
                   help="USD per million prompt tokens for the cost_avoided_usd estimate (default 0.15)")
    p.add_argument("--price-output", type=float, default=0.60,
                   help="USD per million completion tokens for the cost_avoided_usd estimate (default 0.60)")
    p.add_argument("--worker-timeout", type=float, default=300.0,
                   help="seconds without any output after which the model worker counts as hung and is "
                        "restarted (default 300)")
    p.add_argument("--workers", type=int, default=0,
                   help="model worker processes, each loading the model once for the run (default 0: one per "
                        "visible GPU, each pinned to its device, else one that uses every core); rows that share "
                        "a prompt prefix go to the same worker")
    p.add_argument("--runner", choices=("local", "ray"), default="local",
                   help="where the model runs: local worker processes (default), or ray: Prefect task runs on a Ray "
                        "cluster through prefect-ray (pip install 'prefect[ray]'); results still come back to OUT")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="--runner ray: the cluster, e.g. ray://head:10001 or auto (default: start a local one)")
    p.add_argument("--task-rows", type=int, default=10_000,
                   help="input rows per Prefect task run (default %(default)s); the task runs of a flow run show "
                        "their rows and return their counts, and a retried one generates no row twice")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--verbose", action="store_true", help="show Prefect's own logging on the console")
    p.add_argument("--debug", action="store_true", help="print tracebacks for errors")
    return p


def config_from_args(args: argparse.Namespace, **extra) -> JobConfig:
    """`extra`: the task's own fields (and, for a parser without them, the dataset options' values)."""
    dataset = {key: getattr(args, key, None) for key in ("column", "id_column", "prompt")}
    return JobConfig(**{
        **dataset, "input": args.input, "model": args.model, "out": args.out, "prompt_family": args.prompt_family,
        "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed, "limit": args.limit,
        "n_ctx": args.n_ctx, "n_seq": args.n_seq, "n_gpu_layers": args.n_gpu_layers, "n_threads": args.threads,
        "backend": args.backend, "backend_options": backend_options(args), "chunk_size": args.chunk_size, "part_rows": args.part_rows,
        "strip": args.strip, "retry_errors": args.retry_errors,
        "cache": not args.no_cache, "cache_dir": args.cache, "price_input_per_mtok": args.price_input,
        "price_output_per_mtok": args.price_output, "hang_timeout_s": args.worker_timeout,
        "workers": args.workers, "task_rows": args.task_rows,
        "runner": args.runner, "ray_address": args.ray_address, **extra})


def backend_options(args: argparse.Namespace) -> dict:
    """--backend-option KEY=VALUE items and --concurrency, for the backend's registry entry to check."""
    options = registry.parse_option_items(getattr(args, "backend_option", None))
    if getattr(args, "concurrency", None) is not None:
        options["concurrency"] = args.concurrency
    return options


def quiet_prefect_console() -> None:
    """Keep Prefect's console output quiet; its logs still go to the API and the flow run is recorded."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *[logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.CRITICAL + 1)


def run_cli(prog: str, main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: list[str] | None = None) -> int:
    """Parse, run, and turn tokenmill errors into one line on stderr with the right exit status."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except TokenmillError as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        out = f" (--out {args.out})" if getattr(args, "out", None) else ""
        print(f"{prog}: interrupted; rows finished so far are kept in the output folder{out}. "
              "Run the same command again to continue where it stopped.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug, not a user error: still one line unless --debug
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{prog}: error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILED
