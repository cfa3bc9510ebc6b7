"""The embedded Postgres of local mode: several local commands (serve, token, migrate) may use one
data folder at once; whoever started the server stops it only when no one else uses it."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import embedded
from app.embedded import EmbeddedPostgres
from conftest import free_port


@pytest.fixture(autouse=True)
def clean_tables() -> None:
    """No test database is needed here: these tests start servers of their own."""


class TestSharedDataFolder:
    def test_a_starter_does_not_stop_the_server_under_another_user(self, tmp_path: Path) -> None:
        port = free_port()
        token_command = EmbeddedPostgres(tmp_path, port)
        server_command = EmbeddedPostgres(tmp_path, port)
        token_command.start()
        server_command.start()
        try:
            assert token_command.started_here and not server_command.started_here
            token_command.release()  # e.g. `make token` finishing while `make run` serves
            assert server_command.running(), "stopped under a process still using it"
        finally:
            server_command.stop("immediate")

    def test_the_last_user_that_started_it_stops_it(self, tmp_path: Path) -> None:
        port = free_port()
        server_command = EmbeddedPostgres(tmp_path, port)
        token_command = EmbeddedPostgres(tmp_path, port)
        server_command.start()
        token_command.start()
        try:
            token_command.release()
            assert server_command.running()
            server_command.release()  # Ctrl-C on `make run`, no one else left
            assert not server_command.running()
        finally:
            server_command.stop("immediate")


class TestReachableAsTheSystemUser:
    def test_folders_above_a_path_get_traverse_for_others_and_nothing_else(self, tmp_path: Path) -> None:
        # A clone in a 0700 folder (a home, `mktemp -d`): its virtualenv's Postgres binaries must stay
        # reachable by the system user Postgres runs as under root.
        closed = tmp_path / "closed"
        target = closed / "p" / ".venv" / "bin"
        target.mkdir(parents=True)
        closed.chmod(0o700)
        (closed / "p").chmod(0o750)
        target.chmod(0o700)
        embedded._grant_traversal(target / "initdb")
        assert closed.stat().st_mode & 0o777 == 0o701
        assert (closed / "p").stat().st_mode & 0o777 == 0o751
        assert target.stat().st_mode & 0o777 == 0o701
