"""Faults and interruptions on the real engine: Ctrl-C, kill -9, two runs, hung or dead workers; disk
full and a lock left by a dead process do not depend on the model: those run on the echo backend."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import REPO, run_echo, scitldr_rows

FAST = ["--max-tokens", "16", "--chunk-size", "2", "--part-rows", "2", "--no-cache", "--no-progress"]
# Runs that are killed or interrupted: short abstracts (a fifth of a full one's prefill, which is
# most of a row's time here) through 2 slots, so parts keep coming one after another instead of
# 16 rows finishing in the same decode step, and a kill after a part still lands mid-generation.
KILLABLE = [*FAST, "--n-seq", "2"]
WORDS = 40


def _env(prefect_server) -> dict:
    return {**os.environ, "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": prefect_server["home"]}


def _start(prefect_server, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.summarize", *args], cwd=REPO, env=_env(prefect_server),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended early (exit {proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the run")
        time.sleep(0.1)


def _parts(out: Path) -> list[Path]:
    return sorted((out / "parts").glob("*.parquet")) if (out / "parts").exists() else []


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _worker_pid(cli_pid: int) -> int | None:
    for child in _children(cli_pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "multiprocessing" in cmdline and "resource_tracker" not in cmdline:
            return child
    return None


def _finish(prefect_server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.summarize", *args], cwd=REPO, env=_env(prefect_server),
                          capture_output=True, text=True, timeout=600)


ROWS = 16


@pytest.fixture
def dataset(tmp_path) -> Path:
    path = tmp_path / "in.parquet"
    pl.DataFrame(scitldr_rows(ROWS)).write_parquet(path)
    return path


def _short_rows(path: Path, n: int = ROWS) -> Path:
    """n abstracts cut to their first WORDS words: what a kill test needs is rows, not long prompts."""
    rows = [{**r, "text": " ".join(r["text"].split()[:WORDS])} for r in scitldr_rows(n)]
    pl.DataFrame(rows).write_parquet(path)
    return path


@pytest.fixture
def short_dataset(tmp_path) -> Path:
    return _short_rows(tmp_path / "short.parquet")


WORKER_ROWS = 8  # a worker fault after the first part of 2 rows still finds 6 rows to retry


@pytest.fixture
def worker_dataset(tmp_path) -> Path:
    return _short_rows(tmp_path / "worker.parquet", WORKER_ROWS)


def _assert_complete(out: Path, rows: int) -> pl.DataFrame:
    results = pl.read_parquet(out / "results.parquet")
    assert results["row"].to_list() == list(range(rows))
    assert results["status"].to_list() == ["ok"] * rows
    return results


@pytest.fixture(scope="module")
def interrupted(prefect_server, tmp_path_factory) -> dict:
    """One run of the short rows, three faults in turn: a second run on its folder while it runs
    (refused), Ctrl-C once it has written parts of its own since (it stops, keeps them and says how
    to resume), then the same command again (it finishes)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    data, out = _short_rows(tmp / "short.parquet"), tmp / "out"
    first = _start(prefect_server, str(data), "--out", str(out), *KILLABLE)
    try:
        _wait_for(lambda: (out / ".tokenmill.lock").exists(), first)
        second = _finish(prefect_server, str(data), "--out", str(out), *KILLABLE)
        at_refusal = _rows_written(out)
        # the first run goes on: it writes rows after the refusal (else _wait_for fails: it ended early)
        _wait_for(lambda: len(_parts(out)) >= 2 and _rows_written(out) > at_refusal, first)
        sent = time.monotonic()
        os.killpg(first.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        _, stderr = first.communicate(timeout=60)
        stopped_s = time.monotonic() - sent
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    kept = _rows_written(out)
    again = _finish(prefect_server, str(data), "--out", str(out), *KILLABLE)
    return {"out": out, "first": first, "stderr": stderr, "second": second, "stopped_s": stopped_s, "kept": kept,
            "again": again}


def test_ctrl_c_stops_quickly_keeps_parts_and_says_how_to_resume(interrupted):
    run = interrupted
    assert run["stopped_s"] < 15
    assert run["first"].returncode == 130, run["stderr"]
    assert "Traceback" not in run["stderr"]
    assert "Run the same command again to continue" in run["stderr"].strip().splitlines()[-1]
    assert run["kept"] > 0, "finished parts must be kept"
    assert run["again"].returncode == 0, run["again"].stderr
    _assert_complete(run["out"], ROWS)
    assert pl.read_parquet(run["out"] / "usage.parquet")["rows_generated"][-1] <= ROWS - run["kept"]


def _rows_written(out: Path) -> int:
    return pl.concat([pl.read_parquet(p) for p in _parts(out)])["row"].n_unique() if _parts(out) else 0


def _new_rows(out: Path, before: int):
    """A part holding a row no earlier part held (a resumed run's parts also carry the rows it reused)."""
    return lambda: _rows_written(out) > before


def test_five_kills_in_a_row_lose_and_repeat_nothing(prefect_server, short_dataset, tmp_path):
    """kill -9 (the run and its worker) while it imports, while Prefect and the model start, and
    three times mid-generation, just after a part with newly generated rows is written; then the
    same command finishes."""
    out = tmp_path / "out"
    landed = []
    for when in (1.0, 3.0, "part", "part", "part"):
        proc = _start(prefect_server, str(short_dataset), "--out", str(out), *KILLABLE)
        if when == "part":
            _wait_for(_new_rows(out, _rows_written(out)), proc)
        else:
            time.sleep(when)
        assert proc.poll() is None, "the run ended before its kill"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        landed.append((when, _rows_written(out), (out / "results.parquet").exists()))
    # each mid-generation kill came after a part and before the end: more rows kept each time, no results yet
    mid = [rows for when, rows, finished in landed if when == "part" and not finished]
    assert len(mid) == 3 and mid == sorted(set(mid)) and mid[-1] < ROWS, landed
    final = _finish(prefect_server, str(short_dataset), "--out", str(out), *KILLABLE)
    assert final.returncode == 0, final.stderr
    results = _assert_complete(out, ROWS)
    assert results["row_key"].n_unique() == ROWS
    last = pl.read_parquet(out / "usage.parquet").row(-1, named=True)  # the run that finished reused what was kept
    assert last["rows_resumed"] >= mid[-1] and last["rows_generated"] == ROWS - last["rows_resumed"]


def test_a_second_run_on_the_same_folder_is_refused(interrupted):
    """The refused run changed nothing: the first went on writing rows (the fixture waits for them),
    its Ctrl-C and resume end with every row exactly once (the test above)."""
    second = interrupted["second"]
    assert second.returncode == 1, second.stderr
    line = second.stderr.strip().splitlines()[-1]
    assert "in use by another run" in line and str(interrupted["first"].pid) in line
    results = _assert_complete(interrupted["out"], ROWS)
    assert results["row_key"].n_unique() == ROWS


def test_a_lock_left_by_a_killed_run_does_not_block(dataset, tmp_path):
    """A process takes the folder's lock as a run does and is killed; the next run (the zero-cost
    backend, in this process: the lock does not depend on the model) takes the lock over."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tokenmill.ledger import OutputLock; "
                               "OutputLock(__import__('pathlib').Path(sys.argv[1])).acquire(); print('held', flush=True); "
                               "time.sleep(600)", str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    from tokenmill.errors import InputError

    with pytest.raises(InputError, match=f"in use by another run \\(pid {holder.pid}"):  # alive: refused
        run_echo("summarize", dataset, out, max_tokens=16, chunk_size=2)
    holder.kill()
    holder.wait()
    assert (out / ".tokenmill.lock").exists()
    run_echo("summarize", dataset, out, max_tokens=16, chunk_size=2)
    _assert_complete(out, ROWS)
    assert not (out / ".tokenmill.lock").exists()


def test_a_killed_worker_is_replaced_and_its_rows_retried(prefect_server, worker_dataset, tmp_path):
    out = tmp_path / "out"
    proc = _start(prefect_server, str(worker_dataset), "--out", str(out), *KILLABLE)
    _wait_for(lambda: len(_parts(out)) >= 1 and _worker_pid(proc.pid) is not None, proc)
    os.kill(_worker_pid(proc.pid), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    _assert_complete(out, WORKER_ROWS)
    assert pl.read_parquet(out / "usage.parquet")["worker_restarts"][-1] >= 1


def test_a_worker_does_not_outlive_its_killed_run(prefect_server, short_dataset, tmp_path):
    out = tmp_path / "out"
    proc = _start(prefect_server, str(short_dataset), "--out", str(out), "--max-tokens", "400", "--chunk-size", "1",
                  "--part-rows", "1",
                  "--n-seq", "2", "--no-cache", "--no-progress")
    # generating: a first row is written, so its rows are admitted and it reads no more requests
    _wait_for(lambda: len(_parts(out)) >= 1 and _worker_pid(proc.pid) is not None, proc)
    worker = _worker_pid(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # only the run itself, as a timeout or the OOM killer would
    proc.communicate(timeout=60)
    written = pl.concat([pl.read_parquet(p) for p in _parts(out)])["row"].n_unique()
    assert 1 <= written < ROWS and not (out / "results.parquet").exists()  # the kill landed mid-generation
    deadline = time.monotonic() + 20
    while Path(f"/proc/{worker}").exists() and "Z" not in Path(f"/proc/{worker}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the model worker kept running after its run was killed"
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever else the run started


def test_a_hung_worker_is_treated_like_a_dead_one(prefect_server, worker_dataset, tmp_path):
    out = tmp_path / "out"
    proc = _start(prefect_server, str(worker_dataset), "--out", str(out), "--worker-timeout", "3", *KILLABLE)
    _wait_for(lambda: len(_parts(out)) >= 1 and _worker_pid(proc.pid) is not None, proc)
    hung = _worker_pid(proc.pid)
    os.kill(hung, signal.SIGSTOP)  # alive but silent: no token ever comes
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    _assert_complete(out, WORKER_ROWS)
    assert pl.read_parquet(out / "usage.parquet")["worker_restarts"][-1] >= 1
    assert not Path(f"/proc/{hung}").exists() or "Z" in Path(f"/proc/{hung}/stat").read_text().split()[2]


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_stops_with_a_clear_error_and_readable_parts(prefect_server, tmp_path, tiny_disk):
    """The command on the zero-cost backend: what a full disk does to the output does not depend on the model."""
    rows = scitldr_rows(200)
    data = tmp_path / "in.parquet"
    pl.DataFrame(rows).write_parquet(data)
    out = tiny_disk / "out"
    result = _finish(prefect_server, str(data), "--out", str(out), "--max-tokens", "24", "--chunk-size", "2",
                     "--part-rows", "2", "--backend", "echo",
                     "--no-cache", "--no-progress")
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "No space left on device" in line and "run the same command again" in line
    assert "Traceback" not in result.stderr
    parts = _parts(out)
    assert parts, "some parts fit before the disk filled"
    for part in parts:
        assert pl.read_parquet(part).height > 0


def test_long_prompts_are_work_not_a_hang(tmp_path):
    """The batched engine reports after every decode, so minutes of prompt evaluation before a
    row's first token do not look like a silent worker (a 3 s hang limit here, rows that take
    longer than that to evaluate before any of them finishes). Decodes of 128 tokens keep each
    step well inside the limit."""
    from tokenmill.models.base import GenerationRequest, ModelSettings
    from tokenmill.models.resolve import default_model_path
    from tokenmill.pool import ModelWorker

    hang_s = 3
    texts = [r["text"] for r in scitldr_rows(48)]
    prompts = [" ".join(texts[i::4])[:4000] for i in range(4)]  # ~750 tokens each, no shared prefix
    worker = ModelWorker(ModelSettings(model_path=str(default_model_path()), n_ctx=1024 * 5, n_seq=4, n_batch=128),
                         hang_timeout_s=hang_s)
    done, first = [], None
    try:
        worker.start()
        started = time.monotonic()
        for completion in worker.run(GenerationRequest(index=i, prompt=p, max_tokens=4) for i, p in enumerate(prompts)):
            first = first or time.monotonic() - started
            done.append(completion)
    finally:
        worker.close()
    assert sorted(c.index for c in done) == [0, 1, 2, 3]
    assert all(c.finish_reason != "error" for c in done), [c.error for c in done]
    assert worker.restarts == 0
    print(f"4 prompts of {[c.prompt_tokens for c in done]} tokens, the first done after {first:.1f} s")
    # the premise: no row finished within the hang limit (on faster hardware, lengthen the prompts)
    assert first > hang_s, first
