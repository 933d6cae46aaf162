"""`patchcore fit --update`: add good images to a model without refitting, safely."""

import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from patchcore import PatchCore
from patchcore.cli import main
from patchcore.data import find_images


@pytest.fixture(scope="module")
def fitted(data_root, tmp_path_factory):
    """A model of 20 battery-weld training images, and 12 other good images it has never seen."""
    root = tmp_path_factory.mktemp("update")
    train = sorted(find_images(data_root / "battery_weld" / "train" / "good"))
    first, later = root / "first", root / "later"
    for folder, paths in ((first, train[:20]), (later, train[20:32])):
        folder.mkdir()
        for path in paths:
            (folder / path.name).symlink_to(path)
    model_file = root / "welds.safetensors"
    assert main(["fit", str(first), "--backbone", "mobilenet_v2", "--input-mode", "square", "--out", str(model_file), "--quiet"]) == 0
    return model_file, later


def test_update_adds_the_new_images_and_they_score_low(fitted, tmp_path):
    model_file, later = fitted
    copy = tmp_path / "m.safetensors"
    copy.write_bytes(model_file.read_bytes())
    before = PatchCore.load(copy, progress=False)
    new_images = find_images(later)
    scores_before = np.array([p.score for p in before.predict(new_images)])

    assert main(["fit", str(later), "--out", str(copy), "--update", "--quiet"]) == 0
    after = PatchCore.load(copy, progress=False)
    # The bank grows by the coreset ratio of the new patches: 10% of 12 x 32 x 32.
    assert after.memory_bank_.shape[0] == before.memory_bank_.shape[0] + round(0.1 * 12 * 32 * 32)
    assert after.num_fit_images_ == before.num_fit_images_ + 12
    assert np.array_equal(after.memory_bank_[: before.memory_bank_.shape[0]].numpy(), before.memory_bank_.numpy())
    # The cut is set again on all 32 images: the first 20 keep their stored leave-one-out scores,
    # the 12 new ones are scored against the grown bank without their own entries.
    assert after.calibration_.num_images == 32
    assert after.calibration_.good_scores[:20] == before.calibration_.good_scores
    assert after.calibration_.false_alarm_rate == before.calibration_.false_alarm_rate == 0.05
    new_loo = np.array(after.calibration_.good_scores[20:])
    assert (new_loo > 0.5 * scores_before).all() and (new_loo < 2 * scores_before).all()  # unseen-like, not near zero
    scores_after = np.array([p.score for p in after.predict(new_images)])
    # Now in the bank's coverage: every new good image scores lower, and none is flagged.
    assert (scores_after < scores_before).all()
    assert (scores_after < after.calibration_.image_threshold).all()
    assert scores_after.mean() < 0.8 * scores_before.mean()


def test_update_needs_an_existing_model(fitted, tmp_path, capsys):
    _, later = fitted
    missing = tmp_path / "none.safetensors"
    assert main(["fit", str(later), "--out", str(missing), "--update", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"patchcore: error: '{missing}': no model to update (fit one first, without --update)"


def test_a_failure_while_writing_leaves_the_old_model(fitted, tmp_path, monkeypatch):
    model_file, later = fitted
    copy = tmp_path / "m.safetensors"
    original = model_file.read_bytes()
    copy.write_bytes(original)

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 1000)
        raise KeyboardInterrupt  # the operator pressed Ctrl-C mid-write

    monkeypatch.setattr("patchcore.storage.save_file", write_half_then_fail)
    assert main(["fit", str(later), "--out", str(copy), "--update", "--quiet"]) == 130
    assert copy.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no partial file left
    assert PatchCore.load(copy, progress=False).memory_bank_.shape[0] > 0


def read_until(process: subprocess.Popen, marker: bytes, timeout: float) -> bytes:
    """The process's stderr up to and including the first ``marker``; fails after ``timeout`` s
    or when the process ends first. Progress bars redraw with carriage returns, not newlines,
    so the pipe is read in raw chunks as they come."""
    seen, deadline = b"", time.monotonic() + timeout
    descriptor = process.stderr.fileno()
    while marker not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([descriptor], [], [], left)[0]:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"no {marker!r} on stderr within {timeout} s: {seen.decode(errors='replace')[-2000:]}")
        chunk = os.read(descriptor, 65536)
        if not chunk:
            pytest.fail(f"the process ended (status {process.wait()}) before {marker!r}: {seen.decode(errors='replace')[-2000:]}")
        seen += chunk
    return seen


def test_a_killed_update_leaves_the_old_model_and_nothing_else(fitted, tmp_path):
    model_file, later = fitted
    copy = tmp_path / "m.safetensors"
    original = model_file.read_bytes()
    copy.write_bytes(original)
    # Progress bars on (no --quiet), the temporary features in tmp_path, so that any leftover shows.
    command = [sys.executable, "-m", "patchcore.cli", "fit", str(later), "--out", str(copy), "--update", "--temp-dir", str(tmp_path)]
    process = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE)
    try:
        # The coreset bar starts once every new image's features are on disk: the update is then
        # mid-way, with the bank not yet grown, scored or written. A fixed sleep could land before
        # the model had even loaded on a busy machine.
        read_until(process, b"coreset", timeout=300)
        assert process.poll() is None, "the update finished before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        process.stderr.close()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # Killed mid-way: the old model, byte for byte, and no partial model or features file beside it.
    assert copy.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert PatchCore.load(copy, progress=False).num_fit_images_ == 20
