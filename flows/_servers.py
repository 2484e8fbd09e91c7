"""OpenAI-compatible servers started on loopback for the benchmarks and the tests.

`LoopbackServer("llama-cpp-python", model)` runs `python -m llama_cpp.server` (from
`llama-cpp-python[server]`); `LoopbackServer("llama-server", model, slots=4)` runs llama.cpp's own
llama-server (from ../shared/peers, see flows/_peers.py) with the command line the peer script
uses. Both listen on 127.0.0.1 only; `url` is what `--model` takes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerStartError(RuntimeError):
    pass


class LoopbackServer:
    def __init__(self, kind: str, model: Path, log: Path, port: int | None = None, slots: int = 4,
                 n_ctx: int = 4096, threads: int = 2):
        if kind not in ("llama-cpp-python", "llama-server"):
            raise ValueError(f"unknown server kind {kind!r}")
        self.kind, self.model, self.log = kind, model, log
        self.port = port or free_port()
        self.slots, self.n_ctx, self.threads = slots, n_ctx, threads
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> tuple[list[str], dict]:
        if self.kind == "llama-cpp-python":
            return ([sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--host", "127.0.0.1",
                     "--port", str(self.port), "--n_ctx", str(self.n_ctx), "--n_threads", str(self.threads),
                     "--verbose", "false"], dict(os.environ))
        from flows import _peers

        env = _peers._env()
        if env is None:
            raise ServerStartError("llama-server is not set up (../shared/peers/setup.sh)")
        # as ../shared/peers/llama_server.py starts it: -np slots, -c slots x 1024 unless told
        return ([env["PEER_LLAMA_SERVER"], "-m", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
                 "-np", str(self.slots), "-c", str(self.n_ctx), "-t", str(self.threads), "-tb", str(self.threads),
                 "--no-webui"], env)

    def start(self, timeout: float = 180.0) -> "LoopbackServer":
        cmd, env = self.command()
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env)
        ready = f"{self.url}/models" if self.kind == "llama-cpp-python" else f"http://127.0.0.1:{self.port}/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"{self.kind} exited with code {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(ready, timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise ServerStartError(f"{self.kind} did not answer within {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
