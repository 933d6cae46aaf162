"""Fixtures for the server tests: a bottle model, and the real server started as a subprocess."""

from __future__ import annotations

import os
import shutil
import sys

from pathlib import Path
from typing import Iterator

import pytest

from playwright.sync_api import Browser, sync_playwright

from patchcore.cli import main
from browser import launch
from ray_cluster import LocalRayCluster
from serving import RunningServer


@pytest.fixture(scope="session")
def bottle_train_run(data_root, tmp_path_factory) -> Path:
    """`patchcore train` on MVTec AD bottle with MobileNetV2, once per session: its folder holds
    model.safetensors, metrics.json, scores.csv and the pictures."""
    out = tmp_path_factory.mktemp("bottle")
    assert main(["train", str(data_root / "mvtec_ad" / "bottle"), "--backbone", "mobilenet_v2", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def bottle_model_file(request, tmp_path_factory) -> Path:
    """A MobileNetV2 model of MVTec AD bottle's 209 good training images (208 in the model: the
    contamination check sets 132.png aside), named bottle.safetensors (servers serve it as
    'bottle'): a copy of the session's `train` run's model, so that bottle is fitted once (or the
    file $PATCHCORE_TEST_BOTTLE_MODEL names, fitted so before, when running tests again and
    again, as for mutation runs)."""
    if os.environ.get("PATCHCORE_TEST_BOTTLE_MODEL"):
        return Path(os.environ["PATCHCORE_TEST_BOTTLE_MODEL"])
    path = tmp_path_factory.mktemp("bottle_model") / "bottle.safetensors"
    shutil.copyfile(request.getfixturevalue("bottle_train_run") / "model.safetensors", path)
    return path


@pytest.fixture(scope="session")
def bottle_exports(bottle_model_file, tmp_path_factory) -> dict[str, Path]:
    """The bottle model exported to ONNX (``bottle.onnx``) and OpenVINO (``ov/bottle.xml``) in one
    folder, once per session, for the tests that read them (none changes them)."""
    folder = tmp_path_factory.mktemp("exported")
    paths = {"onnx": folder / "bottle.onnx", "openvino": folder / "ov" / "bottle.xml"}
    for fmt, path in paths.items():
        assert main(["export", str(bottle_model_file), "--format", fmt, "--out", str(path)]) == 0
    return paths


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    """Starts ``patchcore serve MODEL OPTIONS...`` on a free port, ready; stops it after the test."""
    servers: list[RunningServer] = []

    def start(model: Path, *options: str, wait: bool = True, python: str | Path = sys.executable, env: dict[str, str] | None = None) -> RunningServer:
        server = RunningServer(model, *options, log=tmp_path / f"server{len(servers)}.log", python=python, env=env)
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[LocalRayCluster]:
    """A real two-node Ray cluster on this machine (head and one worker node, 2 CPUs and a 100 MB
    object store each, token authentication on), started once per session and stopped after it.
    Drive it with ``--ray cluster.address`` in a process run with ``env=cluster.env``;
    ``cluster.node_ids`` holds the head's node id, then the worker's."""
    with LocalRayCluster(nodes=2, cpus_per_node=2, object_store_bytes=100 * 2**20) as cluster:
        yield cluster


@pytest.fixture
def browser() -> Iterator[Browser]:
    """A headless Chromium (browser.py), closed after the test."""
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            yield browser
        finally:
            browser.close()
