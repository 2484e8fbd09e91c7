"""A pool of model workers on one machine: one per visible GPU, each pinned to its device,
or one that uses every core; `--workers N` overrides.

- Placement (`plan_workers`) is a pure function of the requested count, the visible GPUs and
  the cores, so it is tested without a GPU. A GPU worker sees only its own device
  (`CUDA_VISIBLE_DEVICES` in its process, `main_gpu` 0 there).
- Each worker is a `ModelWorker` (tokenmill/pool.py): its own process, the model loaded once for
  the whole run, restarted when it dies or hangs, its in-flight rows sent again to the new
  process (so every row ends exactly once).
- Routing keeps prefix reuse paying: requests whose prompts start alike (the first
  `PREFIX_CHARS` characters: chat header, system prompt and the task's instructions) go to a
  worker that already holds that prefix, unless it is full (`capacity` requests in flight), when
  the least-loaded worker takes the request and holds the prefix from then on. A request of a
  session always goes where its session went.
- Back-pressure: the pool never queues by itself. The scheduler admits rows only while
  `in_flight` is below its window (per worker x workers), so rows stream from the input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import time
from collections import OrderedDict
from dataclasses import dataclass

from tokenmill.models import registry
from tokenmill.models.base import Completion, GenerationRequest, ModelSettings
from tokenmill.pool import InProcessWorker, ModelWorker, Worker, _Worker

PREFIX_CHARS = 256  # the start of a prompt that decides its prefix group
MAX_PREFIX_GROUPS = 4096  # prefix groups remembered (least recently used forgotten), so memory stays bounded
POLL_SLICE_S = 0.02  # how long the pool waits on one worker before looking at the next


@dataclass(frozen=True)
class Placement:
    """Where one worker runs: its GPU (None: CPU), llama.cpp's main_gpu inside its process, its
    CPU threads, and the environment its process starts with."""

    gpu: str | None
    main_gpu: int
    threads: int
    env: dict


def visible_gpus(env: dict | None = None, nvidia_smi: str | None = "nvidia-smi") -> list[str]:
    """The GPU ids this process may use: `CUDA_VISIBLE_DEVICES` when set ("" or -1: none), else
    the GPUs `nvidia-smi -L` lists; none when there is no nvidia-smi."""
    env = os.environ if env is None else env
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = []
        for item in (x.strip() for x in listed.split(",")):
            if not item or item.startswith("-"):  # CUDA ignores this id and every one after it
                break
            ids.append(item)
        return ids
    if not nvidia_smi or shutil.which(nvidia_smi) is None:
        return []
    try:
        lines = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(x for x in lines if x.startswith("GPU "))]


def plan_workers(requested: int, gpus: list[str], threads: int, threads_given: bool = False,
                 n_gpu_layers: int = -1) -> list[Placement]:
    """Where each worker runs. `requested` 0: one per GPU (when layers are offloaded), else one.
    `threads`: the CPU threads a single worker would use; without `threads_given` (--threads)
    they are shared out among the workers (0, the backend's own default, stays 0). Workers beyond the GPU count share GPUs round-robin."""
    if requested < 0:
        raise ValueError(f"--workers must be 0 (automatic) or more, got {requested}")
    on_gpu = bool(gpus) and n_gpu_layers != 0
    count = requested or (len(gpus) if on_gpu else 1)
    each = threads if threads_given or count == 1 or threads <= 0 else max(1, threads // count)
    if not on_gpu:
        return [Placement(None, 0, each, {}) for _ in range(count)]
    return [Placement(gpus[i % len(gpus)], 0, each, {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]})
            for i in range(count)]


def prefix_key(request: GenerationRequest) -> str:
    """The routing key of a request: its session, else the start of its prompt."""
    if request.session is not None:
        return "session:" + request.session
    return hashlib.blake2b(request.prompt[:PREFIX_CHARS].encode("utf-8"), digest_size=8).hexdigest()


class WorkerPool(_Worker):
    """N workers behind the one worker interface (tokenmill.pool.Worker)."""

    def __init__(self, workers: list[Worker], capacity: int = 32):
        if not workers:
            raise ValueError("a worker pool needs at least one worker")
        self.workers = workers
        self.capacity = capacity  # requests in flight on one worker before its prefix group spills over
        self.device = "unknown"
        self._owner: dict[int, int] = {}  # request index -> the worker it went to
        self._holders: OrderedDict[str, list[int]] = OrderedDict()  # prefix key -> workers holding it
        self._input_ended = False
        self.routed = [0] * len(workers)  # requests each worker was given

    @property
    def size(self) -> int:
        return len(self.workers)

    @property
    def in_flight(self) -> int:
        return sum(w.in_flight for w in self.workers)

    @property
    def restarts(self) -> int:
        return sum(w.restarts for w in self.workers)

    @property
    def engine_stats(self) -> dict:
        total: dict = {}
        for worker in self.workers:
            for key, value in worker.engine_stats.items():
                total[key] = total.get(key, 0) + value
        return total

    def start(self, wait: bool = True) -> str:
        """Start every worker's process at once (models load in parallel); with `wait`, wait for
        all of them and return the devices."""
        for worker in self.workers:
            worker.start(wait=False)
        if not wait:
            return "loading"
        return self._describe([w.wait_ready() if hasattr(w, "wait_ready") else w.start() for w in self.workers])

    def _describe(self, devices: list[str]) -> str:
        distinct = list(dict.fromkeys(devices))
        self.device = f"{len(devices)} workers: " + "; ".join(distinct)
        return self.device

    def route(self, request: GenerationRequest) -> int:
        """The worker for `request`: one holding its prefix unless full, else the least loaded."""
        key = prefix_key(request)
        holders = self._holders.get(key)
        if holders is None:
            holders = self._holders[key] = []
            if len(self._holders) > MAX_PREFIX_GROUPS:
                self._holders.popitem(last=False)
        else:
            self._holders.move_to_end(key)
        loads = [w.in_flight for w in self.workers]
        if holders and request.session is not None:
            return holders[0]
        best = min(holders, key=lambda i: loads[i]) if holders else None
        if best is not None and loads[best] < self.capacity:
            return best
        least = min(range(len(loads)), key=lambda i: loads[i])
        if best is not None and loads[best] <= loads[least]:
            return best
        holders.append(least)
        return least

    def submit(self, request: GenerationRequest) -> None:
        chosen = self.route(request)
        self._owner[request.index] = chosen
        self.routed[chosen] += 1
        self.workers[chosen].submit(request)

    def end_input(self) -> None:
        self._input_ended = True
        for worker in self.workers:
            worker.end_input()

    def poll(self, timeout: float = 0.5) -> list[Completion]:
        """Completions from any worker within `timeout` (all that are ready, at least one if any)."""
        deadline = time.monotonic() + timeout
        while True:
            done: list[Completion] = []
            for worker in self.workers:
                if worker.in_flight:
                    done.extend(worker.poll(timeout=min(POLL_SLICE_S, max(0.0, deadline - time.monotonic()))))
            if done or not self.in_flight or time.monotonic() >= deadline:
                for completion in done:
                    self._owner.pop(completion.index, None)
                if self.device == "unknown" and all(w.device != "unknown" for w in self.workers):
                    self._describe([w.device for w in self.workers])
                return done

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        if all(w.device != "unknown" for w in self.workers):
            self._describe([w.device for w in self.workers])


def make_workers(settings: ModelSettings, workers: int = 0, hang_timeout_s: float = 300.0, tokenizer=None,
                 threads_given: bool = False, gpus: list[str] | None = None, capacity: int = 32) -> Worker:
    """The worker(s) for a run: one worker when one is wanted (today's process worker, or the
    in-process one for a backend that allows it), else a WorkerPool placed by `plan_workers`.
    `gpus`: the visible GPUs (default: detected)."""
    if registry.get(settings.backend).in_process:
        if workers <= 1:
            return InProcessWorker(settings, tokenizer)
        return WorkerPool([InProcessWorker(settings, tokenizer) for _ in range(workers)], capacity)
    placements = plan_workers(workers, visible_gpus() if gpus is None else gpus, settings.n_threads,
                              threads_given, settings.n_gpu_layers)
    made = [ModelWorker(dataclasses.replace(settings, main_gpu=p.main_gpu, n_threads=p.threads),
                        hang_timeout_s=hang_timeout_s, env=p.env) for p in placements]
    return made[0] if len(made) == 1 else WorkerPool(made, capacity)
