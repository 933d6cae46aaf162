"""Fit, save, load and predict on real data (battery welds) with pretrained MobileNetV2."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore import ModelFileError, PatchCore
from patchcore.cli import main
from patchcore import data as pc_data
from patchcore.data import training_images
from patchcore.metrics import image_auroc, pixel_auroc


@pytest.fixture(scope="module")
def welds(data_root):
    return data_root / "battery_weld"


@pytest.fixture(scope="module")
def model(welds):
    return PatchCore("mobilenet_v2", progress=False).fit(training_images(welds))


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    return model.save(tmp_path_factory.mktemp("model") / "welds.safetensors")


def test_accuracy_on_battery_welds(model, welds):
    samples = pc_data.list_test_samples(welds)
    predictions = model.predict([s.path for s in samples])
    labels = np.array([s.label for s in samples])
    assert image_auroc(labels, np.array([p.score for p in predictions])) >= 0.95
    from patchcore.data import read_mask

    masks = np.stack([model.geometry.mask_to_input(read_mask(s.mask_path, s.path, p.anomaly_map.shape)) for s, p in zip(samples, predictions)])
    assert pixel_auroc(masks, np.stack([p.input_map for p in predictions])) >= 0.90


def test_held_out_split_and_bank_size(model):
    # 37 images: round(0.1 * 37) = 4 held out, 33 in the bank; 10% of 33 x 32 x 32 patches.
    assert model.calibration_.num_images == 4
    assert model.num_fit_images_ == 33
    assert tuple(model.memory_bank_.shape) == (round(0.1 * 33 * 32 * 32), 128)
    assert model.calibration_.image_threshold > model.calibration_.image_good_mean


def test_same_seed_same_model_and_scores(model, welds, tmp_path):
    again = PatchCore("mobilenet_v2", progress=False).fit(training_images(welds))
    assert torch.equal(again.memory_bank_, model.memory_bank_)
    assert again.calibration_ == model.calibration_
    paths = [s.path for s in pc_data.list_test_samples(welds)[:6]]
    assert [p.score for p in again.predict(paths)] == [p.score for p in model.predict(paths)]


def test_save_load_round_trip_scores_identically(model, model_file, welds):
    loaded = PatchCore.load(model_file, progress=False)
    paths = [s.path for s in pc_data.list_test_samples(welds)[::16]]
    original, reloaded = model.predict(paths), loaded.predict(paths)
    assert [p.score for p in reloaded] == [p.score for p in original]
    assert all(np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in zip(original, reloaded))
    assert loaded.calibration_ == model.calibration_
    assert loaded.settings() == model.settings()


def test_maps_come_at_each_images_own_resolution(model, tmp_path):
    rng = np.random.default_rng(0)
    odd = tmp_path / "odd.png"
    Image.fromarray(rng.integers(0, 255, (123, 517, 3), dtype=np.uint8)).save(odd)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(rng.integers(0, 65535, (300, 200), dtype=np.uint16)).save(sixteen)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(rng.integers(0, 255, (64, 80, 4), dtype=np.uint8), "RGBA").save(rgba)
    predictions = model.predict([odd, sixteen, rgba])
    assert [p.error for p in predictions] == [None, None, None]
    assert [p.anomaly_map.shape for p in predictions] == [(123, 517), (300, 200), (64, 80)]
    assert [p.input_map.shape for p in predictions] == [(256, 256)] * 3


def test_tensor_api(model):
    batch = torch.rand(3, 3, 200, 300, generator=torch.Generator().manual_seed(0))
    scores, maps = model.score(batch)
    assert scores.shape == (3,) and maps.shape == (3, 256, 256)
    predictions = model.predict(batch)
    assert np.allclose([p.score for p in predictions], scores)
    assert predictions[0].anomaly_map.shape == (200, 300)
    assert predictions[0].source == "tensor[0]"


def test_fit_from_tensors(welds):
    images = torch.stack(
        [torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((320, 240)))).permute(2, 0, 1).float() / 255 for p in training_images(welds)[:12]]
    )
    model = PatchCore("mobilenet_v2", progress=False, coreset_ratio=0.05).fit(images)
    assert model.num_fit_images_ == 10 and model.calibration_.num_images == 2
    assert model.memory_bank_.shape == (round(0.05 * 10 * 32 * 32), 128)


def test_predict_command_reports_bad_files_and_scores_the_rest(model_file, welds, tmp_path, capsys):
    folder = tmp_path / "incoming"
    (folder / "line2").mkdir(parents=True)
    good = sorted((welds / "test" / "good").iterdir())[:3]
    for i, source in enumerate(good):
        target = folder / ("line2" if i == 2 else ".") / source.name
        target.write_bytes(source.read_bytes())
    (folder / "notes.txt").write_text("shift 2: lens cleaned\n")
    whole = good[0].read_bytes()
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    assert main(["predict", str(model_file), str(folder), "--out", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 5
    scored = [r for r in records if "score" in r]
    failed = {Path(r["path"]).name: r["error"] for r in records if "error" in r}
    assert len(scored) == 3
    assert sorted(failed) == ["cut.png", "notes.txt"]
    assert "not a readable image" in failed["notes.txt"] and "not a readable image" in failed["cut.png"]
    for record in scored:
        assert set(record) == {"path", "score", "normalized_score", "is_anomalous", "picture"}
        width, height = Image.open(good[0]).size
        picture = Image.open(record["picture"])
        assert picture.size == (width, height + 24)  # the overlay at the image's size, with a caption band
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\nskipped ") + err.startswith("skipped ") == 2 and "scored 3 images, skipped 2" in err


def test_commands_give_one_line_errors(model_file, tmp_path, capsys):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(model_file.read_bytes()[:1000])
    assert main(["predict", str(damaged), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["fit", str(empty), "--out", str(tmp_path / "m.safetensors"), "--backbone", "mobilenet_v2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith(f"patchcore: error: '{damaged}': not a model file, or damaged or truncated")
    assert lines[1].startswith(f"patchcore: error: '{empty}': no images found")
    assert len(lines) == 2
    with pytest.raises(ModelFileError):
        PatchCore.load(damaged)


def test_center_crop_maps_back_to_the_whole_image(welds):
    model = PatchCore("mobilenet_v2", image_size=256, center_crop=224, coreset_ratio=0.02, progress=False)
    model.fit(training_images(welds)[:10])
    assert model.feature_grid_ == (28, 28)
    [prediction] = model.predict([pc_data.list_test_samples(welds)[-1].path])
    height, width = prediction.anomaly_map.shape
    assert prediction.input_map.shape == (224, 224)
    assert (height, width) == Image.open(pc_data.list_test_samples(welds)[-1].path).size[::-1]
    # The model never saw the border outside the crop: it holds the map's minimum there.
    assert float(prediction.anomaly_map[0, 0]) == pytest.approx(float(prediction.input_map.min()), abs=1e-4)
