"""Fixtures for the server tests: a bottle model, and the real server started as a subprocess."""

from __future__ import annotations

import sys

from pathlib import Path
from typing import Iterator

import pytest

from patchcore.cli import main
from serving import RunningServer


@pytest.fixture(scope="session")
def bottle_model_file(data_root, tmp_path_factory) -> Path:
    """A MobileNetV2 model of MVTec AD bottle's 209 good training images, fitted once per session."""
    path = tmp_path_factory.mktemp("bottle_model") / "bottle.safetensors"
    assert main(["fit", str(data_root / "mvtec_ad" / "bottle"), "--backbone", "mobilenet_v2", "--out", str(path), "--quiet"]) == 0
    return path


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    """Starts ``patchcore serve MODEL OPTIONS...`` on a free port, ready; stops it after the test."""
    servers: list[RunningServer] = []

    def start(model: Path, *options: str, wait: bool = True, python: str | Path = sys.executable) -> RunningServer:
        server = RunningServer(model, *options, log=tmp_path / f"server{len(servers)}.log", python=python)
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()
