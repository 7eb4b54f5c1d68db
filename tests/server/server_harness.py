"""Start the REAL server (``scaleswap serve`` in a subprocess, uvicorn on 127.0.0.1 and a free port) for tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One ``scaleswap serve`` process. ``start()`` waits for ``/ready``; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, model_dir: Path, data_dir: Path, log_path: Path, admin_key: str | None = None,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path)
        self.admin_key = admin_key
        self.extra_args = tuple(extra_args)
        self.env = env or {}
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.not_ready_answers: list[tuple[int, str]] = []  # (status, body status) seen before /ready said 200

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0, stop_on_failure: bool = True) -> "ServerProcess":
        self.port = free_port()
        self.not_ready_answers = []
        args = [sys.executable, "-m", "scaleswap.server.cli", "serve", "--model", str(self.model_dir),
                "--port", str(self.port), "--data-dir", str(self.data_dir), "--log-level", "warning",
                *self.extra_args]
        env = {**os.environ, **self.env}
        env.pop("SCALESWAP_ADMIN_KEY", None)
        if self.admin_key:
            env["SCALESWAP_ADMIN_KEY"] = self.admin_key
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(f"{self.base_url}/ready", timeout=2.0)
                if r.status_code == 200:
                    return self
                self.not_ready_answers.append((r.status_code, r.json().get("status")))
                if r.json().get("status") == "failed":
                    if stop_on_failure:
                        self.stop()
                    raise RuntimeError(f"model failed to load: {r.text}\n{self.log()}")
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not ready within {timeout_s} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int | None:
        """Signal the server and wait for it to exit; returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        self._log.close()
        return code

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""
