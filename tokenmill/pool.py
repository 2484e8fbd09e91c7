"""Model workers in their own processes, so a llama.cpp abort kills a worker, never the run.

The caller submits requests and polls for completions. When the worker dies or hangs, the
rows it held go back to a fresh worker; a row that was in flight at `max_attempts` deaths
fails alone with a clear error instead of killing the job.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from collections import deque
from typing import Iterable, Iterator, Protocol, runtime_checkable

from tokenmill.errors import ModelError, TokenmillError
from tokenmill.models import registry
from tokenmill.models.base import Completion, GenerationRequest, ModelSettings
from tokenmill.models.machine import crash_hint


def die_with_parent() -> None:
    """Linux: have the kernel kill this worker when its parent dies (even by SIGKILL), so a
    killed run leaves no model worker behind using the CPU."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's normal exit still ends daemon workers
        pass


def _worker_main(settings: ModelSettings, requests: mp.Queue, results: mp.Queue, parent: int) -> None:
    import signal

    # Ctrl-C reaches the whole process group: the parent stops its workers itself (and keeps
    # their finished rows), so a worker neither dies mid-row nor prints a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        return
    try:
        backend = registry.load(settings)
    except TokenmillError as exc:
        results.put(("load_error", str(exc)))
        return
    except Exception as exc:  # anything else the runtime throws while loading
        results.put(("load_error", f"{type(exc).__name__}: {exc}"))
        return
    results.put(("ready", backend.device()))
    last_beat = 0.0

    def heartbeat() -> None:
        nonlocal last_beat
        now = time.monotonic()
        if now - last_beat >= 1.0:
            last_beat = now
            results.put(("alive", dict(backend.stats)))

    backend.on_step = heartbeat

    polls = backend.polls_input

    def incoming() -> Iterator[GenerationRequest | None]:
        # The parent sends None when its input has ended. A backend that runs many rows at once
        # must not block here while its rows could be decoding (a row may need more calls
        # after this one finishes: a long document's combining step), so it gets None for
        # "nothing now"; a one-row-at-a-time backend simply waits.
        while True:
            try:
                item = requests.get_nowait() if polls else requests.get()
            except queue.Empty:
                yield None
                continue
            if item is None:
                return
            yield item

    for completion in backend.generate(incoming()):
        results.put(("done", completion))
    results.put(("closed", dict(backend.stats)))
    backend.close()


@runtime_checkable
class Worker(Protocol):
    """The worker seam: what the scheduler drives. Implementations: ModelWorker (a process),
    InProcessWorker (echo, HTTP clients), tokenmill.worker_pool.WorkerPool (N of them)."""

    device: str
    restarts: int

    @property
    def in_flight(self) -> int: ...

    @property
    def engine_stats(self) -> dict: ...

    def start(self, wait: bool = True) -> str: ...

    def submit(self, request: GenerationRequest) -> None: ...

    def end_input(self) -> None: ...

    def poll(self, timeout: float = 0.5) -> list[Completion]: ...

    def close(self) -> None: ...


_ENV_LOCK = threading.Lock()  # a worker's environment is set around its process start


class _Worker:
    """What the runner drives: submit requests, poll for completions, end the input, close."""

    _input_ended = False
    in_flight: int

    def submit(self, request: GenerationRequest) -> None: ...

    def end_input(self) -> None: ...

    def poll(self, timeout: float = 0.5) -> list[Completion]: ...

    def run(self, requests: Iterable[GenerationRequest], window: int = 64) -> Iterator[Completion]:
        """Convenience: a Completion for every request, keeping up to `window` in flight."""
        source = iter(requests)
        while True:
            while not self._input_ended and self.in_flight < window:
                request = next(source, None)
                if request is None:
                    self.end_input()
                else:
                    self.submit(request)
            if not self.in_flight:
                return
            yield from self.poll()


