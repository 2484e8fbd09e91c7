"""flows.deploy on a real Prefect server: served deployments, triggered runs, serialization, nightly globs.

One `prefect server start` on loopback (its own PREFECT_HOME, SQLite, a free port) and one
`python -m flows.deploy` serving two job specs for the whole module; runs are triggered with
run_deployment and run the real model on one to three rows of 8 tokens (four flow runs in all:
three triggered together, then the nightly glob's second night). Everything this module
starts carries its PREFECT_HOME in its environment, and teardown checks that nothing carrying
it is left running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest
import yaml

from tests.conftest import REPO, processes_with_home

ARTICLES = REPO / "data" / "articles.csv"
TINY = {"id_column": "id", "max_tokens": 8, "n_ctx": 1024, "no_cache": True}
PYTHONPATH = {"PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
NEVER = "0 0 1 1 *"  # schedules that do not fire while the tests run: runs come from run_deployment only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace: float = 30) -> bool:
    """Ctrl-C for a process started with start_new_session=True (SIGINT to its process group, as a
    terminal sends it); SIGKILL for the group only if it has not exited after `grace` seconds.
    Whether it exited on Ctrl-C."""
    for sig, wait in [(signal.SIGINT, grace), (signal.SIGKILL, 10)]:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
            return sig == signal.SIGINT
        except subprocess.TimeoutExpired:
            continue
    return False


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


def _wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _health(url: str):
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return True if response.status == 200 else None
    except OSError:
        return None


def _articles(ids: list[str]) -> pl.DataFrame:
    return pl.read_csv(ARTICLES).filter(pl.col("id").is_in(ids))


def _spec(folder: Path, name: str, data: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A Prefect server and a flows.deploy serving `nightly` (a glob) and `other`; all stopped afterwards."""
    home = tmp_path_factory.mktemp("prefect-home")
    ws = tmp_path_factory.mktemp("ws")
    (ws / "inbox").mkdir()
    _articles(["a01", "a02"]).write_csv(ws / "inbox" / "a.csv")
    _spec(ws, "nightly", {"task": "summarize", "input": "inbox/*.csv", "out": "out/nightly", **TINY,
                          "schedule": {"cron": NEVER, "timezone": "Europe/Berlin"}})
    _spec(ws, "other", {"task": "summarize", "input": str(ARTICLES), "limit": 2, "out": "out/other", **TINY,
                        "schedule": {"cron": NEVER}})
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **PYTHONPATH,
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": "",
           # a queued run asks again for its slot after at most 1 s (default 30 s): the waits are real, only shorter
           "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
           "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "1"}
    procs: list[subprocess.Popen] = []
    paused: dict[str, object] = {}
    stopped: dict[str, bool] = {}  # process -> whether it exited on Ctrl-C
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=(home / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        _wait_until(lambda: _health(url), 180, f"the Prefect server (see {home / 'server.log'})")
        client_env = {**env, "PREFECT_API_URL": url, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        serve_log = home / "serve.log"
        procs.append(subprocess.Popen([sys.executable, "-m", "flows.deploy", "nightly.yaml", "other.yaml"], cwd=ws,
                                      env=client_env, stdout=serve_log.open("w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        stack = {"url": url, "home": home, "ws": ws, "env": client_env, "serve_log": serve_log, "serve": procs[-1]}
        _wait_until(lambda: True if _deployment(stack, "summarize/other") else None, 180,
                    f"the served deployments (see {serve_log})")
        yield stack
        # the serve process first, as a user stops it: on Ctrl-C it pauses its schedules on the server
        stopped["flows.deploy"] = _stop(stack["serve"])
        paused = {name: getattr(_deployment(stack, name), "paused", None)
                  for name in ["summarize/nightly", "summarize/other"]}
    finally:
        for proc, name in reversed(list(zip(procs, ["prefect server", "flows.deploy"]))):
            if name not in stopped:
                stopped[name] = _stop(proc)
        deadline = time.monotonic() + 10  # the last children may take a moment to exit
        while (left := processes_with_home(str(home))) and time.monotonic() < deadline:
            time.sleep(0.5)
        described = {pid: _cmdline(pid) for pid in left}
        for pid in left:  # clean up before failing: e.g. a flow run or model worker the runner left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert described == {}, f"still running after Ctrl-C to the serve process and the server: {described}"
        assert all(stopped.values()), f"did not exit on Ctrl-C within 30 s: {stopped}"
        assert set(paused.values()) <= {True}, f"schedules still active after the serve process stopped: {paused}"


def _client(stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class Client:
        def __enter__(self):
            self.settings = temporary_settings({PREFECT_API_URL: stack["url"]})
            self.settings.__enter__()
            self.client = get_client(sync_client=True)
            return self.client.__enter__()

        def __exit__(self, *exc):
            self.client.__exit__(*exc)
            self.settings.__exit__(*exc)

    return Client()


def _deployment(stack, name: str):
    from prefect.exceptions import ObjectNotFound

    with _client(stack) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def _trigger(stack, name: str, overrides: list[str] | None = None, wait: bool = True):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack["url"]}):
        return run_deployment(name, parameters={"overrides": overrides or []}, timeout=600 if wait else 0,
                              poll_interval=1)


def _flow_run(stack, run_id):
    with _client(stack) as client:
        return client.read_flow_run(run_id)


def _states(stack, run_id) -> list[str]:
    with _client(stack) as client:
        return [s.name for s in client.read_flow_run_states(run_id)]


def _timeline(stack, run_ids) -> str:
    """Each flow run's states with their times, for failure messages."""
    lines = []
    with _client(stack) as client:
        for run_id in run_ids:
            states = client.read_flow_run_states(run_id)
            lines.append(f"{str(run_id)[:8]}: " + ", ".join(f"{s.name} {s.timestamp:%H:%M:%S.%f}"[:-3] for s in states))
    return "\n".join(lines)


def test_deployments_are_served_with_their_schedule_and_the_model_limit(stack):
    nightly = _deployment(stack, "summarize/nightly")
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == NEVER and schedule.schedule.timezone == "Europe/Berlin"
    assert nightly.parameters == {"spec": str(stack["ws"] / "nightly.yaml"), "overrides": []}
    assert nightly.global_concurrency_limit.limit == 1  # the deployment's own limit ...
    assert nightly.concurrency_options.collision_strategy.value == "ENQUEUE"  # ... which queues
    with _client(stack) as client:
        limit = client.read_global_concurrency_limit_by_name("tokenmill-model")
    assert limit.limit == 1 and limit.active


@pytest.fixture(scope="module")
def together(stack):
    """Three runs triggered at once: two of `nightly` (one into its own folder, the other into a second
    folder, so both have rows to generate) and one of `other`; their final flow runs once all are final."""
    ws = stack["ws"]
    runs = [_trigger(stack, "summarize/nightly", wait=False),
            _trigger(stack, "summarize/nightly", [f"out={ws / 'out' / 'n2'}"], wait=False),
            _trigger(stack, "summarize/other", ["limit=1"], wait=False)]
    return [_wait_until(lambda r=r: f if (f := _flow_run(stack, r.id)).state.is_final() else None, 600,
                        f"flow run {r.id}") for r in runs]


def test_a_triggered_run_completes_with_results_and_its_run_table_artifact(stack, together):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run = together[0]  # the first nightly run, into the spec's own folder
    assert run.state.is_completed(), (run.state, stack["serve_log"].read_text()[-3000:])
    out = stack["ws"] / "out" / "nightly"
    results = pl.read_parquet(out / "results.parquet")
    assert results["id"].to_list() == ["a01", "a02"] and results["status"].to_list() == ["ok", "ok"]
    assert (results["completion_tokens"] > 0).all()
    usage = pl.read_parquet(out / "usage.parquet")
    assert usage["run_id"].to_list() == [str(run.id)]
    with _client(stack) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    tables = [a for a in artifacts if a.type == "markdown"]
    assert [a.key for a in tables] == ["summarize-run"]
    assert "| rows_total | 2 |" in tables[0].data and "| rows_generated | 2 |" in tables[0].data


def test_nightly_glob_second_run_generates_only_the_new_files_rows(stack, together):
    out = stack["ws"] / "out" / "nightly"
    assert (out / "usage.parquet").exists(), "needs the first run (previous test)"
    _articles(["a03"]).write_csv(stack["ws"] / "inbox" / "b.csv")  # the new file of the night
    run = _trigger(stack, "summarize/nightly")
    assert run.state.is_completed(), run.state
    results = pl.read_parquet(out / "results.parquet")
    assert results["id"].to_list() == ["a01", "a02", "a03"] and set(results["status"]) == {"ok"}
    usage = pl.read_parquet(out / "usage.parquet")
    assert usage["run_id"].to_list()[-1] == str(run.id) and usage.height == 2
    first_run = usage["run_id"][0]  # the old file's rows are the first run's, the new file's row this run's
    assert results["run_id"].to_list() == [first_run, first_run, str(run.id)]
    last = usage.row(-1, named=True)
    assert (last["rows_generated"], last["rows_resumed"], last["rows_total"]) == (1, 2, 3)
    # the history of the deployment's runs, from the same folder
    stats = subprocess.run([sys.executable, "-m", "flows.stats", str(out), "--no-png"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert stats.returncode == 0, stats.stderr
    for run_id in usage["run_id"]:
        assert run_id[:8] in stats.stdout


def test_runs_triggered_together_run_one_after_the_other(stack, together):
    ws, final = stack["ws"], together
    timeline = _timeline(stack, [f.id for f in final])
    assert [f.state_type.value for f in final] == ["COMPLETED"] * 3, (timeline, stack["serve_log"].read_text()[-3000:])
    # one deployment: its runs do not overlap at all (the second waited for the deployment's slot)
    first, second = sorted(final[:2], key=lambda f: f.start_time)
    assert first.end_time <= second.start_time, timeline
    assert "AwaitingConcurrencySlot" in _states(stack, second.id), timeline
    # every model-heavy run: their model work does not overlap (the global limit tokenmill-model)
    spans = []
    for folder, rows in [("nightly", 2), ("n2", 2), ("other", 1)]:  # inbox/ held a.csv only then
        row = pl.read_parquet(ws / "out" / folder / "usage.parquet").row(0, named=True)
        assert row["rows_generated"] == rows, (folder, row)
        spans.append((row["started_at"], row["ended_at"]))
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, (spans, timeline)
    # ... although the run of the other deployment was running (as a flow run) alongside a nightly
    # run: it waited for the slot, the order was not luck
    other = final[2]
    assert any(max(other.start_time, f.start_time) < min(other.end_time, f.end_time) for f in final[:2]), timeline


def test_an_invalid_spec_fails_deploy_before_anything_is_served(stack):
    ws = stack["ws"]
    _spec(ws, "fine", {"task": "summarize", "input": str(ARTICLES), "name": "never-served",
                       "schedule": {"cron": NEVER}})
    bad = _spec(ws, "bad", {"task": "summarize", "input": str(ARTICLES), "max_token": 8,
                            "schedule": {"cron": NEVER}})
    result = subprocess.run([sys.executable, "-m", "flows.deploy", "fine.yaml", "bad.yaml"], cwd=ws,
                            env=stack["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("python -m flows.deploy: error: ") and str(bad) in line and "'max_token'" in line
    assert _deployment(stack, "summarize/never-served") is None


def test_deploy_without_a_server_says_how_to_start_one(tmp_path):
    spec = _spec(tmp_path, "j", {"task": "summarize", "input": str(ARTICLES), "schedule": {"cron": NEVER}})
    env = {**os.environ, "PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "home"), **PYTHONPATH}
    result = subprocess.run([sys.executable, "-m", "flows.deploy", str(spec)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert "prefect server start" in result.stderr.strip().splitlines()[-1]


def test_flows_run_runs_a_spec_now(stack):
    ws = stack["ws"]
    result = subprocess.run([sys.executable, "-m", "flows.run", str(ws / "other.yaml"), "--set", "limit=1",
                             "--set", f"out={ws / 'out' / 'now'}", "--no-progress"], cwd=REPO, env=stack["env"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "job other: python -m flows.summarize" in lines[0] and "--limit 1" in lines[0]
    assert "1 rows" in lines[-1] and str(ws / "out" / "now") in lines[-1]
    results = pl.read_parquet(ws / "out" / "now" / "results.parquet")
    assert results["id"].to_list() == ["a01"] and results["status"].to_list() == ["ok"]
    run_id = pl.read_parquet(ws / "out" / "now" / "usage.parquet")["run_id"][0]
    assert _flow_run(stack, run_id).state_type.value == "COMPLETED"  # a flow run on the configured server


def test_still_serving_after_every_run(stack):
    """No crash along the way; the fixture's teardown stops it and checks that nothing is left running."""
    assert stack["serve"].poll() is None, stack["serve_log"].read_text()[-3000:]
