"""The worker pool (tokenmill/worker_pool.py) and the memory check (tokenmill/models/memory.py):
placement on GPUs as a pure function (there is no GPU here), routing by prompt prefix,
back-pressure and a whole job through a pool, on the zero-cost echo backend; the memory
check refusing an absurd context before any model loads."""

from __future__ import annotations

import itertools
import time

import polars as pl
import pytest

from tests.conftest import run_echo
from tokenmill.errors import ModelError
from tokenmill.models.base import GenerationRequest, ModelSettings
from tokenmill.models.memory import available_ram, check_fits, memory_need
from tokenmill.pool import InProcessWorker, ModelWorker, Worker
from tokenmill.worker_pool import WorkerPool, make_workers, plan_workers, visible_gpus


def test_visible_gpus_reads_cuda_visible_devices_and_needs_nvidia_smi_otherwise():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,2"}) == ["0", "2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,3"}) == ["1"]  # CUDA stops at an invalid id
    assert visible_gpus({}, nvidia_smi="no-such-nvidia-smi-here") == []


def test_one_worker_per_gpu_pinned_else_one_worker_with_every_core():
    two = plan_workers(0, ["0", "3"], threads=16)
    assert [(p.gpu, p.main_gpu, p.env) for p in two] == [("0", 0, {"CUDA_VISIBLE_DEVICES": "0"}),
                                                          ("3", 0, {"CUDA_VISIBLE_DEVICES": "3"})]
    assert [p.threads for p in two] == [8, 8]  # the cores shared out
    cpu = plan_workers(0, [], threads=16)
    assert [(p.gpu, p.threads, p.env) for p in cpu] == [(None, 16, {})]
    assert len(plan_workers(0, ["0", "1"], threads=4, n_gpu_layers=0)) == 1  # nothing offloaded: one CPU worker
    three = plan_workers(3, ["0", "1"], threads=6, threads_given=True)  # --workers beyond the GPUs: round-robin
    assert [p.gpu for p in three] == ["0", "1", "0"] and [p.threads for p in three] == [6, 6, 6]
    assert [p.threads for p in plan_workers(4, [], threads=2)] == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        plan_workers(-1, [], threads=2)


def test_make_workers_builds_pinned_process_workers_without_starting_them():
    settings = ModelSettings(model_path="model.gguf", n_threads=8, n_seq=4)
    pool = make_workers(settings, 0, gpus=["5", "6"])
    assert isinstance(pool, WorkerPool) and isinstance(pool, Worker) and pool.size == 2
    assert [(w.env, w.settings.main_gpu, w.settings.n_threads) for w in pool.workers] == [
        ({"CUDA_VISIBLE_DEVICES": "5"}, 0, 4), ({"CUDA_VISIBLE_DEVICES": "6"}, 0, 4)]
    single = make_workers(settings, 0, gpus=[])
    assert isinstance(single, ModelWorker) and single.env == {} and single.settings.n_threads == 8
    assert isinstance(make_workers(ModelSettings(model_path="m", backend="echo"), 1), InProcessWorker)


def _request(index: int, prefix: str, session: str | None = None) -> GenerationRequest:
    return GenerationRequest(index=index, prompt=prefix * 300 + f" row {index}", max_tokens=4, session=session)


class _Slow(InProcessWorker):
    """An echo worker that answers nothing until released, so loads stay as routed."""

    hold = True

    def poll(self, timeout: float = 0.5):
        return [] if self.hold else super().poll(timeout)


def _echo_pool(n: int, capacity: int, worker=InProcessWorker) -> WorkerPool:
    return WorkerPool([worker(ModelSettings(model_path="m", backend="echo")) for _ in range(n)], capacity)


