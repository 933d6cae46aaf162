"""Images that keep their shape (aspect mode), large images in tiles (tile mode), and thresholds
that no test label can touch; all on real data with pretrained MobileNetV2."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from patchcore import PatchCore
from patchcore.cli import main
from patchcore.data import find_images, list_test_samples, training_images
from patchcore.intake import read_mask
from patchcore.metrics import image_auroc, pixel_auroc


@pytest.fixture(scope="module")
def bottle_tiles(data_root, tmp_path_factory):
    """A tile-mode model of 10 bottle images at half resolution (900 -> 448 px: 2 x 2 tiles of 256)."""
    images = training_images(data_root / "mvtec_ad" / "bottle")[:10]
    model = PatchCore("mobilenet_v2", input_mode="tile", scale=0.5, tile_size=256, tile_overlap=64, coreset_ratio=0.05, progress=False)
    return model.fit(images)


def test_tiles_are_stitched_into_one_map_that_finds_a_defect_on_the_seams(bottle_tiles, data_root, tmp_path):
    model = bottle_tiles
    assert model.layout_.tiles((448, 448), model.patch_features_.cell)[-1].top == 192  # tiles at 0 and 192 on each axis
    clean_path = training_images(data_root / "mvtec_ad" / "bottle")[20]  # a good image the model has not seen
    rgb = np.array(Image.open(clean_path).convert("RGB"))
    # A bright 48 px square on the glass, where all four tiles meet (the seams run at 448 px).
    top, left = 426, 426
    rgb[top : top + 48, left : left + 48] = 255
    defect_path = tmp_path / "scratch.png"
    Image.fromarray(rgb).save(defect_path)
    clean, defect = model.predict([clean_path, defect_path])
    assert defect.input_map.shape == (448, 448) and defect.anomaly_map.shape == (900, 900)
    peak = np.unravel_index(np.argmax(defect.anomaly_map), defect.anomaly_map.shape)
    assert top - 24 <= peak[0] < top + 72 and left - 24 <= peak[1] < left + 72
    assert defect.score > 1.5 * clean.score
    assert defect.is_anomalous and not clean.is_anomalous


def test_a_tile_model_saves_loads_and_scores_the_same(bottle_tiles, data_root, tmp_path):
    path = bottle_tiles.save(tmp_path / "tiles.safetensors")
    loaded = PatchCore.load(path, progress=False)
    assert loaded.layout_ == bottle_tiles.layout_ and loaded.layout_.mode == "tile"
    image = training_images(data_root / "mvtec_ad" / "bottle")[30]
    [a], [b] = bottle_tiles.predict([image]), loaded.predict([image])
    assert a.score == b.score and np.array_equal(a.input_map, b.input_map)


def test_aspect_mode_keeps_each_weld_at_its_own_shape_and_scale(data_root):
    welds = data_root / "battery_weld"
    train = training_images(welds)
    model = PatchCore("mobilenet_v2", input_mode="aspect", progress=False).fit(train)
    # Widths 400, heights mostly 256: the median shorter side is 256, so welds go in at native size.
    assert model.layout_.scale == 1.0
    samples = list_test_samples(welds)
    predictions = model.predict([s.path for s in samples])
    shapes = {p.input_map.shape for p in predictions}
    assert (256, 400) in shapes and (96, 400) in shapes  # a 400 x 89 crop goes in as 400 x 96, not squashed
    assert all(p.anomaly_map.shape == Image.open(p.source).size[::-1] for p in predictions)
    labels = np.array([s.label for s in samples])
    masks = [read_mask(s.mask_path, s.path, p.anomaly_map.shape) for s, p in zip(samples, predictions)]
    # Square mode on the same set: image 0.961, pixel 0.924 (benchmarks/quality.py); aspect must not be worse.
    assert image_auroc(labels, np.array([p.score for p in predictions])) >= 0.96
    assert pixel_auroc(masks, [p.anomaly_map for p in predictions]) >= 0.93
    # The bank holds every image's patches: 10% of the sum over images of their own grids.
    patches = sum(int(np.prod(model.patch_features_.grid_hw(model.layout_.input_hw(Image.open(p).size[::-1])))) for p in train)
    assert model.memory_bank_.shape[0] == round(0.1 * patches)


def test_shuffled_test_labels_leave_the_thresholds_unchanged(data_root, tmp_path):
    """`train` on a copy of battery welds whose test images swapped folders at random: the model
    and its thresholds are byte for byte those of the unshuffled run; only the metrics move."""
    source = data_root / "battery_weld"
    shuffled = tmp_path / "shuffled"
    shutil.copytree(source / "train", shuffled / "train")
    samples = list_test_samples(source)
    flip = np.random.default_rng(0).permutation([s.label for s in samples])  # labels dealt out again
    for sample, label in zip(samples, flip):
        kind = "defective" if label else "good"
        target = shuffled / "test" / kind / sample.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample.path, target)
        if label:
            mask_dir = shuffled / "ground_truth" / "defective"
            mask_dir.mkdir(parents=True, exist_ok=True)
            size = Image.open(sample.path).size
            mask = Image.open(sample.mask_path) if sample.mask_path else Image.new("L", size, 0)
            mask.save(mask_dir / f"{sample.path.stem}_mask.png")
    runs = {}
    for name, data in (("original", source), ("shuffled", shuffled)):
        out = tmp_path / name
        assert main(["train", str(data), "--backbone", "mobilenet_v2", "--coreset-ratio", "0.05", "--out", str(out), "--no-pictures", "--quiet"]) == 0
        runs[name] = json.loads((out / "metrics.json").read_text())
    original, again = runs["original"], runs["shuffled"]
    assert (tmp_path / "original" / "model.safetensors").read_bytes() == (tmp_path / "shuffled" / "model.safetensors").read_bytes()
    assert again["image_threshold"] == original["image_threshold"]
    assert again["model"]["calibration"] == original["model"]["calibration"]
    assert again["image_auroc"] < 0.8 < original["image_auroc"]  # the labels did change


def test_fitting_needs_two_readable_images(data_root, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(find_images(data_root / "battery_weld" / "train" / "good")[0], one / "a.png")
    (one / "b.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"^need at least 2 readable good images to fit \(each is scored against the others to set the threshold\), got 1$"):
        PatchCore("mobilenet_v2", progress=False).fit(find_images(one))


def _grain_images(folder, count, height, width, seed):
    """Grey brushed-grain pictures of one size (a stand-in for a line's parts)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(count):
        noise = rng.normal(128, 20, (height, width // 4, 1)).repeat(4, axis=1)  # grain drawn out along the width
        Image.fromarray(np.clip(noise.repeat(3, axis=2), 0, 255).astype(np.uint8)).save(folder / f"{k:02d}.png")
    return folder


@pytest.mark.parametrize("height, width, mode", [(120, 300, "aspect"), (200, 200, "square")])
def test_the_default_input_mode_keeps_long_parts_long_and_records_why(tmp_path, capsys, height, width, mode):
    """A plain `fit` (input mode auto, the default) on long strips keeps their shape, on square
    parts squashes nothing; the model file records the choice and its reason, `fit` prints it,
    and `predict` scores in the chosen mode."""
    good = _grain_images(tmp_path / "good", 12, height, width, seed=height)
    model_path = tmp_path / "model.safetensors"
    assert main(["fit", str(good), "--backbone", "mobilenet_v2", "--image-size", "64", "--coreset-ratio", "0.2", "--out", str(model_path), "--quiet"]) == 0
    printed = capsys.readouterr().err
    model = PatchCore.load(model_path, progress=False)
    assert model.layout_.mode == mode and model.layout_.chosen.startswith(f"auto: {mode}, ")
    assert f"({model.layout_.chosen})" in printed
    expected_input = (64, 160) if mode == "aspect" else (64, 64)  # aspect: the 120 px side becomes 64, the 300 px side 160
    assert main(["predict", str(model_path), str(good / "00.png"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    [line] = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    [prediction] = model.predict([good / "00.png"])
    assert prediction.input_map.shape == expected_input
    assert json.loads(line)["score"] == pytest.approx(prediction.score, rel=1e-6)  # the command scores in the same mode
