"""A model worker killed by SIGSEGV, as llama.cpp's AMX kernels killed it on this project's
AMX-reporting Xeons: the failed rows say so, and, where this CPU reports AMX, what to rebuild."""

from __future__ import annotations

import os
import signal

from tokenmill.models.base import GenerationRequest, ModelSettings
from tokenmill.models.machine import amx_cpu, crash_hint
from tokenmill.models.resolve import default_model_path
from tokenmill.pool import ModelWorker


def test_a_segfaulted_worker_fails_its_rows_with_the_cause(tmp_path):
    worker = ModelWorker(ModelSettings(model_path=str(default_model_path()), n_ctx=2048, n_seq=2, n_threads=1),
                         max_attempts=1)
    try:
        worker.start()
        for i in range(2):
            worker.submit(GenerationRequest(index=i, prompt="Count slowly from one to a thousand:", max_tokens=256))
        worker.end_input()
        os.kill(worker._proc.pid, signal.SIGSEGV)  # the rows are in flight: submitted, none can be done yet
        done = []
        while worker.in_flight:
            done += worker.poll()
    finally:
        worker.close()
    assert sorted(c.index for c in done) == [0, 1]
    for c in done:
        assert c.finish_reason == "error" and f"exit code {-signal.SIGSEGV}" in c.error, c.error
        assert ("Intel AMX" in c.error) == amx_cpu(), c.error
    assert crash_hint(-signal.SIGKILL) == ""  # only a segfault points at the build
