"""anomalib 2.7's PatchCore on any train list and test list (a JSON spec), with torchvision's MobileNetV2.

Runs inside anomalib's own virtual environment:

    .venv-anomalib/bin/python benchmarks/anomalib_folder.py --spec SPEC.json --weights FILE

SPEC.json: ``{"name": ..., "train": [path, ...], "test": [{"path", "label": 0|1, "mask": path|null}, ...]}``.
Every train image is treated as normal, defective or not (a "dirty" training folder). The images
are symlinked, under running-number names (source names may collide), into the layout of
anomalib's ``Folder`` datamodule: train to ``normal_dir``, good test images to ``normal_test_dir``,
defective ones to ``abnormal_dir`` and their masks to ``mask_dir`` under the same stem. anomalib
pairs masks with defective images by sorted name, so once any defective image has a mask, those
without one get an all-zero mask of their size (with no masks at all, ``mask_dir`` is left out).

Settings as ``anomalib_patchcore.py``: the backbone as an ``nn.Module`` tapped at ``features.6``
and ``features.13``, 256 px, no crop, 10% coreset, 9 neighbours, CPU. The validation split is the
test set itself (``val_split_mode="same_as_test"``): anomalib's F1AdaptiveThreshold and its
min-max normalisation are computed there, so the threshold is tuned on the labelled test set.

Figures are computed here, not taken from anomalib's metrics: image AUROC from the raw
``pred_score`` and pixel AUROC from the raw ``anomaly_map`` (both captured off the torch model
before anomalib's normalisation, which clamps to [0, 1] and so would tie scores), the map
bilinearly resized to each image's own size and scored against its mask (> 0 is defect) at native
resolution; good images count as all-normal, defective images without a mask are left out of the
pixel AUROC. ``image_f1_at_own_threshold`` is the F1 of anomalib's ``pred_label``, obtained by
passing the raw outputs through anomalib's own post-processor. ``fit_seconds`` is feature
extraction plus coreset (up to the first validation batch); ``engine_fit_seconds`` adds anomalib's
validation pass over the test set. anomalib's own test metrics are printed too, as a cross-check.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, required=True, help="JSON: name, train paths, test entries")
    parser.add_argument("--weights", type=Path, required=True, help="torchvision's mobilenet_v2-b0353104.pth")
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())
    # glibc raises its mmap threshold as large blocks are freed; anomalib's k-center-greedy loop then
    # grows the heap by one feature-sized block per step when that block is under 32 MB (cookies:
    # 30 MB a step, killed at 24 GB). A fixed threshold (as MALLOC_MMAP_THRESHOLD_ would set) stops it.
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except OSError:
        pass

    import numpy as np
    import torch
    import torchvision
    from anomalib.data import Folder
    from anomalib.data.dataclasses import InferenceBatch
    from anomalib.engine import Engine
    from anomalib.models import Patchcore
    from lightning.pytorch import Callback
    from PIL import Image
    from sklearn.metrics import f1_score, roc_auc_score

    backbone = torchvision.models.mobilenet_v2()
    backbone.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    test = spec["test"]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        dirs = {name: root / name for name in ("train", "good", "defect", "mask")}
        for folder in dirs.values():
            folder.mkdir()
        for number, path in enumerate(spec["train"]):
            (dirs["train"] / f"{number:06d}{Path(path).suffix}").symlink_to(path)
        any_mask = any(entry["label"] and entry["mask"] for entry in test)
        for number, entry in enumerate(test):
            stem = f"{number:06d}"
            (dirs["defect" if entry["label"] else "good"] / (stem + Path(entry["path"]).suffix)).symlink_to(entry["path"])
            if entry["label"] and any_mask:
                if entry["mask"]:
                    (dirs["mask"] / (stem + Path(entry["mask"]).suffix)).symlink_to(entry["mask"])
                else:
                    Image.new("L", Image.open(entry["path"]).size).save(dirs["mask"] / f"{stem}.png")
        has_defect = any(entry["label"] for entry in test)
        datamodule = Folder(
            name=spec["name"],
            root=root,
            normal_dir="train",
            normal_test_dir="good",
            abnormal_dir="defect" if has_defect else None,
            mask_dir="mask" if any_mask else None,
            train_batch_size=32,
            eval_batch_size=32,
            num_workers=0,
            val_split_mode="same_as_test",
        )
        model = Patchcore(backbone=backbone, layers=["features.6", "features.13"], pre_trained=False, coreset_sampling_ratio=0.1, num_neighbors=9)
        clock = _clock(Callback)()
        engine = Engine(accelerator="cpu", devices=1, default_root_dir=root / "results", logger=False, enable_progress_bar=False, callbacks=[clock])
        started = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        engine_fit_seconds = time.perf_counter() - started
        # Capture the raw outputs of the torch model (before normalisation) and the test order.
        raw: list = []
        hook = model.model.register_forward_hook(lambda _module, _inputs, output: raw.append(output))
        results = engine.test(model=model, datamodule=datamodule)[0]
        hook.remove()

    order = [int(Path(path).stem) for path in clock.test_paths]
    assert sorted(order) == list(range(len(test))), "test images seen do not match the spec"
    scores = torch.cat([output.pred_score.flatten() for output in raw])
    maps = torch.cat([output.anomaly_map.reshape(-1, 1, *output.anomaly_map.shape[-2:]) for output in raw])
    # anomalib's own labels: its post-processor on the raw outputs (normalise, then threshold).
    labels_pred = model.post_processor(InferenceBatch(pred_score=scores, anomaly_map=maps)).pred_label
    labels = np.array([test[i]["label"] for i in order])
    pixel_truth, pixel_scores = [], []
    for index, anomaly_map in zip(order, maps):
        entry = test[index]
        if entry["label"] and not entry["mask"]:
            continue
        width, height = Image.open(entry["path"]).size
        truth = np.array(Image.open(entry["mask"]).convert("L")) > 0 if entry["label"] else np.zeros((height, width), bool)
        resized = torch.nn.functional.interpolate(anomaly_map[None], size=truth.shape, mode="bilinear", align_corners=False)
        pixel_truth.append(truth.ravel())
        pixel_scores.append(resized.numpy().ravel())
    pixel_truth = np.concatenate(pixel_truth) if pixel_truth else np.zeros(0, bool)
    pixel_auroc = float(roc_auc_score(pixel_truth, np.concatenate(pixel_scores))) if 0 < pixel_truth.sum() < pixel_truth.size else None
    two_classes = len(set(labels.tolist())) == 2
    print(
        json.dumps(
            {
                "name": spec["name"],
                "fit_seconds": clock.fit_seconds,
                "engine_fit_seconds": engine_fit_seconds,
                "image_auroc": float(roc_auc_score(labels, scores.numpy())) if two_classes else None,
                "pixel_auroc": pixel_auroc,
                "image_f1_at_own_threshold": float(f1_score(labels, labels_pred.numpy().astype(int), zero_division=0)),
                "own_threshold_note": "anomalib's F1AdaptiveThreshold, tuned on the labelled test set",
                "num_train": len(spec["train"]),
                "num_test": len(test),
                "bank": list(model.model.memory_bank.shape),
                "anomalib_results": {key: float(value) for key, value in results.items()},
            }
        )
    )


def _clock(callback: type) -> type:
    """A Lightning callback that times training up to the first validation batch and records the test order."""

    class Clock(callback):
        def __init__(self) -> None:
            self.started = self.fit_seconds = None
            self.test_paths: list[str] = []

        def on_fit_start(self, trainer, pl_module) -> None:
            self.started = time.perf_counter()

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            # The memory bank and its coreset are built in on_validation_start, just before this.
            if self.fit_seconds is None:
                self.fit_seconds = time.perf_counter() - self.started

        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            self.test_paths.extend(batch.image_path)

    return Clock


if __name__ == "__main__":
    main()
