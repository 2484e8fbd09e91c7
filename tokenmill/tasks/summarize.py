"""Summarize: one text column in, a `summary` column out."""

from __future__ import annotations

from tokenmill.tasks.runner import Job, JobConfig, TaskSpec

SUMMARIZE = TaskSpec(name="summarize", output_column="summary", splits=True)


def prepare_summarize(config: JobConfig, create_out: bool = True) -> Job:
    """Open the input, check the model and the templates; nothing is generated yet."""
    return Job(config, SUMMARIZE, create_out=create_out)
