"""A real ``mlflow server`` for tests, bound to 127.0.0.1 on a free port.

Its SQLite store and its served artifacts (``--serve-artifacts``) live in a folder of
the test's own. The server runs in a process group of its own, because ``mlflow
server`` starts uvicorn as a child process, and stopping it ends the whole group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

HOST = "127.0.0.1"
START_TIMEOUT_S = 90  # about 8 s on a 2-core machine; more when other tests load the CPU


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on at the moment of the call."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class MlflowServer:
    """One ``mlflow server`` process: its URI, its folder, and how to stop it."""

    def __init__(self, folder: Path, port: int | None = None):
        self.folder = folder
        self.port = port or free_port()
        self.uri = f"http://{HOST}:{self.port}"
        self.store_uri = f"sqlite:///{folder / 'mlflow.db'}"
        self.log_path = folder / f"server-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the server and wait until it responds to ``GET /health``, or raise with its log."""
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.store_uri,
            "--serve-artifacts", "--artifacts-destination", str(self.folder / "artifacts"),
            "--host", HOST, "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                cwd=self.folder, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited at start:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.uri}/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server not up after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """End the server's process group: SIGTERM, then SIGKILL after 10 s."""
        if self.process is None or (self.process.poll() is not None and not self._group_alive()):
            return
        pgid = self.process.pid  # the group id, since the server leads its own session
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass
        # uvicorn may outlive the mlflow command that started it.
        deadline = time.monotonic() + 10
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._group_alive():
            os.killpg(pgid, signal.SIGKILL)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


@contextmanager
def running_mlflow_server(folder: Path) -> Iterator[MlflowServer]:
    """Yield a started MlflowServer in `folder`, and stop it whatever happens."""
    server = MlflowServer(folder)
    try:
        server.start()
        yield server
    finally:
        server.stop()
