"""The real server as a subprocess, for the tests (imported by conftest.py and the server tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RunningServer:
    """``patchcore serve`` in a subprocess; ``url`` is its base address."""

    def __init__(self, model: Path, *options: str, log: Path, python: str | Path = sys.executable, env: dict[str, str] | None = None, scheme: str = "http") -> None:
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log = log
        self._log_handle = open(log, "w")
        command = [str(python), "-m", "patchcore.cli", "serve", str(model), "--port", str(self.port), "--device", "cpu", *options]
        self.process = subprocess.Popen(command, stdout=self._log_handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds until /v2/health/ready answered 200."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1.0).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout} s: {self.log.read_text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_handle.close()
        return self.process.returncode
