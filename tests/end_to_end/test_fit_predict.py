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
    # the square mode, whose 32 x 32 grid the checks below count on (the default, auto, keeps the welds' shapes)
    return PatchCore("mobilenet_v2", input_mode="square", progress=False).fit(training_images(welds))


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    return model.save(tmp_path_factory.mktemp("model") / "welds.safetensors")


def test_accuracy_on_battery_welds(model, welds):
    samples = pc_data.list_test_samples(welds)
    predictions = model.predict([s.path for s in samples])
    labels = np.array([s.label for s in samples])
    assert image_auroc(labels, np.array([p.score for p in predictions])) >= 0.95
    from patchcore.intake import read_mask

    # On the grid the masks are on: each image's own size (400 x 89 .. 400 x 392 here).
    masks = [read_mask(s.mask_path, s.path, p.anomaly_map.shape) for s, p in zip(samples, predictions)]
    assert len({m.shape for m in masks}) > 10
    assert pixel_auroc(masks, [p.anomaly_map for p in predictions]) >= 0.90


def test_every_image_is_in_the_bank_and_scored_without_it(model):
    # 37 images, all in the bank: 10% of 37 x 32 x 32 patches; all 37 set the threshold.
    assert model.num_fit_images_ == 37 and model.calibration_.num_images == 37
    assert tuple(model.memory_bank_.shape) == (round(0.1 * 37 * 32 * 32), 128)
    assert model.calibration_.image_threshold > model.calibration_.image_good_mean
    # Left-out scores are those of unseen images: far above what an image gets against a bank
    # holding its own patches.
    seen = np.array([p.score for p in model.predict(model.calibration_sources_[:5])])
    assert (np.array(model.calibration_.good_scores[:5]) > 1.5 * seen).all()


def test_same_seed_same_model_and_scores(model, welds, tmp_path):
    again = PatchCore("mobilenet_v2", input_mode="square", progress=False).fit(training_images(welds))
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
    assert model.num_fit_images_ == 12 and model.calibration_.num_images == 12
    assert model.memory_bank_.shape == (round(0.05 * 12 * 32 * 32), 128)


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
    assert failed["notes.txt"] == f"'{folder / 'notes.txt'}': not an accepted image format (not an image; accepted: PNG, JPEG, BMP, TIFF, WebP, PNM)"
    assert failed["cut.png"].startswith(f"'{folder / 'cut.png'}': not a readable image (")
    for record in scored:
        assert set(record) == {"path", "score", "normalized_score", "is_anomalous", "threshold", "image_size", "regions", "picture"}
        width, height = Image.open(good[0]).size
        picture = Image.open(record["picture"])
        assert picture.size == (width, height + 24)  # the overlay at the image's size, with a caption band
        assert picture.format == "JPEG" and record["picture"].endswith(".jpg")  # the default
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\nskipped ") + err.startswith("skipped ") == 2 and "scored 3 images, skipped 2" in err


def test_predict_writes_lossless_pictures_when_asked(model_file, welds, tmp_path):
    from patchcore.render import predict_picture

    image = sorted((welds / "test" / "good").iterdir())[0]
    out = tmp_path / "out"
    assert main(["predict", str(model_file), str(image), "--out", str(out), "--quiet", "--picture-format", "png"]) == 0
    record = json.loads((out / "predictions.jsonl").read_text())
    assert record["picture"] == str(out / "images" / f"{image.stem}.png")
    # Lossless: the very pixels the renderer drew.
    model = PatchCore.load(model_file, progress=False)
    prediction = next(model.iter_predictions([image], keep_images=True))
    drawn = predict_picture(prediction.image, prediction.map_at, model.calibration_, prediction.score, prediction.is_anomalous)
    assert np.array_equal(np.asarray(Image.open(record["picture"]).convert("RGB")), drawn)


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
    assert model.layout_.input_hw((256, 400)) == (224, 224) and model.patch_features_.grid_hw((224, 224)) == (28, 28)
    [prediction] = model.predict([pc_data.list_test_samples(welds)[-1].path])
    height, width = prediction.anomaly_map.shape
    assert prediction.input_map.shape == (224, 224)
    assert (height, width) == Image.open(pc_data.list_test_samples(welds)[-1].path).size[::-1]
    # The model never saw the border outside the crop: it holds the map's minimum there.
    assert float(prediction.anomaly_map[0, 0]) == pytest.approx(float(prediction.input_map.min()), abs=1e-4)


