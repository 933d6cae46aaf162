"""Fits that scale: a bank-size budget, features streamed to a temporary file, clean interruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from patchcore import PatchCore
from patchcore.cli import main
from patchcore.data import training_images


@pytest.fixture(scope="module")
def welds_images(data_root) -> list[Path]:
    return training_images(data_root / "battery_weld")


def test_bank_size_of_ten_percent_gives_the_coreset_ratio_bank(bottle_model_file, data_root, tmp_path):
    ratio_model = PatchCore.load(bottle_model_file, progress=False)
    # 10% of 209 x 32 x 32 patches are selected (21,402); then the contamination check takes
    # 132.png's entries out and repairs the cover: 21,238. A bank size of 21,402 does the same.
    assert round(0.1 * 209 * 32 * 32) == 21402 and ratio_model.memory_bank_.shape[0] == 21238
    out = tmp_path / "sized.safetensors"
    assert main(["fit", str(data_root / "mvtec_ad" / "bottle"), "--backbone", "mobilenet_v2", "--bank-size", "21402", "--out", str(out), "--quiet"]) == 0
    sized = PatchCore.load(out, progress=False)
    assert torch.equal(sized.memory_bank_, ratio_model.memory_bank_)
    assert sized.calibration_ == ratio_model.calibration_
    assert sized.settings()["bank_size"] == 21402 and ratio_model.settings()["bank_size"] is None


def test_a_bank_size_keeps_that_many_entries_and_updates_at_the_share_it_came_to(welds_images, tmp_path):
    first, later = welds_images[:25], welds_images[25:]
    model = PatchCore("mobilenet_v2", bank_size=1500, input_mode="square", progress=False).fit(first)
    assert tuple(model.memory_bank_.shape) == (1500, 128)
    assert model.fit_disk_bytes_ == 25 * 32 * 32 * 128 * 4  # every patch, float32 (no wider than the projection)
    path = model.save(tmp_path / "m.safetensors")
    loaded = PatchCore.load(path, progress=False)
    assert loaded.bank_size == 1500 and loaded.coreset_ratio_ == pytest.approx(1500 / (25 * 1024))
    loaded.update(later)
    assert loaded.memory_bank_.shape[0] == 1500 + round(1500 / (25 * 1024) * 12 * 1024) == 2220
    # A budget above the patches there are keeps them all.
    everything = PatchCore("mobilenet_v2", bank_size=10**9, input_mode="square", progress=False).fit(first[:3])
    assert everything.memory_bank_.shape[0] == 3 * 1024


def test_bank_size_and_ratio_exclude_each_other(data_root, tmp_path, capsys):
    with pytest.raises(ValueError, match="give a coreset ratio or a bank size, not both"):
        PatchCore("mobilenet_v2", coreset_ratio=0.1, bank_size=100)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match=f"bank size must be a whole number of entries, at least 1, got {bad}"):
            PatchCore("mobilenet_v2", bank_size=bad)
    with pytest.raises(SystemExit):
        main(["fit", str(data_root / "battery_weld"), "--out", str(tmp_path / "m.safetensors"), "--bank-size", "100", "--coreset-ratio", "0.1"])
    assert "argument --coreset-ratio: not allowed with argument --bank-size" in capsys.readouterr().err


def _feature_files_open(pid: int, folder: Path) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(folder))
        except OSError:
            pass
    return count


@pytest.mark.parametrize("later_s", [0.0, 6.0])
def test_an_interrupted_fit_leaves_no_temporary_files_and_no_model(data_root, tmp_path, later_s):
    temp, out = tmp_path / "temp", tmp_path / "out"
    temp.mkdir()
    out.mkdir()
    command = [sys.executable, "-m", "patchcore.cli", "fit", str(data_root / "mvtec_ad" / "bottle"), "--backbone", "mobilenet_v2",
               "--out", str(out / "bottle.safetensors"), "--temp-dir", str(temp), "--quiet"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # Wait until the features are being written to the folder asked for (the file has no name:
    # it shows only among the process's open files).
    while _feature_files_open(process.pid, temp) == 0:
        assert process.poll() is None and time.monotonic() < deadline, "the fit never opened its feature file"
        time.sleep(0.05)
    time.sleep(later_s)  # while extracting features, or later (selecting the coreset or calibrating)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == "patchcore: interrupted"
    assert list(temp.iterdir()) == [] and list(out.iterdir()) == []
