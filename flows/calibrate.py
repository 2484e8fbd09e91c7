"""`python -m flows.bench --calibrate [--model M]`: measure this machine's prefill and decode
rates for a model at several slot counts and thread counts, print the table, and store the best
settings in tokenmill's cache folder (models/machine.py), where every later job on this model
and machine finds them. `--n-seq` and `--threads` still override them for a job.

Best means the shortest time for a typical row (REF_PROMPT prompt tokens, REF_COMPLETION
completion tokens) when `slots` rows decode together: prompt / prefill rate + completion /
decode rate, the decode rate being the one measured with that many rows.
"""

from __future__ import annotations

import os
import time

from tokenmill.models.base import ModelSettings
from tokenmill.models.machine import busy_cores_elsewhere, machine_id, save_calibration
from tokenmill.models.resolve import model_sha256, resolve_model

SLOTS = (1, 4, 8, 16)
REF_PROMPT, REF_COMPLETION = 300, 64
STREAM_CTX = 1024  # per slot: the probe's prompt and steps fit in it


def probe(model_path: str, threads: int, n_seq: int, steps: int) -> dict:
    from tokenmill.models.llama_batched import LlamaBatchedBackend

    backend = LlamaBatchedBackend(ModelSettings(model_path=model_path, n_ctx=STREAM_CTX * (n_seq + 1), n_seq=n_seq,
                                                n_threads=threads, backend="llama"))
    try:
        backend.measure_rates(prompt_tokens=32, steps=2)  # warm-up: the first decodes pay one-time setup
        rates = backend.measure_rates(prompt_tokens=256, steps=steps)
    finally:
        backend.close()
    # per row: its prompt alone at the prefill rate, its completion among n_seq rows sharing
    # each decode step (decode_tok_s counts all of them)
    row_s = REF_PROMPT / rates["prefill_tok_s"] + REF_COMPLETION / rates["decode_tok_s"]
    return {"threads": threads, "n_seq": n_seq, "prefill_tok_s": rates["prefill_tok_s"],
            "decode_tok_s": rates["decode_tok_s"], "row_s": row_s}


def calibrate(model: str | None, slots: tuple[int, ...] = SLOTS, threads: tuple[int, ...] | None = None,
              steps: int = 24, store: bool = True, echo=print) -> dict:
    """Probe every (threads, slots) pair; print the table; store and return the best."""
    path = resolve_model(model)
    cores = os.cpu_count() or 1
    threads = threads or tuple(range(1, cores + 1))
    busy = busy_cores_elsewhere()
    echo(f"calibrating {path.name} on {machine_id()}: slots {', '.join(map(str, slots))} x threads "
         f"{', '.join(map(str, threads))}; other programs are using {busy:.1f} cores now"
         f"{' (a busy machine gives low rates: calibrate on a quiet one)' if busy > 0.5 else ''}")
    echo(f"  {'threads':>7} {'slots':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'s per typical row':>18}")
    started = time.perf_counter()
    results = []
    for t in threads:
        for n in slots:
            r = probe(str(path), t, n, steps)
            results.append(r)
            echo(f"  {t:>7} {n:>5} {r['prefill_tok_s']:>14.0f} {r['decode_tok_s']:>13.0f} {r['row_s']:>18.3f}")
    best = min(results, key=lambda r: r["row_s"])
    chosen = {"threads": best["threads"], "n_seq": best["n_seq"], "prefill_tok_s": best["prefill_tok_s"],
              "decode_tok_s": best["decode_tok_s"], "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
              "table": results}
    echo(f"best: {best['threads']} threads, {best['n_seq']} slots ({time.perf_counter() - started:.0f} s of probes)")
    if store:
        where = save_calibration(model_sha256(path), chosen)
        echo(f"stored in {where}: jobs on this model and machine use it unless --n-seq or --threads say otherwise")
    return chosen
