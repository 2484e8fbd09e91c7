"""Shared fixtures: real datasets from ../shared, a real Prefect server, the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOKENMILL_SHARED", REPO.parent / "shared"))
DATASETS = SHARED / "datasets"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def scitldr_rows(n: int) -> list[dict]:
    """The first n SciTLDR dev abstracts as {paper_id, text, reference}."""
    path = DATASETS / "scitldr" / "dev.jsonl"
    if not path.exists():
        pytest.skip(f"shared dataset missing: {path}")
    rows = []
    with path.open() as fh:
        for line in fh:
            record = json.loads(line)
            rows.append({"paper_id": record["paper_id"], "text": " ".join(record["source"]),
                         "reference": record["target"][0]})
            if len(rows) == n:
                break
    return rows


@pytest.fixture(scope="session")
def scitldr_parquet(tmp_path_factory) -> Path:
    """10 SciTLDR abstracts converted to Parquet."""
    path = tmp_path_factory.mktemp("scitldr") / "scitldr10.parquet"
    pl.DataFrame(scitldr_rows(10)).write_parquet(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect API server on loopback for the whole session (started once, not per CLI call)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": ""}
    log = (home / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"prefect server did not start; see {home / 'server.log'}")
    yield {"url": url, "home": str(home)}
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="session")
def run_flow(prefect_server, tmp_path_factory):
    """Run `python -m flows.<name> ...` as a user would, against the session's Prefect server."""

    cache = tmp_path_factory.mktemp("cache")

    def run(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {**os.environ, "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": prefect_server["home"],
               "TOKENMILL_CACHE_DIR": str(cache)}
        return subprocess.run([sys.executable, "-m", f"flows.{name}", *args, "--no-progress"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def summarized_scitldr10(run_flow, scitldr_parquet, tmp_path_factory):
    """The 10 SciTLDR abstracts through `python -m flows.summarize` on the default model, generated
    (--no-cache), once a session: test_summarize's end-to-end checks, test_model_stores' reference
    for the other model stores and test_runtimes' reference for a server by URL. Returns (the
    CompletedProcess, the output folder)."""
    out = tmp_path_factory.mktemp("sum10") / "out"
    return run_flow("summarize", str(scitldr_parquet), "--out", str(out), "--max-tokens", "24", "--no-cache"), out


def processes_with_home(home) -> list[int]:
    """Pids of other processes whose environment sets PREFECT_HOME to `home` (a test's own
    Prefect home: the servers and commands it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if f"PREFECT_HOME={home}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def assert_one_line_error(result, *needles: str) -> str:
    """The command failed with exit 1 and a last stderr line `PROG: error: ...` holding every needle."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert ": error: " in line
    for needle in needles:
        assert needle in line, line
    return line


def run_echo(task: str, input_path, out, **config):
    """Run a job in this process on the zero-cost echo backend (no Prefect, no model weights,
    no worker process), for tests of orchestration; returns the run's RunStats. No shared
    results cache unless `cache_dir` is given."""
    from tokenmill.tasks.extract import prepare_extract
    from tokenmill.tasks.runner import JobConfig
    from tokenmill.tasks.summarize import prepare_summarize

    config.setdefault("cache", "cache_dir" in config)
    prepare = {"summarize": prepare_summarize, "extract": prepare_extract}[task]
    job = prepare(JobConfig(input=str(input_path), out=str(out), backend="echo", **config))
    return job.run(progress=False)


class _NotRefused(BaseException):
    """Raised where a command that should have been refused would start Prefect (a BaseException,
    so the command line's own error handling cannot turn it into a one-line error)."""


@pytest.fixture
def run_cli_here(capsys, monkeypatch, tmp_path_factory):
    """`python -m flows.<name> ARGS` in this process, for commands refused before any row: the
    same parser, checks and one-line errors, without a new interpreter. Should the command get as
    far as starting Prefect, the test fails (`_NotRefused`)."""
    import importlib

    from flows import _job
    from flows._cli import run_cli

    def not_refused():
        raise _NotRefused("the command was not refused before its rows: it went on to start Prefect")

    monkeypatch.setattr(_job, "_start_prefect_server", not_refused)
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path_factory.mktemp("cache-here")))

    def run(name: str, *args: str) -> subprocess.CompletedProcess:
        module = importlib.import_module(f"flows.{name}")
        prog = f"python -m flows.{name}"
        capsys.readouterr()
        try:
            code = run_cli(prog, module.main, module.parser(), [*args, "--no-progress"])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        captured = capsys.readouterr()
        return subprocess.CompletedProcess([prog, *args], code, captured.out, captured.err)

    return run
