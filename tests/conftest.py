"""Shared fixtures: the real data sets beside the repo (../shared/data), never written to."""

import os
from pathlib import Path

import pytest

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
