"""What this machine offers a model worker: cores not busy with other programs, and the slot
and thread counts `python -m flows.bench --calibrate` measured best for a model here.

llama.cpp's threads wait for each other at every step, so a thread that has no free core
stalls all the others: on a loaded 2-core machine 24 tokens took 1.7 s with 1 thread and 32 s
with 2. The default thread count therefore leaves out the cores other programs are using
right now, measured over a short sample of /proc/stat (not the load average, which still
counts the last minute of tokenmill's own work).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

SAMPLE_S = 0.2
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


def busy_cores_elsewhere(sample_s: float = SAMPLE_S) -> float:
    """Cores' worth of CPU other processes used over the last `sample_s` seconds."""
    before, own_before = _cpu_ticks(), os.times()
    if before is None:
        return 0.0
    time.sleep(sample_s)
    after, own_after = _cpu_ticks(), os.times()
    hz = os.sysconf("SC_CLK_TCK")
    busy = (after[0] - before[0]) / hz
    own = (own_after.user - own_before.user) + (own_after.system - own_before.system)
    return max(0.0, busy - own) / sample_s


def free_cores() -> int:
    """Cores not busy with other programs right now (at least 1)."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, cores - int(busy_cores_elsewhere() + 0.25)))


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
