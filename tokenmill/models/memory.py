"""Before any worker loads a model: will the weights and the KV cache fit?

A run needs the model file (mapped once on the CPU, however many CPU workers share it; once per
worker on a GPU) plus, per worker, the KV cache for its context (`--n-ctx` x (`--n-seq` + 1
streams) with the batched engine). llama.cpp would otherwise fail deep inside a load, or the
kernel's OOM killer would end the run. The check compares that need with free RAM
(/proc/meminfo MemAvailable) and, for layers offloaded to a GPU, with that GPU's free memory.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from tokenmill.errors import ModelError

HEADROOM = 1.1  # llama.cpp's compute buffers and allocator slack on top of weights + KV


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def available_ram(meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes the kernel says new allocations can take without swapping (MemAvailable), or None."""
    try:
        with open(meminfo) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_vram(gpu: str, nvidia_smi: str = "nvidia-smi") -> int | None:
    """Free bytes on GPU `gpu` as nvidia-smi reports them, or None when it cannot say."""
    if shutil.which(nvidia_smi) is None:
        return None
    try:
        out = subprocess.run([nvidia_smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", gpu],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return int(out.splitlines()[0]) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


@dataclass
class MemoryNeed:
    weights: int  # bytes of the model file
    kv: int  # bytes of one worker's KV cache
    workers: int
    gpu_fraction: float  # share of the layers offloaded to a GPU (0: CPU only)
    gpus: dict  # GPU id -> workers on it

    @property
    def ram(self) -> int:
        cpu_weights = self.weights * (1 - self.gpu_fraction)  # mapped once, shared by the workers
        cpu_kv = self.kv * (1 - self.gpu_fraction) * self.workers
        return int((cpu_weights + cpu_kv) * HEADROOM)

    def vram(self, workers_on_gpu: int) -> int:
        return int((self.weights + self.kv) * self.gpu_fraction * workers_on_gpu * HEADROOM)


def memory_need(weights: int, kv_bytes_per_token: int, cells: int, workers: int, gpus: list[str | None],
                n_gpu_layers: int, n_layers: int) -> MemoryNeed:
    """What `workers` workers placed on `gpus` (one entry per worker, None: CPU) need.
    `cells`: the context each worker creates (tokens, all streams)."""
    on_gpu = [g for g in gpus if g is not None]
    if not on_gpu or n_gpu_layers == 0:
        fraction = 0.0
    elif n_gpu_layers < 0 or not n_layers:
        fraction = 1.0
    else:
        fraction = min(1.0, n_gpu_layers / n_layers)
    per_gpu: dict = {}
    for gpu in on_gpu:
        per_gpu[gpu] = per_gpu.get(gpu, 0) + 1
    return MemoryNeed(weights, kv_bytes_per_token * cells, workers, fraction, per_gpu if fraction else {})


def check_fits(need: MemoryNeed, n_ctx: int, n_seq: int, ram: int | None, vram: dict) -> None:
    """Raise ModelError, one line with what to change, when `need` exceeds free RAM or the free
    memory of a GPU (`vram`: GPU id -> free bytes, missing where unknown). Unknown: no check."""
    what = (f"the model file ({_gib(need.weights)}) plus {need.workers} x a KV cache of {_gib(need.kv)} "
            f"(--n-ctx {n_ctx} x --n-seq {n_seq} rows, +1 shared-prefix stream)")
    fixes = "use a smaller --n-ctx, fewer --n-seq" + (", fewer --workers" if need.workers > 1 else "")
    if ram is not None and need.ram > ram:
        raise ModelError(f"not enough memory: {what} need about {_gib(need.ram)} of RAM, and {_gib(ram)} is "
                         f"available; {fixes}" + (" or more --n-gpu-layers" if need.gpus else "")
                         + ", or a smaller model")
    for gpu, count in need.gpus.items():
        free = vram.get(gpu)
        if free is not None and need.vram(count) > free:
            raise ModelError(f"not enough GPU memory on GPU {gpu}: {what} need about {_gib(need.vram(count))} "
                             f"there, and {_gib(free)} is free; {fixes} or fewer --n-gpu-layers")
