"""What this machine offers a model worker: cores not busy with other programs, and the slot
and thread counts `python -m flows.bench --calibrate` measured best for a model here.

llama.cpp's threads wait for each other at every step, so a thread that has no free core
stalls all the others: on a loaded 2-core machine 24 tokens took 1.7 s with 1 thread and 32 s
with 2. The default thread count therefore leaves out the cores other programs are using
right now, measured over a short sample of /proc/stat (not the load average, which still
counts the last minute of tokenmill's own work). While it runs, a worker whose thread count
tokenmill chose looks again every ADAPT_EVERY_S and drops a thread for each core other
programs keep busy (Prefect's temporary server starting beside the first rows, another job),
taking it back when they stop (`CoreWatch`, `threads_beside`).

Also what a worker's crash may owe to this CPU (`crash_hint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import time
from pathlib import Path

SAMPLE_S = 0.2
ADAPT_EVERY_S = 0.3
CALIBRATION_FILE = "calibration.json"


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, or None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class CoreWatch:
    """Cores' worth of CPU that other processes (not this one, all its threads included) used
    since the last look: `elsewhere()`."""

    def __init__(self) -> None:
        self._mark()

    def _mark(self) -> None:
        self._t, self._ticks, self._own = time.monotonic(), _cpu_ticks(), os.times()

    def seconds(self) -> float:
        """Seconds since the last look."""
        return time.monotonic() - self._t

    def elsewhere(self) -> float:
        t, ticks, own = self._t, self._ticks, self._own
        self._mark()
        if ticks is None or self._ticks is None or self._t <= t:
            return 0.0
        busy = (self._ticks[0] - ticks[0]) / os.sysconf("SC_CLK_TCK")
        mine = (self._own.user - own.user) + (self._own.system - own.system)
        return max(0.0, busy - mine) / (self._t - t)


def busy_cores_elsewhere(sample_s: float = SAMPLE_S) -> float:
    """Cores' worth of CPU other processes used over the next `sample_s` seconds."""
    watch = CoreWatch()
    time.sleep(sample_s)
    return watch.elsewhere()


def free_cores() -> int:
    """Cores not busy with other programs right now (at least 1)."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, cores - int(busy_cores_elsewhere() + 0.25)))


def threads_beside(elsewhere: float, most: int) -> int:
    """llama.cpp threads for a machine where other programs use `elsewhere` cores: at most
    `most`, one fewer for each core they keep at least half busy, at least 1."""
    cores = os.cpu_count() or 1
    return max(1, min(most, cores - int(elsewhere + 0.5)))


def machine_id() -> str:
    """This machine's kind, for calibration: processor model and core count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} x{os.cpu_count()}"


def _calibration_path() -> Path:
    from tokenmill.models.resolve import cache_root

    return cache_root() / CALIBRATION_FILE


def _key(model_sha: str) -> str:
    return hashlib.sha256(f"{model_sha} {machine_id()}".encode()).hexdigest()[:16]


def load_calibration(model_sha: str) -> dict | None:
    """What `--calibrate` stored for this model on this kind of machine, or None."""
    try:
        return json.loads(_calibration_path().read_text()).get(_key(model_sha))
    except (OSError, ValueError, AttributeError):
        return None


def save_calibration(model_sha: str, result: dict) -> Path:
    path = _calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    stored[_key(model_sha)] = {**result, "machine": machine_id(), "model_sha256": model_sha}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stored, indent=1))
    os.replace(tmp, path)
    return path


def amx_cpu() -> bool:
    """Whether the CPU reports Intel AMX. A llama.cpp built for it with -march=native moves the
    weights into AMX buffers and, on the Xeons this project was measured on (2026-12-05), then
    segfaults on the first prompt of more than a few tokens. The README's install builds
    llama-cpp-python without AMX."""
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def crash_hint(exitcode: int | None) -> str:
    """What to add to the message of a model worker that died with `exitcode` ("" if nothing)."""
    if exitcode == -signal.SIGSEGV and amx_cpu():
        return ("; this CPU reports Intel AMX, and a llama.cpp built with its AMX kernels segfaults here: "
                "rebuild llama-cpp-python without them (the README's install line: CMAKE_ARGS with -mno-amx-int8)")
    return ""
