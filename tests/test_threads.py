"""Thread counts that follow the machine: a worker whose thread count tokenmill chose drops a
thread while another program keeps a core busy, takes it back once it stops, and the text
stays what a fixed thread count gives. On the real embedded model, in this process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from tokenmill.models.base import GenerationRequest, ModelSettings  # noqa: E402
from tokenmill.models.llama_batched import LlamaBatchedBackend  # noqa: E402
from tokenmill.models.machine import CoreWatch, threads_beside  # noqa: E402
from tokenmill.models.resolve import default_model_path  # noqa: E402
from tests.test_batched_engine import summarize_prompt  # noqa: E402

TEXTS = ["Rivers carry sediment to the sea, where deltas grow as the current slows and drops it.",
         "The library opened a new wing for maps, with drawers sized for charts of the old harbour."]


def _requests() -> list[GenerationRequest]:
    return [GenerationRequest(index=i, prompt=summarize_prompt(t), max_tokens=16) for i, t in enumerate(TEXTS)]


def _texts(engine: LlamaBatchedBackend) -> dict[int, str]:
    return {c.index: c.text for c in engine.generate(_requests())}


def test_threads_beside_leaves_a_core_to_each_busy_program():
    cores = os.cpu_count() or 1
    assert threads_beside(0.0, cores) == cores
    assert threads_beside(0.3, cores) == cores  # a blip is not worth a thread
    assert threads_beside(1.0, cores) == max(1, cores - 1)
    assert threads_beside(cores + 3.0, cores) == 1  # never fewer than one
    assert threads_beside(0.0, 1) == 1  # never more than asked for


def test_core_watch_counts_other_processes_not_this_one():
    watch = CoreWatch()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # this process busy: not counted
        pass
    mine = watch.elsewhere()
    hog = subprocess.Popen([sys.executable, "-c", "import time\nend = time.monotonic() + 1.5\n"
                            "while time.monotonic() < end: pass"])
    try:
        time.sleep(1.0)
        theirs = watch.elsewhere()
    finally:
        hog.kill()
        hog.wait()
    assert theirs > mine and theirs > 0.5, (mine, theirs)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to have a thread to give up")
def test_a_busy_core_takes_a_thread_away_and_gives_it_back_with_the_same_text():
    path = str(default_model_path())
    fixed = LlamaBatchedBackend(ModelSettings(model_path=path, n_ctx=3 * 1024, n_seq=2, n_threads=2))
    try:
        expected = _texts(fixed)
    finally:
        fixed.close()
    engine = LlamaBatchedBackend(ModelSettings(model_path=path, n_ctx=3 * 1024, n_seq=2, n_threads=2,
                                               adapt_threads=True))
    try:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            busy = _texts(engine)
            threads_while_busy = engine.n_threads
        finally:
            hog.kill()
            hog.wait()
        time.sleep(0.5)
        quiet = _texts(engine)
        assert busy == expected and quiet == expected  # the thread count does not change the text
        assert threads_while_busy == 1
        assert engine.n_threads == 2 and engine.stats["thread_changes"] >= 2
        assert engine.device() == "cpu (2 threads)"
    finally:
        engine.close()
