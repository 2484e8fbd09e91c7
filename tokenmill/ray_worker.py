"""The worker seam on a Ray cluster (`--runner ray`): rows go in batches to Prefect task runs that
Prefect's Ray task runner (`prefect-ray`, installed as `prefect[ray]`) runs on the cluster.

- The scheduler, the output folder, its index and the sink stay in the flow's process: only
  prompts travel to the cluster and only completions come back (Ray's object store), so a
  cluster run writes one output folder with the same row keys and resume as a local run.
- Each Ray worker process loads the model once, on its first batch, and keeps it for every
  later batch it runs (`_loaded`, a process-level cache).
- `--workers N` batches are in flight at once (each takes one Ray CPU), `n_seq` x 2 requests
  each, so the model batches rows inside each Ray worker.
- A batch whose Ray task fails (its worker process died) is sent again once; a request that
  fails twice comes back as that row's error, like a local worker that died twice.
- Prefect's API URL reaches the Ray workers as an environment variable of the job's Ray
  runtime environment, with the path of this tokenmill package (PYTHONPATH), so remote task
  runs report to the same Prefect server (see README, "Running on a Ray cluster").
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from tokenmill.errors import ModelError
from tokenmill.models import registry
from tokenmill.models.base import Completion, GenerationRequest, ModelSettings
from tokenmill.pool import _Worker

_loaded: dict = {}  # in a Ray worker process: settings key -> the loaded backend, kept across batches


def _settings_key(settings: ModelSettings) -> str:
    return json.dumps(dataclasses.asdict(settings), sort_keys=True, default=str)


def generate_batch(settings: ModelSettings, requests: list[GenerationRequest]) -> list[Completion]:
    """The body of a `generate-batch` task run on a Ray worker: the process's loaded model (loaded
    now if this is its first batch) generates every request."""
    key = _settings_key(settings)
    backend = _loaded.get(key)
    if backend is None:
        for old in _loaded.values():  # one model per process
            old.close()
        _loaded.clear()
        if not Path(settings.model_path).is_file():
            raise ModelError(f"this Ray node has no model file at {settings.model_path}: put it there, or on a "
                             "path every node shares")
        backend = _loaded[key] = registry.load(settings)
    return list(backend.generate(requests))


def ray_environment(api_url: str | None) -> dict:
    """The Ray runtime environment of a job: this tokenmill on PYTHONPATH, Prefect's API URL."""
    root = str(Path(__file__).resolve().parents[1])
    env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return {"env_vars": env}


def _prefect_api_url() -> str | None:
    """The URL Prefect's client in this process talks to: PREFECT_API_URL, else the temporary
    server's (which remote nodes cannot reach: see README)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    try:
        from prefect.server.api.server import SubprocessASGIServer

        return SubprocessASGIServer().api_url
    except Exception:  # no temporary server either: remote task runs will not report
        return None


class RayWorker(_Worker):
    """The worker interface over Prefect task runs on a Ray cluster."""

    def __init__(self, settings: ModelSettings, address: str | None, workers: int, batch: int):
        self.settings = settings
        self.address = address
        self.workers = max(1, workers)
        self.batch = max(1, batch)
        self.device = "unknown"
        self.restarts = 0
        self._runner = None
        self._task = None
        self._buffer: list[GenerationRequest] = []
        self._running: list[tuple[object, list[GenerationRequest]]] = []  # (future, its requests)
        self._tries: dict[int, int] = {}
        self._input_ended = False
        self.batches = 0

    @property
    def size(self) -> int:
        return self.workers

    @property
    def in_flight(self) -> int:
        return len(self._buffer) + sum(len(r) for _, r in self._running)

    @property
    def engine_stats(self) -> dict:
        return {}

    def start(self, wait: bool = True) -> str:
        """Connect to the cluster (or start a local one) through prefect-ray's task runner.
        Needs a Prefect flow run: the scheduler starts it on its first submit (`wait=False`, as
        the command line asks before Prefect starts, does nothing yet)."""
        if self._runner is None and wait:
            try:
                from prefect import task
                from prefect.cache_policies import NO_CACHE
                from prefect_ray import RayTaskRunner
            except ImportError:
                raise ModelError("--runner ray needs prefect-ray: pip install 'prefect[ray]' "
                                 "(or tokenmill's extra: pip install 'tokenmill[ray]')") from None
            init = {"runtime_env": ray_environment(_prefect_api_url()), "include_dashboard": False,
                    "log_to_driver": False}
            if not self.address:  # a local cluster: one CPU per worker, whose model threads share the cores
                init["num_cpus"] = self.workers
            self._runner = RayTaskRunner(address=self.address, init_kwargs=init)
            self._runner.__enter__()
            self._task = task(name="generate-batch", cache_policy=NO_CACHE)(generate_batch)
            where = self.address or "a local Ray cluster"
            self.device = f"ray: {self.workers} workers on {where}"
        return self.device

    def submit(self, request: GenerationRequest) -> None:
        self.start()
        self._buffer.append(request)
        if len(self._buffer) >= self.batch:
            self._dispatch()

    def end_input(self) -> None:
        self._input_ended = True

    def _dispatch(self) -> None:
        while self._buffer and len(self._running) < self.workers:
            requests, self._buffer = self._buffer[:self.batch], self._buffer[self.batch:]
            future = self._runner.submit(self._task, parameters={"settings": self.settings, "requests": requests})
            self._running.append((future, requests))
            self.batches += 1

    def poll(self, timeout: float = 0.5) -> list[Completion]:
        import ray

        self._dispatch()  # a part batch goes too: the scheduler waits for its rows
        done: list[Completion] = []
        if not self._running:
            return done
        refs = [future.wrapped_future for future, _ in self._running]
        ray.wait(refs, num_returns=1, timeout=timeout)  # until one is done, then take all that are
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for future, requests in [r for r in self._running if r[0].wrapped_future in ready]:
            self._running.remove((future, requests))
            try:
                done.extend(future.result())
            except Exception as exc:  # the Ray task failed: its worker process died, or the model did not load
                if isinstance(exc, ModelError):
                    raise
                self.restarts += 1
                for request in requests:
                    self._tries[request.index] = self._tries.get(request.index, 0) + 1
                    if self._tries[request.index] >= 2:
                        done.append(Completion(request.index, None, "error",
                                               f"the Ray task generating this row failed twice: {exc}"))
                    else:
                        self._buffer.append(request)
        self._dispatch()
        return done

    def close(self) -> None:
        if self._runner is not None:
            self._runner.__exit__(None, None, None)
            self._runner = None
