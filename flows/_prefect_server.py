"""Prefect's temporary API server, started for one command when no `PREFECT_API_URL` is set.

Prefect would start the same server itself (`prefect.server.api.server.SubprocessASGIServer`:
uvicorn in a subprocess serving `create_app`, UI off), but importing that class loads Prefect's
whole server stack (FastAPI, SQLAlchemy, its models) into this process first: about 3.5 s of
one core, on the way to the first row, before the subprocess even begins its own imports. Here
the subprocess is started with the same command and settings without that import; this
process then talks to it through `PREFECT_API_URL`, like to any server of the user's own.

The server dies with this process: it is stopped at exit, and the kernel kills it should this
process be killed (PR_SET_PDEATHSIG), so no server outlives its command.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tokenmill.errors import TokenmillError
from tokenmill.pool import die_with_parent

TIMEOUT_VAR = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
_PORT_IN_USE = 3  # uvicorn's exit status when it cannot bind (as Prefect's own launcher checks)


class PrefectStartError(TokenmillError):
    """Prefect's temporary server did not come up."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryServer:
    """One temporary Prefect server: `start()` launches it at once, `wait()` blocks until it
    answers (raising PrefectStartError with what to do when it does not), `stop()` ends it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.started_at = 0.0
        self.log = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        package = Path(importlib.util.find_spec("prefect").origin).parent
        if self.log is None:
            atexit.register(self.stop)  # after Prefect's own exit handlers (they send its last events)
        else:  # a retry on another port
            self.log.close()
        self.port = _free_port()
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        self.log = tempfile.TemporaryFile()  # its error lines, for the message should it fail
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(package.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log,
            preexec_fn=die_with_parent)
        self.started_at = time.monotonic()

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait(self) -> str:
        """The server's API URL once it answers."""
        timeout = float(os.environ.get(TIMEOUT_VAR) or 20)
        while True:
            if self._healthy():
                return self.api_url
            code = self.proc.poll()
            if code == _PORT_IN_USE:  # the port was taken between choosing and binding it
                self.start()
                continue
            if code is not None or time.monotonic() - self.started_at >= timeout:
                reason = (f"it exited with status {code}: {self._stderr_tail()}" if code is not None
                          else f"it did not answer within {timeout:g} s")
                self.stop()
                raise PrefectStartError(
                    f"Prefect's temporary server did not start ({reason}); on a busy machine raise {TIMEOUT_VAR}, or "
                    "start a server once with `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
            time.sleep(0.05)

    def _stderr_tail(self) -> str:
        try:
            self.log.seek(0)
            lines = self.log.read().decode(errors="replace").strip().splitlines()
        except (OSError, ValueError):
            lines = []
        return lines[-1][:300] if lines else "no message"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.log is not None:
            self.log.close()