def _as_format_1(model_file, target):
    """The same model written as patchcore 0.1 wrote it: model format 1, square settings, and the
    five numbers of the held-out calibration."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from patchcore.storage import tensors_sha256

    with safe_open(str(model_file), framework="pt") as handle:
        settings = json.loads(handle.metadata()["patchcore"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    calibration = settings["calibration"]
    old = {key: settings[key] for key in ("package_version", "backbone", "layers", "coreset_ratio", "num_neighbors", "index", "seed", "num_fit_images", "memory_bank_shape", "backbone_weights_sha256")}
    old |= {"image_size": 256, "center_crop": None, "calibration_fraction": 0.1, "feature_grid": [32, 32], "package_version": "0.1.0"}
    old["calibration"] = {key: calibration[key] for key in ("image_threshold", "image_good_mean", "pixel_threshold", "pixel_good_mean")} | {"num_images": 4}
    old |= {"format_version": 1, "tensors_sha256": tensors_sha256(tensors)}
    save_file(tensors, str(target), metadata={"patchcore": json.dumps(old)})
    return target


def test_a_format_1_model_still_scores_and_says_how_to_choose_a_rate(model, model_file, welds, tmp_path, capsys):
    old_file = _as_format_1(model_file, tmp_path / "old.safetensors")
    old = PatchCore.load(old_file, progress=False)
    assert old.calibration_.image_threshold == model.calibration_.image_threshold
    assert old.calibration_.describe().endswith("the highest score of 4 held-out good images (model format 1)")
    paths = [s.path for s in pc_data.list_test_samples(welds)[::20]]
    assert [p.score for p in old.predict(paths)] == [p.score for p in model.predict(paths)]
    assert main(["predict", str(old_file), str(paths[0]), "--out", str(tmp_path / "o"), "--quiet", "--no-pictures"]) == 0
    assert main(["predict", str(old_file), str(paths[0]), "--out", str(tmp_path / "o"), "--quiet", "--false-alarm-rate", "0.1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"patchcore: error: '{old_file}': this model stores no good-image scores (model format 1, thresholds from held-out images): "
        "refit it with `patchcore fit` to choose a false-alarm rate"
    )


def test_predict_at_another_false_alarm_rate_moves_the_cut_without_refitting(model_file, welds, tmp_path, capsys):
    paths = [str(s.path) for s in pc_data.list_test_samples(welds)]
    out = {}
    for rate in ("0.05", "0.3"):
        assert main(["predict", str(model_file), *paths, "--out", str(tmp_path / rate), "--quiet", "--no-pictures", "--false-alarm-rate", rate]) == 0
        out[rate] = [json.loads(line) for line in (tmp_path / rate / "predictions.jsonl").read_text().splitlines()]
    assert [r["score"] for r in out["0.05"]] == [r["score"] for r in out["0.3"]]
    flagged = {rate: sum(r["is_anomalous"] for r in records) for rate, records in out.items()}
    assert flagged["0.3"] > flagged["0.05"] + 20  # a looser cut flags many more welds
    err = capsys.readouterr().err
    assert "for a 30.0% false-alarm rate, set on 37 good images scored leave-one-out" in err


def test_beyond_the_calibration_cap_a_seeded_sample_sets_the_threshold(welds, monkeypatch):
    monkeypatch.setattr("patchcore.fitting.CALIBRATION_IMAGES", 10)
    images = training_images(welds)[:15]
    model = PatchCore("mobilenet_v2", progress=False, coreset_ratio=0.05).fit(images)
    assert model.num_fit_images_ == 15  # the bank still holds all 15
    assert model.calibration_.num_images == 10 and len(model.calibration_sources_) == 10
    assert set(model.calibration_sources_) < {str(p) for p in images}
    again = PatchCore("mobilenet_v2", progress=False, coreset_ratio=0.05).fit(images)
    assert again.calibration_sources_ == model.calibration_sources_  # the sample is seeded


def test_leave_one_out_scores_equal_brute_force_without_the_images_own_bank_entries(model):
    """For a few training images: find the bank entries that are the image's own patches, take
    them out, and score the image by brute force (float64 distances, eq. 7 written out)."""
    import math

    from patchcore.intake import read_image
    from patchcore.maps import anomaly_maps

    bank = model.memory_bank_.double()
    for image in (0, 17, 36):
        source = model.calibration_sources_[image]
        batch = torch.from_numpy(model.layout_.image_to_array(read_image(source)))[None]
        features = model.patch_features_.of_inputs(batch, model.layout_)[0]
        grid = features.shape[:2]
        patches = features.reshape(-1, features.shape[-1]).double()
        distances = torch.cdist(patches, bank)
        own = (distances < 1e-3).any(dim=0)  # the bank's copies of this image's patches
        assert int(own.sum()) > 50  # 10% of its 1,024 patches, give or take the greedy picks
        kept = torch.where(own, math.inf, distances)
        nearest_distance, nearest = kept.min(dim=1)
        worst = int(nearest_distance.argmax())
        s_star = float(nearest_distance[worst])
        around = torch.where(own, math.inf, torch.cdist(bank[nearest[worst]][None], bank)[0])
        neighbourhood = around.topk(9, largest=False).indices
        denominator = sum(math.exp(float(torch.dist(patches[worst], bank[m]))) for m in neighbourhood)
        expected = (1 - math.exp(s_star) / denominator) * s_star
        assert model.calibration_.good_scores[image] == pytest.approx(expected, rel=1e-4)
        peak = float(anomaly_maps(nearest_distance.float().reshape(1, *grid), tuple(batch.shape[-2:])).max())
        assert model.calibration_.good_map_peaks[image] == pytest.approx(peak, rel=1e-4)


def test_a_one_image_predict_scans_and_a_folder_builds_the_bounds_with_the_same_scores(model_file, welds):
    # A fast start (issue 23): predicting one image does not build the search's cells (0.9 s on
    # bottle), and its results are those of an image scored among many. Caught: the expect() call
    # in iter_predictions removed (the one image builds them).
    paths = [s.path for s in pc_data.list_test_samples(welds)][:6]
    one = PatchCore.load(model_file, device="cpu", progress=False)
    first = one.predict(paths[:1])[0]
    assert one.index_._bounds is None
    rest = one.predict(paths[1:])  # 5 x 1,024 patches: the bounds pay, and are built
    assert one.index_._bounds is not None
    together = PatchCore.load(model_file, device="cpu", progress=False).predict(paths)
    assert [p.score for p in [first, *rest]] == [p.score for p in together]
    assert np.array_equal(first.anomaly_map, together[0].anomaly_map)
