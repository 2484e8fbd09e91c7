"""Prefect flows over the tokenmill engine; each has a `python -m flows.<name>` CLI."""

import os

# No network here for telemetry, and the temporary server may start slowly on a busy machine.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
