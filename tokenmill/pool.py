"""Model workers in their own processes, so a llama.cpp abort kills a worker, never the run.

The parent keeps a window of requests in flight. When the worker dies or hangs, the rows
it held go back to the queue on a fresh worker; a row that was in flight at every death
fails alone with a clear error instead of killing the job.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections import deque
from typing import Iterable, Iterator

from tokenmill.errors import ModelError, TokenmillError
from tokenmill.models.base import Completion, GenerationRequest, ModelSettings

BACKENDS = ("llama", "llama-simple")


def make_backend(settings: ModelSettings):
    """Load the backend named by `settings.backend` (in the worker process)."""
    if settings.backend == "llama":
        from tokenmill.models.llama_batched import LlamaBatchedBackend

        return LlamaBatchedBackend(settings)
    if settings.backend == "llama-simple":
        from tokenmill.models.llama_simple import LlamaSimpleBackend

        return LlamaSimpleBackend(settings)
    raise ModelError(f"unknown backend {settings.backend!r}; choose one of: {', '.join(BACKENDS)}")


def _worker_main(settings: ModelSettings, requests: mp.Queue, results: mp.Queue) -> None:
    try:
        backend = make_backend(settings)
    except TokenmillError as exc:
        results.put(("load_error", str(exc)))
        return
    except Exception as exc:  # anything else the runtime throws while loading
        results.put(("load_error", f"{type(exc).__name__}: {exc}"))
        return
    results.put(("ready", backend.device()))

    def incoming() -> Iterator[GenerationRequest]:
        while (item := requests.get()) is not None:
            yield item

    for completion in backend.generate(incoming()):
        results.put(("done", completion))
    backend.close()
    results.put(("closed", None))


class ModelWorker:
    """One worker process holding one loaded model; restarted when it dies."""

    def __init__(self, settings: ModelSettings, hang_timeout_s: float = 300.0, max_attempts: int = 2,
                 load_timeout_s: float = 600.0):
        self.settings = settings
        self.hang_timeout_s = hang_timeout_s
        self.max_attempts = max_attempts
        self.load_timeout_s = load_timeout_s
        self.device = "unknown"
        self.restarts = 0
        self._ctx = mp.get_context("spawn")
        self._proc: mp.Process | None = None

    def start(self) -> str:
        """Start the process and wait until the model is loaded; returns the device description."""
        self._requests = self._ctx.Queue()
        self._results = self._ctx.Queue()
        self._proc = self._ctx.Process(
            target=_worker_main, args=(self.settings, self._requests, self._results), daemon=True,
            name="tokenmill-worker",
        )
        self._proc.start()
        deadline = time.monotonic() + self.load_timeout_s
        while time.monotonic() < deadline:
            try:
                kind, payload = self._results.get(timeout=0.5)
            except queue.Empty:
                if not self._proc.is_alive():
                    raise ModelError(
                        f"the model worker died while loading {self.settings.model_path} "
                        f"(exit code {self._proc.exitcode})"
                    ) from None
                continue
            if kind == "load_error":
                self._proc.join(5)
                raise ModelError(payload)
            self.device = payload
            return payload
        self.stop()
        raise ModelError(f"loading {self.settings.model_path} took longer than {self.load_timeout_s:.0f} s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._proc = None

    def run(self, requests: Iterable[GenerationRequest], window: int = 64) -> Iterator[Completion]:
        """Yield a Completion for every request, keeping up to `window` of them in flight."""
        if self._proc is None:
            self.start()
        source = iter(requests)
        retry: deque[GenerationRequest] = deque()
        pending: dict[int, GenerationRequest] = {}
        attempts: dict[int, int] = {}
        exhausted = ended = False
        last_message = time.monotonic()
        while True:
            while not ended and len(pending) < window:
                request = retry.popleft() if retry else (None if exhausted else next(source, None))
                if request is None:
                    exhausted = True
                    if not retry:
                        self._requests.put(None)  # lets the worker finish its last rows
                        ended = True
                    break
                pending[request.index] = request
                self._requests.put(request)
            if not pending:
                break
            try:
                kind, payload = self._results.get(timeout=0.5)
            except queue.Empty:
                hung = time.monotonic() - last_message > self.hang_timeout_s
                if self._proc is not None and self._proc.is_alive() and not hung:
                    continue
                yield from self._recover(pending, attempts, retry, hung)
                ended = False
                last_message = time.monotonic()
                continue
            last_message = time.monotonic()
            if kind == "done":
                pending.pop(payload.index, None)
                yield payload

    def _recover(self, pending: dict[int, GenerationRequest], attempts: dict[int, int],
                 retry: deque[GenerationRequest], hung: bool) -> Iterator[Completion]:
        """The worker died or hung: fail rows that have had enough tries, requeue the rest."""
        exitcode = self._proc.exitcode if self._proc is not None else None
        self.stop()
        self.restarts += 1
        cause = (f"the model worker produced nothing for {self.hang_timeout_s:.0f} s and was stopped" if hung
                 else f"the model worker died (exit code {exitcode})")
        for index, request in list(pending.items()):
            attempts[index] = attempts.get(index, 0) + 1
            if attempts[index] >= self.max_attempts:
                del pending[index]
                yield Completion(index, None, "error",
                                 f"{cause} while generating this row, {attempts[index]} times; "
                                 "the row may trigger a runtime bug")
            else:
                retry.append(request)
        pending.clear()
        self.start()

    def close(self) -> None:
        self.stop()
