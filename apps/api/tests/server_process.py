"""A real server process for the tests that need several (`python -m app.cli serve` on the test
database, under a WORKER_ID and a port of its own): started, killed, stopped by a signal, started again.
Each start writes its output to a file of its own (a full pipe cannot stall it)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.config import Settings
from conftest import JWT_ISSUER, JWT_SECRET, REPO_ROOT, free_port

START_TIMEOUT_S = 30.0


class ServerProcess:
    def __init__(self, worker_id: str, dsn: str, log_dir: Path, **env: str) -> None:
        self.worker_id = worker_id
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        # Nothing of ours from the outer environment: only what the test sets.
        ours = {name.upper() for name in Settings.model_fields}
        self.env = {k: v for k, v in os.environ.items() if k.upper() not in ours}
        self.env.update(
            DATABASE_URL=dsn,
            SUPABASE_JWT_SECRET=JWT_SECRET,
            SUPABASE_JWT_ISSUER=JWT_ISSUER,
            HOST="127.0.0.1",
            PORT=str(self.port),
            WORKER_ID=worker_id,
            LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
        )
        self.env.update(env)
        self.process: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        assert not self.alive, f"{self.worker_id} is already running"
        path = self.log_dir / f"{self.worker_id}-{len(self.logs) + 1}.log"
        self.logs.append(path)
        with path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve"],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def wait_healthy(self, http: httpx.AsyncClient, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.worker_id} exited with {self.process.returncode}:\n{self.tail()}"
                )
            try:
                if (await http.get(f"{self.url}/healthz", timeout=1.0)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.worker_id} not healthy after {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, whatever was in flight is simply lost."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    async def interrupt(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> float:
        """Send `sig` and wait for the exit; returns how long the process took to exit."""
        assert self.process is not None and self.alive
        sent = time.monotonic()
        self.process.send_signal(sig)
        while self.process.poll() is None:
            if time.monotonic() - sent > timeout:
                self.kill()
                raise AssertionError(f"{self.worker_id} still running {timeout}s after {sig.name}")
            await asyncio.sleep(0.02)
        return time.monotonic() - sent

    async def metric(self, http: httpx.AsyncClient, name: str) -> float:
        """A metric on this process's /metrics, summed over its labels."""
        text = (await http.get(f"{self.url}/metrics")).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith((f"{name} ", f"{name}{{"))
        )

    def tail(self, lines: int = 25) -> str:
        out = []
        for path in self.logs[-2:]:
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            out.append(f"--- {path.name} (last {lines} lines)\n" + "\n".join(text[-lines:]))
        return "\n".join(out)