class ModelWorker(_Worker):
    """One worker process holding one loaded model; restarted when it dies or hangs."""

    def __init__(self, settings: ModelSettings, hang_timeout_s: float = 300.0, max_attempts: int = 2,
                 load_timeout_s: float = 600.0, env: dict[str, str] | None = None):
        self.settings = settings
        self.env = dict(env or {})  # set in the worker process only (CUDA_VISIBLE_DEVICES: its GPU)
        self.hang_timeout_s = hang_timeout_s
        self.max_attempts = max_attempts
        self.load_timeout_s = load_timeout_s
        self.device = "unknown"
        self.restarts = 0
        self._ctx = mp.get_context("spawn")
        self._proc: mp.Process | None = None
        self._pending: dict[int, GenerationRequest] = {}
        self._attempts: dict[int, int] = {}
        self._failed: deque[Completion] = deque()
        self._input_ended = False
        self._last_message = time.monotonic()
        self._live_stats: dict = {}
        self._dead_stats: dict = {}
        self._ready = False
        self._started_at = 0.0

    @property
    def in_flight(self) -> int:
        return len(self._pending) + len(self._failed)

    def start(self, wait: bool = True) -> str:
        """Start the process; with `wait`, wait until the model is loaded and return the device
        description. Without, the model loads while the caller does other work: the first
        `submit` waits for it (and raises the load error, if any)."""
        self._requests = self._ctx.Queue()
        self._results = self._ctx.Queue()
        self._ready = False
        self._proc = self._ctx.Process(target=_worker_main,
                                       args=(self.settings, self._requests, self._results, os.getpid()),
                                       daemon=True, name="tokenmill-worker")
        with _ENV_LOCK:  # a spawned process starts with this process's environment, as it is now
            saved = {key: os.environ.get(key) for key in self.env}
            os.environ.update(self.env)
            try:
                self._proc.start()
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
        self._started_at = time.monotonic()
        return self.wait_ready() if wait else "loading"

    def wait_ready(self) -> str:
        """Block until the started worker has loaded its model; raises ModelError if it cannot."""
        deadline = self._started_at + self.load_timeout_s
        while not self._ready and time.monotonic() < deadline:
            try:
                kind, payload = self._results.get(timeout=0.5)
            except queue.Empty:
                if not self._proc.is_alive():
                    code, self._proc = self._proc.exitcode, None
                    raise ModelError(f"the model worker died while loading {self.settings.model_path} "
                                     f"(exit code {code}){crash_hint(code)}") from None
                continue
            if kind == "load_error":
                self._proc.join(5)
                self._proc = None
                raise ModelError(payload)
            self.device, self._ready = payload, True
            self._last_message = time.monotonic()
        if not self._ready:
            self.stop()
            raise ModelError(f"loading {self.settings.model_path} took longer than {self.load_timeout_s:.0f} s")
        return self.device

    def submit(self, request: GenerationRequest) -> None:
        if self._proc is None:
            self.start()
        elif not self._ready:
            self.wait_ready()
        self._pending[request.index] = request
        self._requests.put(request)

    def end_input(self) -> None:
        """No more requests: let the worker finish its last rows instead of waiting for more."""
        self._input_ended = True
        if self._proc is not None:
            self._requests.put(None)

    def poll(self, timeout: float = 0.5) -> list[Completion]:
        """Completions that arrived within `timeout` (all that are ready, at least one if any)."""
        done = list(self._failed)
        self._failed.clear()
        if not self._pending:
            return done
        items = []
        try:
            items.append(self._results.get(timeout=timeout))
            while True:
                items.append(self._results.get_nowait())
        except queue.Empty:
            pass
        if not items:
            hung = time.monotonic() - self._last_message > self.hang_timeout_s
            if self._proc is None or not self._proc.is_alive() or hung:
                self._recover(hung)
                done.extend(self._failed)
                self._failed.clear()
            return done
        self._last_message = time.monotonic()
        for kind, payload in items:
            if kind == "done" and self._pending.pop(payload.index, None) is not None:
                done.append(payload)
            elif kind in ("alive", "closed") and payload:
                self._live_stats = payload
        return done

    @property
    def engine_stats(self) -> dict:
        """The backends' own counters (decode seconds per phase, tokens), summed over restarts."""
        total = dict(self._dead_stats)
        for key, value in self._live_stats.items():
            total[key] = total.get(key, 0) + value
        return total

    def _wait_closed(self, timeout: float = 5.0) -> None:
        """After end_input: let the worker report its final counters before it is stopped."""
        deadline = time.monotonic() + timeout
        while self._proc is not None and self._proc.is_alive() and time.monotonic() < deadline:
            try:
                kind, payload = self._results.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == "closed":
                self._live_stats = payload or self._live_stats
                return

    def _recover(self, hung: bool) -> None:
        """The worker died or hung: fail rows that have had enough tries, resend the rest."""
        exitcode = self._proc.exitcode if self._proc is not None else None
        self.stop()
        self.restarts += 1
        for key, value in self._live_stats.items():
            self._dead_stats[key] = self._dead_stats.get(key, 0) + value
        self._live_stats = {}
        cause = (f"the model worker produced nothing for {self.hang_timeout_s:.0f} s and was stopped" if hung
                 else f"the model worker died (exit code {exitcode})")
        hint = "" if hung else crash_hint(exitcode)
        retry = []
        for index, request in self._pending.items():
            self._attempts[index] = self._attempts.get(index, 0) + 1
            if self._attempts[index] >= self.max_attempts:
                times = self._attempts[index]
                self._failed.append(Completion(index, None, "error", f"{cause} while generating this row, {times} "
                                               f"time{'s' if times > 1 else ''}; the row may trigger a runtime bug{hint}"))
            else:
                retry.append(request)
        self._pending.clear()
        if retry or not self._input_ended:
            self.start()
            for request in retry:
                self.submit(request)
            if self._input_ended:
                self._requests.put(None)

    def stop(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
        if self._proc is not None:
            self._proc.join(5)
            # requests the dead process never read must not keep this process from exiting
            self._requests.cancel_join_thread()
        self._proc = None

    def close(self) -> None:
        if self._input_ended and not self._pending:
            self._wait_closed()
        self.stop()


class InProcessWorker(_Worker):
    """The worker interface for a backend cheap enough to run in the caller's process (echo):
    no process to start, nothing to restart; a request is answered when it is polled."""

    restarts = 0

    def __init__(self, settings: ModelSettings, tokenizer=None):
        self.settings = settings
        self.tokenizer = tokenizer
        self.device = "unknown"
        self._backend = None
        self._queue: deque[GenerationRequest] = deque()
        self._input_ended = False

    @property
    def in_flight(self) -> int:
        return len(self._queue)

    def start(self, wait: bool = True) -> str:
        if self._backend is None:
            self._backend = registry.load(self.settings, self.tokenizer)
            self.device = self._backend.device()
        return self.device

    def submit(self, request: GenerationRequest) -> None:
        self.start()
        self._queue.append(request)

    def end_input(self) -> None:
        self._input_ended = True

    def poll(self, timeout: float = 0.5) -> list[Completion]:
        requests = list(self._queue)
        self._queue.clear()
        return list(self._backend.generate(requests)) if requests else []

    @property
    def engine_stats(self) -> dict:
        return dict(self._backend.stats) if self._backend is not None else {}

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

