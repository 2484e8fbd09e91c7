"""Run one job spec now: `python -m flows.run jobs/<name>.yaml [--set KEY=VALUE ...]`."""

from __future__ import annotations

import argparse
import sys

from flows._cli import EXIT_OK, EXIT_STATUS_HELP, run_cli
from flows._specs import command, job_config
from tokenmill.errors import TokenmillError
from tokenmill.jobspec import load_job_spec, spec_keys_help

PROG = "python -m flows.run"


class _Parser(argparse.ArgumentParser):
    def format_help(self) -> str:
        # every task's keys, from each command's parser: built only for --help (simulate's imports Prefect)
        self.epilog = spec_keys_help() + "\n\n" + EXIT_STATUS_HELP
        return super().format_help()


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the job a spec declares, now: the spec becomes its command line\n"
                    "(python -m flows.<task> INPUT --option ...), which runs as if typed. The spec's\n"
                    "schedule is ignored here; python -m flows.deploy serves it.",
    )
    p.add_argument("spec", metavar="SPEC", help="job spec (.yaml), e.g. jobs/articles-nightly.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key for this run (VALUE is read as YAML: --set limit=2 --set no_cache=true); "
                        "repeatable; a relative path is relative to the current folder")
    p.add_argument("--print-command", action="store_true", help="print the equivalent command line and exit")
    p.add_argument("--show-prompt", action="store_true",
                   help="print the first rendered prompt (special tokens visible) and exit")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--verbose", action="store_true", help="show Prefect's own logging on the console")
    p.add_argument("--debug", action="store_true", help="print tracebacks for errors")
    return p


def main(args: argparse.Namespace) -> int:
    spec = load_job_spec(args.spec, args.overrides)
    if args.print_command:
        print(spec.command_line())
        return EXIT_OK
    config = job_config(spec)  # the options, checked before anything starts; errors name the spec's key
    if hasattr(config, "validate"):
        try:
            config.validate()
        except TokenmillError as exc:
            raise spec.fail(str(exc)) from None
    console = [flag for flag, on in [("--show-prompt", args.show_prompt), ("--no-progress", args.no_progress),
                                     ("--verbose", args.verbose), ("--debug", args.debug)] if on]
    print(f"{PROG}: job {spec.name}: {spec.command_line()}", file=sys.stderr)
    return command(spec).main(spec.namespace(*console))


if __name__ == "__main__":
    sys.exit(run_cli(PROG, main, parser()))
