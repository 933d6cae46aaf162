"""The tests' PostgreSQL server (tests/postgres.py) is real: data survives a stop and a start, and a
stopped server refuses connections."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa


def test_postgres_keeps_rows_across_a_stop_and_start(postgres):
    assert postgres.is_running
    assert postgres.url.startswith("postgresql+psycopg://")
    engine = sa.create_engine(postgres.url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("CREATE TABLE survives (id integer PRIMARY KEY, note text)"))
            connection.execute(sa.text("INSERT INTO survives VALUES (1, 'kept')"))
        engine.dispose()  # pooled connections die with the server

        postgres.stop()
        assert not postgres.is_running
        with pytest.raises(sa.exc.OperationalError):
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))

        postgres.start()
        assert postgres.is_running
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT id, note FROM survives")).all() == [(1, "kept")]
            if os.geteuid() == 0:  # as root, the server runs as an unprivileged user
                assert connection.execute(sa.text("SELECT current_setting('data_directory')")).scalar() == str(postgres.data)
                assert Path(postgres.data).stat().st_uid != 0
    finally:
        engine.dispose()
        with sa.create_engine(postgres.url).begin() as connection:
            connection.execute(sa.text("DROP TABLE IF EXISTS survives"))


def test_postgres_left_stopped_by_a_test(postgres):
    # Leaves the session's server down on purpose: the next test checks that conftest starts it again.
    postgres.stop()
    assert not postgres.is_running


def test_postgres_fixture_restarted_the_server(postgres):
    assert postgres.is_running  # started again by conftest's guard after the test above stopped it
    url = postgres.create_database("another")
    with sa.create_engine(url).connect() as connection:
        assert connection.execute(sa.text("SELECT current_database()")).scalar() == "another"


def test_state_home_is_a_temporary_folder():
    state = Path(os.environ["XDG_STATE_HOME"])
    assert state.is_dir() and state != Path.home() / ".local" / "state"
