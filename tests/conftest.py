"""Shared fixtures: the real data sets beside the repo (../shared/data), never written to; a real
PostgreSQL server (tests/postgres.py)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from postgres import PostgresServer

# Set at import, before any test or fixture runs, so every server and command a test starts (they
# inherit this environment) writes its default decision record ($XDG_STATE_HOME/patchcore/) into a
# throwaway folder, never into the real ~/.local/state.
_STATE_HOME = tempfile.mkdtemp(prefix="patchcore-test-state-")
os.environ["XDG_STATE_HOME"] = _STATE_HOME
atexit.register(shutil.rmtree, _STATE_HOME, ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PATCHCORE_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "mvtec_ad" / "bottle").is_dir():
        pytest.fail(f"real test data not found at {DATA} (set PATCHCORE_DATA to the folder holding mvtec_ad/, battery_weld/, cookies/)")
    return DATA


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    """A torchvision cache with nothing in it, so no test depends on (or fills) the user's cache."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def postgres():
    """A running PostgreSQL server shared by the session (``.url`` for SQLAlchemy). Tests may stop and
    start it; one left stopped is started again before the next test that uses it."""
    server = None
    try:
        server = PostgresServer()
        server.start()
    except RuntimeError as error:  # not installed, or did not start: one line, not a traceback
        if server is not None:
            server.cleanup()
        pytest.fail(str(error), pytrace=False)
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(autouse=True)
def _postgres_running(request):
    # A session fixture is set up once, so a test that stopped the server (and failed before starting
    # it again) would leave it down for the rest: start it before each test that uses it.
    if "postgres" in request.fixturenames:
        server = request.getfixturevalue("postgres")
        if not server.is_running:
            server.start()
