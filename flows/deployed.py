"""The Prefect flows deployments run: one per task, each running a job spec file.

`python -m flows.deploy` serves them (one deployment per scheduled spec, parameters
`spec`: the file, `overrides`: KEY=VALUE items like flows.run's --set); `prefect.yaml` points
a work pool's deployments at them. Each run re-reads its spec (an edited spec applies from the
next run), waits for a slot of the global concurrency limit `tokenmill-model` (created by
flows.deploy: model-heavy runs on one machine never overlap; a run that finds the slot taken
waits, it does not fail), then runs the job as its command line would, inside this flow run:
its task runs, progress artifact and run-table artifact belong to the run, and it appends its
row to OUT/usage.parquet.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.concurrency.sync import concurrency

from flows._specs import run_in_flow
from tokenmill.jobspec import JobSpecError, load_job_spec

MODEL_LIMIT = "tokenmill-model"  # the global concurrency limit every model-heavy run takes one slot of


def run_spec(task: str, spec: str, overrides: list[str] | None) -> dict:
    job = load_job_spec(spec, overrides or [])
    if job.task != task:
        raise JobSpecError(f"job spec {job.path} is now a {job.task} job; this deployment runs {task} jobs: "
                           "run python -m flows.deploy again")
    log = get_run_logger()
    log.info("job %s: %s", job.name, job.command_line())
    log.info("waiting for a slot of the global concurrency limit %r", MODEL_LIMIT)
    with concurrency(MODEL_LIMIT, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        log.info("slot taken; running")
        result = run_in_flow(job)
    log.info("%s", result["summary"])
    return result


@flow(name="summarize", log_prints=False)
def summarize_job(spec: str, overrides: list[str] | None = None) -> dict:
    """Run the summarize job spec `spec` (a YAML file), with `overrides` (KEY=VALUE) applied."""
    return run_spec("summarize", spec, overrides)


@flow(name="extract", log_prints=False)
def extract_job(spec: str, overrides: list[str] | None = None) -> dict:
    """Run the extract job spec `spec` (a YAML file), with `overrides` (KEY=VALUE) applied."""
    return run_spec("extract", spec, overrides)


@flow(name="tag", log_prints=False)
def tag_job(spec: str, overrides: list[str] | None = None) -> dict:
    """Run the tag job spec `spec` (a YAML file), with `overrides` (KEY=VALUE) applied."""
    return run_spec("tag", spec, overrides)


@flow(name="simulate", log_prints=False)
def simulate_job(spec: str, overrides: list[str] | None = None) -> dict:
    """Run the simulate job spec `spec` (a YAML file), with `overrides` (KEY=VALUE) applied."""
    return run_spec("simulate", spec, overrides)


FLOWS = {"summarize": summarize_job, "extract": extract_job, "tag": tag_job, "simulate": simulate_job}
