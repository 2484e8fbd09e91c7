"""Serve every job spec with a schedule as a Prefect deployment: `python -m flows.deploy [SPEC ...]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows._cli import EXIT_OK, run_cli
from flows._specs import check
from tokenmill.errors import TokenmillError
from tokenmill.jobspec import JobSpec, JobSpecError, is_job_spec, load_job_spec

PROG = "python -m flows.deploy"
DEFAULT_GLOB = "jobs/*.yaml"

DESCRIPTION = """\
Check every job spec, then serve those with a `schedule` as Prefect deployments, all in this one
process (Prefect's serve), until Ctrl-C. Nothing is served unless every spec is valid.

Each deployment is named <task>/<spec name> (e.g. summarize/articles-nightly), with parameters
`spec` (the file, re-read by every run) and `overrides` (KEY=VALUE items, like flows.run's --set).
Runs come from the schedule, the UI's "Run" button, `prefect deployment run summarize/NAME`, or
run_deployment(). Every model-heavy run takes the one slot of the global concurrency limit
tokenmill-model (created here when missing): a run that finds it taken waits, it does not fail;
and each deployment runs at most one run at a time (its own limit, collision strategy ENQUEUE).

Needs a Prefect server: `prefect server start`, then PREFECT_API_URL=http://127.0.0.1:4200/api.
"""

EPILOG = """exit status:
  0    served until interrupted (or, with --check, every spec is valid)
  1    a spec is invalid, or no server answers (the reason is printed on one line; nothing is served)
  2    bad command-line usage
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", metavar="SPEC", nargs="*",
                   help=f"job spec files (default: {DEFAULT_GLOB}, skipping simulation specs, which have no `task`)")
    p.add_argument("--check", action="store_true", help="check the specs and print what would be served; serve nothing")
    p.add_argument("--debug", action="store_true", help="print tracebacks for errors")
    return p


def select_files(given: list[str]) -> list[Path]:
    if given:
        return [Path(p) for p in given]
    files = sorted(Path().glob(DEFAULT_GLOB))
    skipped = [f for f in files if not is_job_spec(f)]
    for f in skipped:
        print(f"{PROG}: {f}: no `task` key (a simulation spec?), not a job spec: skipped", file=sys.stderr)
    files = [f for f in files if f not in skipped]
    if not files:
        raise JobSpecError(f"no job spec matches {DEFAULT_GLOB} in {Path().absolute()}; name the spec files")
    return files


def load_all(files: list[Path]) -> list[JobSpec]:
    """Every spec, validated and checked, before anything is served."""
    specs = [load_job_spec(f) for f in files]
    seen: dict[tuple[str, str], JobSpec] = {}
    for spec in specs:
        if (other := seen.get((spec.task, spec.name))) is not None:
            raise JobSpecError(f"job spec {spec.path}: key 'name': {spec.name!r} is also the name of the "
                               f"{spec.task} job {other.path}; deployment names must differ")
        seen[(spec.task, spec.name)] = spec
    for spec in specs:
        if note := check(spec, waiting_ok=True):
            print(f"{PROG}: {note}", file=sys.stderr)
    return specs


def server_url() -> str:
    """The configured Prefect server, which must answer: a served deployment outlives no temporary server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise TokenmillError("no Prefect server is configured: start one with `prefect server start` and set "
                             "PREFECT_API_URL=http://127.0.0.1:4200/api")
    with get_client(sync_client=True) as client:
        if (exc := client.api_healthcheck()) is not None:
            raise TokenmillError(f"the Prefect server at {url} does not answer ({type(exc).__name__}); "
                                 "start it with `prefect server start` or fix PREFECT_API_URL")
    return url


def ensure_model_limit() -> int:
    """Create the global concurrency limit model-heavy runs share (1 slot) unless it exists; its slots."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    from flows.deployed import MODEL_LIMIT

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(MODEL_LIMIT)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=MODEL_LIMIT, limit=1))
            except ObjectAlreadyExists:
                pass
            limit = client.read_global_concurrency_limit_by_name(MODEL_LIMIT)
    if not limit.active or limit.limit < 1:
        raise TokenmillError(f"the global concurrency limit {MODEL_LIMIT} is inactive or has no slot; activate it "
                             f"with `prefect gcl update {MODEL_LIMIT} --enable --limit 1`")
    return limit.limit


def deployment(spec: JobSpec):
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron, Interval
    from prefect.types.entrypoint import EntrypointType

    from flows.deployed import FLOWS

    s = spec.schedule
    schedule = Cron(s.cron, timezone=s.timezone) if s.cron else Interval(s.interval, timezone=s.timezone)
    return FLOWS[spec.task].to_deployment(
        name=spec.name, schedules=[schedule], parameters={"spec": str(spec.path), "overrides": []},
        description=spec.description or f"tokenmill {spec.task} job {spec.path}", tags=["tokenmill", spec.task],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        entrypoint_type=EntrypointType.MODULE_PATH)


def main(args: argparse.Namespace) -> int:
    specs = load_all(select_files(args.specs))
    scheduled = [s for s in specs if s.schedule]
    for spec in specs:
        if not spec.schedule:
            print(f"{PROG}: {spec.path}: no schedule, not served (run it now with python -m flows.run {spec.path})",
                  file=sys.stderr)
    if not scheduled:
        raise JobSpecError("none of the job specs has a schedule; nothing to serve")
    for spec in scheduled:
        print(f"{PROG}: {spec.task}/{spec.name}: {spec.schedule.describe()}: {spec.command_line()}", file=sys.stderr)
    if args.check:
        return EXIT_OK
    url = server_url()
    slots = ensure_model_limit()
    from prefect import serve

    deployments = [deployment(s) for s in scheduled]
    print(f"{PROG}: serving {len(deployments)} deployment(s) on {url}; model runs take a slot of the global "
          f"concurrency limit tokenmill-model ({slots} slot{'s' if slots != 1 else ''}); Ctrl-C stops", file=sys.stderr)
    serve(*deployments)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run_cli(PROG, main, parser()))
