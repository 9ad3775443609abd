"""Running ``gradstore serve`` as a child process on loopback, for the demo, tests and benchmarks.

``ServiceProcess`` picks a free port, starts the service, waits until ``/healthz`` answers and,
on exit, stops it (SIGTERM, then SIGKILL after a grace period). It is the one way gradstore's
own tooling starts a real server; nothing here is needed to run the service in production.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """``with ServiceProcess(root, api_key="k") as service: Client(service.url, "k")``."""

    def __init__(self, root: str | Path, api_key: str | None = None, *, host: str = "127.0.0.1",
                 port: int | None = None, log_file: str | Path | None = None, startup_timeout: float = 60.0,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.root = Path(root)
        self.api_key = api_key
        self.host = host
        self.port = port or free_port(host)
        self.log_file = Path(log_file) if log_file else None
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        auth = ["--api-key", self.api_key] if self.api_key else ["--no-auth"]
        return [sys.executable, "-m", "gradstore.cli", "serve", "--root", str(self.root), "--host", self.host,
                "--port", str(self.port), "--log-level", "warning", *auth, *self.extra_args]

    def start(self) -> "ServiceProcess":
        output = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(self.command(), stdout=output, stderr=output,
                                        env={**os.environ, **(self.env or {})})
        if self.log_file:
            output.close()  # the child keeps its own descriptor
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gradstore serve exited with status {self.process.returncode}"
                                   + (f"; see {self.log_file}" if self.log_file else ""))
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"gradstore serve did not answer on {self.url} within {self.startup_timeout:.0f} s")

    def stop(self, grace: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown hooks run."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
