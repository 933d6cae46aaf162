"""``fit --ray`` on a real two-node Ray cluster: features on both nodes, the coreset on the driver,
and the model the local fit's, bit for bit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patchcore import PatchCore
from patchcore.distributed.fit import BATCHES_PER_CHUNK

RUN_TIMEOUT_S = 300
FIT_LINE = re.compile(r"^features extracted on Ray by (\d+) actors on (\d+) nodes \(images per node: (.*)\)$", re.M)


def fit(data: Path, out: Path, *options: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "patchcore.cli", "fit", str(data), "--backbone", "mobilenet_v2", "--out", str(out), "--quiet", *options]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


@pytest.fixture(scope="module")
def welds_with_a_bad_file(data_root, tmp_path_factory) -> Path:
    """The welds' 37 good images and one corrupt file among them."""
    folder = tmp_path_factory.mktemp("welds")
    for image in sorted((data_root / "battery_weld" / "train" / "good").iterdir()):
        (folder / image.name).symlink_to(image)
    (folder / "0000_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    return folder


def test_fit_on_a_two_node_cluster_gives_the_local_model_and_sets_aside_the_same_images(ray_cluster, welds_with_a_bad_file, tmp_path):
    # Batches of 2, so that the 38 files make 3 chunks (of BATCHES_PER_CHUNK batches) for the 2 nodes.
    assert BATCHES_PER_CHUNK * 2 < 38 / 2
    # A stated share, so that images are set aside whatever the welds score: the first coreset and
    # calibration (which choose them), the check, the repaired coreset and the second calibration
    # on Ray must all give the local model. (One fit of each: each costs half a minute.)
    options = ("--bank-size", "3000", "--batch-size", "2", "--contamination", "0.1")
    local = fit(welds_with_a_bad_file, tmp_path / "local.safetensors", *options)
    assert local.returncode == 0, local.stderr
    remote = fit(welds_with_a_bad_file, tmp_path / "ray.safetensors", *options, "--ray", ray_cluster.address, env=ray_cluster.env)
    assert remote.returncode == 0, remote.stderr
    line = FIT_LINE.search(remote.stderr)
    assert line and line.group(2) == "2", remote.stderr  # both nodes extracted features
    assert sum(map(int, line.group(3).split(", "))) == 37
    skipped = [l for l in remote.stderr.splitlines() if l.startswith("skipped ")]
    assert skipped == [l for l in local.stderr.splitlines() if l.startswith("skipped ")] and len(skipped) == 1
    assert "0000_corrupt.png" in skipped[0]
    a, b = PatchCore.load(tmp_path / "local.safetensors", progress=False), PatchCore.load(tmp_path / "ray.safetensors", progress=False)
    assert len(a.contamination_.set_aside) == round(0.1 * 37) == 4
    assert a.contamination_ == b.contamination_
    assert torch.equal(a.memory_bank_, b.memory_bank_) and a.calibration_ == b.calibration_
    assert a.num_fit_images_ == b.num_fit_images_ == 33 and a.calibration_.num_images == 33
