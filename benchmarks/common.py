"""Shared pieces of `make bench`: the private embedded Postgres, server processes, wrk, tables.

Everything runs on loopback, on free ports, under benchmarks/results/tmp/ (git-ignored): the
developer's .data and port 8000 are never touched.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
RESULTS = BENCH / "results"
TMP = RESULTS / "tmp"
LUA = BENCH / "lua"
VENV_BIN = Path(sys.executable).parent
API_CMD = [str(VENV_BIN / "collection-api"), "serve"]  # what `make run` runs (uv run ... serve)

# Seconds each load point runs (and is warmed up for first); BENCH_DURATION/BENCH_WARMUP override.
DURATION = float(os.environ.get("BENCH_DURATION", "5"))
WARMUP = float(os.environ.get("BENCH_WARMUP", "1"))

sys.path.insert(0, str(REPO / "apps" / "api" / "src"))

from app.config import Settings  # noqa: E402
from app.embedded import EmbeddedPostgres  # noqa: E402

# Postgres settings for the bench's private server (appended once to its postgresql.conf):
# pg_stat_statements counts the statements each endpoint sends (round trips).
PG_EXTRA_CONF = """
# collection-api bench
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = top
pg_stat_statements.max = 5000
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    wrk = shutil.which("wrk")
    wrk_version = ""
    if wrk:
        out = subprocess.run([wrk, "--version"], capture_output=True, text=True)
        wrk_version = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
    import asyncpg
    import fastapi
    import uvicorn

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "asyncpg": asyncpg.__version__,
        "wrk": wrk_version,
        "load_average_at_start": load_average(),
    }


# ---------------------------------------------------------------------------------------------------
# The private Postgres
# ---------------------------------------------------------------------------------------------------
class BenchPostgres:
    """The embedded Postgres of local mode, in the bench's own folder and port, with
    pg_stat_statements. Servers started on the same DATA_DIR and EMBEDDED_PG_PORT reuse it (and so
    leave it running when they stop)."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.pg = EmbeddedPostgres(data_dir, self.port)

    @property
    def dsn(self) -> str:
        return self.pg.dsn

    def start(self) -> None:
        self.pg.init()
        conf = self.pg.pgdata / "postgresql.conf"
        if "collection-api bench" not in conf.read_text():
            with conf.open("a") as f:
                f.write(PG_EXTRA_CONF)
        self.pg.start()

    def stop(self) -> None:
        self.pg.stop("fast")

    def jwt_secret(self) -> str:
        return self.pg.local_jwt_secret()


# ---------------------------------------------------------------------------------------------------
# Server processes
# ---------------------------------------------------------------------------------------------------
def clean_env(**overrides: str) -> dict[str, str]:
    """The environment without any of our settings (a developer's exports must not leak in)."""
    ours = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in ours}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


class Proc:
    def __init__(self, name: str, cmd: Sequence[str], env: dict[str, str], port: int) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.env = env
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = TMP / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Proc:
        TMP.mkdir(parents=True, exist_ok=True)
        log_file = self.log_path.open("wb")
        self.started_at = time.perf_counter()
        # Not in the repository: a developer's .env there (read from the working directory) must not
        # reach the bench's servers, as clean_env keeps their exported settings out.
        self.process = subprocess.Popen(
            self.cmd, env=self.env, cwd=TMP, stdout=log_file, stderr=subprocess.STDOUT
        )
        log_file.close()
        return self

    def wait_ready(self, path: str = "/healthz", timeout: float = 120.0) -> float:
        """Seconds from process start until `path` answers 200."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: see {self.log_path}\n{self.tail()}")
                try:
                    if client.get(self.url + path).status_code == 200:
                        return time.perf_counter() - self.started_at
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
        raise RuntimeError(f"{self.name} not ready after {timeout}s: see {self.log_path}\n{self.tail()}")

    def ensure_running(self) -> bool:
        """Start the process again if something outside stopped it (this machine is shared: a
        `pkill -f "collection-api serve"` elsewhere reaches ours too). True when it had to."""
        assert self.process is not None
        if self.process.poll() is None:
            return False
        log(f"{self.name} had exited (code {self.process.returncode}); starting it again")
        self.log_path = self.log_path.with_name(self.log_path.stem + "-restarted.log")
        self.start()
        self.wait_ready()
        return True

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Ctrl-C, as a developer stops `make run`; SIGKILL if it does not go within 20 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def api_server(pg: BenchPostgres, name: str = "api", port: int | None = None, **env: str) -> Proc:
    """`collection-api serve` as `make run` starts it, on the bench's own DATA_DIR and ports."""
    port = port or free_port()
    environment = clean_env(
        DATA_DIR=str(pg.data_dir),
        EMBEDDED_PG_PORT=str(pg.port),
        PORT=str(port),
        **env,
    )
    return Proc(name, API_CMD, environment, port)


def bare_server(pg: BenchPostgres, org_id: uuid.UUID, user_id: uuid.UUID) -> Proc:
    port = free_port()
    environment = clean_env(
        BENCH_DSN=pg.dsn, BENCH_ORG_ID=str(org_id), BENCH_USER_ID=str(user_id), PORT=str(port)
    )
    return Proc("bare", [sys.executable, str(BENCH / "bare_app.py")], environment, port)


# ---------------------------------------------------------------------------------------------------
# wrk
# ---------------------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    non_2xx: int

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def wrk(url: str, script: str, connections: int, duration: float, **env: str) -> LoadResult:
    """One wrk run (1 thread: the 2 cores are shared with the server and Postgres)."""
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA / script),
        url,
    ]
    environment = {**os.environ, "BENCH_LUA_DIR": str(LUA), **env}
    out = subprocess.run(cmd, capture_output=True, text=True, env=environment, timeout=duration + 60)
    for line in out.stdout.splitlines():
        if line.startswith("{") and '"requests"' in line:
            data = json.loads(line)
            seconds = data["duration_us"] / 1e6
            return LoadResult(
                requests=data["requests"],
                seconds=seconds,
                rps=data["requests"] / seconds if seconds else 0.0,
                p50_ms=data["p50_us"] / 1000,
                p90_ms=data["p90_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                max_ms=data["max_us"] / 1000,
                errors=data["errors_connect"]
                + data["errors_read"]
                + data["errors_write"]
                + data["errors_timeout"],
                non_2xx=data["errors_status"],
            )
    if "unable to connect" in out.stdout + out.stderr:
        return LoadResult(0, duration, 0.0, float("nan"), float("nan"), float("nan"), float("nan"), 1, 0)
    raise RuntimeError(f"wrk gave no result: {out.stdout}\n{out.stderr}")


# ---------------------------------------------------------------------------------------------------
# Numbers and tables
# ---------------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarise_ms(samples_s: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3) if ms else float("nan"),
    }


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = []
    if title:
        lines.append(f"\n## {title}")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append(
            "| "
            + " | ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(row, widths, strict=True))
            + " |"
        )
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text[0] in "-+.") and not text.startswith("-- ")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_json(name: str, data: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def read_json(name: str) -> Any:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None
