"""Job specs on the flows' side: a spec's job config, its checks before any model work, its run.

A spec (tokenmill.jobspec) stands for a command line; here that command line becomes the
command's own job config (`job_config(args)` of flows.summarize / extract / simulate), is checked
as the command would check it, and runs inside the current Prefect flow run.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from tokenmill.errors import InputError, TokenmillError
from tokenmill.io.readers import input_files
from tokenmill.jobspec import JobSpec

ROW_JOBS = {"summarize": "tokenmill.tasks.summarize:prepare_summarize",
            "extract": "tokenmill.tasks.extract:prepare_extract", "tag": "tokenmill.tasks.tag:prepare_tag",
            "batch": "tokenmill.tasks.batch:prepare_batch"}


def command(spec: JobSpec):
    return importlib.import_module(spec.module)


def job_config(spec: JobSpec) -> Any:
    """The JobConfig (row jobs) or SimConfig (simulate) the spec's command line gives."""
    try:
        return command(spec).job_config(spec.namespace())
    except TokenmillError as exc:
        raise spec.fail(str(exc)) from None


def _prepare(task: str):
    module, name = ROW_JOBS[task].split(":")
    return getattr(importlib.import_module(module), name)


def check(spec: JobSpec, waiting_ok: bool = False) -> str | None:
    """Everything the command checks before generating, without writing anything: options, schema,
    model, templates, input and its first row. With `waiting_ok`, a glob or folder with no file yet
    (a nightly job waiting for data) passes with a note, which is returned."""
    config = job_config(spec)
    if spec.task not in ROW_JOBS:
        return None  # simulate: job_config checked the simulation spec
    try:
        config.validate()
        try:
            input_files(config.input)
        except InputError:
            parent = Path(config.input).parent
            if waiting_ok and any(ch in config.input for ch in "*?[") and parent.is_dir():
                return f"{spec.path}: input {config.input} matches no file yet"
            raise
        _prepare(spec.task)(config, create_out=False)
    except TokenmillError as exc:
        raise spec.fail(str(exc)) from None
    return None


def run_in_flow(spec: JobSpec) -> dict:
    """Run the spec's job inside the current Prefect flow run (its tasks and artifacts belong to it)."""
    config = job_config(spec)
    if spec.task in ROW_JOBS:
        from flows._job import run_job

        return run_job(_prepare(spec.task), config, progress=False)
    from flows.simulate import simulate_flow

    return simulate_flow.fn(config, progress=False)