def test_rows_sharing_a_prefix_stay_on_one_worker_until_it_is_full():
    pool = _echo_pool(3, capacity=4, worker=_Slow)
    for i in range(4):
        pool.submit(_request(i, "A"))
    assert [w.in_flight for w in pool.workers] == [4, 0, 0]  # one prefix, one worker while it has room
    pool.submit(_request(4, "B"))
    assert [w.in_flight for w in pool.workers] == [4, 1, 0]  # a new prefix goes to the least loaded
    pool.submit(_request(5, "A"))  # the holder of A is full: A spills to the least loaded and is held there too
    assert [w.in_flight for w in pool.workers] == [4, 1, 1]
    pool.submit(_request(6, "A"))
    assert [w.in_flight for w in pool.workers] == [4, 1, 2]
    pool.submit(_request(7, "B", session="s1"))
    pool.submit(_request(8, "C", session="s1"))  # a session's requests go where the session went
    assert pool._owner[7] == pool._owner[8]


def test_pool_answers_every_request_once_and_keeps_the_input_streaming():
    pool = _echo_pool(3, capacity=2)
    pulled = [0]

    def endless():
        for i in itertools.count():
            pulled[0] += 1
            yield _request(i, "ABCD"[i % 4])

    seen = []
    for completion in pool.run(endless(), window=8):
        seen.append(completion.index)
        assert pulled[0] - len(seen) <= 8  # never more than the window read ahead
        if len(seen) == 200:
            break
    assert sorted(seen) == list(range(200)) and min(pool.routed) > 0
    pool.close()


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("pool") / "in.parquet"
    pl.DataFrame({"text": [f"text number {i} about {['cats', 'dogs', 'fish'][i % 3]}." for i in range(300)]}
                 ).write_parquet(path)
    return path


def test_a_job_through_a_pool_gives_the_same_rows_as_one_worker(rows, tmp_path):
    one = run_echo("summarize", rows, tmp_path / "one", max_tokens=8, chunk_size=16)
    three = run_echo("summarize", rows, tmp_path / "three", max_tokens=8, chunk_size=16, workers=3)
    a, b = (pl.read_parquet(tmp_path / d / "results.parquet") for d in ("one", "three"))
    assert three.rows_ok == one.rows_ok == 300
    assert b["row"].to_list() == list(range(300))
    assert a.select("row", "row_key", "summary").equals(b.select("row", "row_key", "summary"))
    assert three.device.startswith("3 workers")


def test_memory_need_counts_weights_once_on_cpu_and_kv_per_worker():
    need = memory_need(weights=1 << 30, kv_bytes_per_token=1000, cells=1_000_000, workers=2, gpus=[None, None],
                       n_gpu_layers=-1, n_layers=30)
    assert need.gpus == {} and need.ram == int(((1 << 30) + 2 * 1000 * 1_000_000) * 1.1)
    gpu = memory_need(1 << 30, 1000, 1_000_000, 3, ["0", "1", "0"], n_gpu_layers=15, n_layers=30)
    assert gpu.gpus == {"0": 2, "1": 1} and gpu.gpu_fraction == 0.5
    with pytest.raises(ModelError, match=r"GPU 0: .*fewer --n-gpu-layers"):
        check_fits(gpu, 4096, 16, ram=1 << 40, vram={"0": 2 << 30, "1": 1 << 40})
    check_fits(gpu, 4096, 16, ram=1 << 40, vram={})  # unknown free memory: no check
    assert available_ram() > 0


def test_an_absurd_context_is_refused_before_any_model_loads(run_cli_here, scitldr_parquet, tmp_path):
    started = time.monotonic()
    result = run_cli_here("summarize", str(scitldr_parquet), "--out", str(tmp_path / "o"), "--n-ctx", "4000000",
                             "--n-seq", "64", "--workers", "2", "--no-cache")
    code, err = result.returncode, result.stderr
    err = err.strip().splitlines()[-1]  # (llama.cpp's C code may log to fd 2 while the tokenizer loads)
    assert code == 1 and err.startswith("python -m flows.summarize: error: not enough memory"), err and "--n-ctx 4000000 x --n-seq 64" in err
    assert "smaller --n-ctx, fewer --n-seq, fewer --workers" in err
    assert time.monotonic() - started < 15
