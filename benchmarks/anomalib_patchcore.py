"""anomalib 2.7's PatchCore on MVTec AD bottle with torchvision's MobileNetV2, timed: the peer figures.

Runs inside its own virtual environment (anomalib pins its own stack), made and called by
``benchmarks/speed.py --anomalib``:

    .venv-anomalib/bin/python benchmarks/anomalib_patchcore.py --data ../shared/data --weights FILE

Settings as anomalib's defaults for PatchCore, with the backbone given as an ``nn.Module`` (the
same ImageNet weights patchcore uses) tapped at ``features.6`` and ``features.13``: 256 px, no
crop, 10% coreset, 9 neighbours. Prints one JSON line: fit and test wall time, images per second,
peak memory, image and pixel AUROC.

With ``--backbone wide_resnet50_2 --bank BANK.npy`` it scores only, like for like with patchcore's
``predict``: torchvision's Wide ResNet-50 with the weights given (tapped at ``layer2`` and
``layer3``) and the memory bank of a patchcore model fitted with those weights loaded into
anomalib's model in place of its own fit, then ``engine.test`` timed over bottle's 83 test images.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding mvtec_ad/bottle")
    parser.add_argument("--weights", type=Path, required=True, help="the backbone's torchvision weights (mobilenet_v2-b0353104.pth)")
    parser.add_argument("--backbone", default="mobilenet_v2", choices=["mobilenet_v2", "wide_resnet50_2"])
    parser.add_argument("--bank", type=Path, help="score only, with this memory bank (.npy, from a patchcore model file)")
    args = parser.parse_args()

    import torch
    import torchvision
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Patchcore

    backbone = getattr(torchvision.models, args.backbone)()
    backbone.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    layers = ["features.6", "features.13"] if args.backbone == "mobilenet_v2" else ["layer2", "layer3"]
    with tempfile.TemporaryDirectory() as scratch:
        # anomalib writes beside its data; give it a writable copy of the read-only folder.
        root = Path(scratch) / "mvtec_ad"
        shutil.copytree(args.data / "mvtec_ad" / "bottle", root / "bottle")
        datamodule = MVTecAD(root=root, category="bottle", train_batch_size=32, eval_batch_size=32, num_workers=0)
        model = Patchcore(backbone=backbone, layers=layers, pre_trained=False, coreset_sampling_ratio=0.1, num_neighbors=9)
        engine = Engine(accelerator="cpu", devices=1, default_root_dir=Path(scratch) / "results", logger=False, enable_progress_bar=False)
        fit_seconds = None
        if args.bank is not None:
            import numpy as np

            model.model.memory_bank = torch.from_numpy(np.load(args.bank)).float()
        else:
            started = time.perf_counter()
            engine.fit(model=model, datamodule=datamodule)
            fit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        results = engine.test(model=model, datamodule=datamodule)[0]
        test_seconds = time.perf_counter() - started
    test_images = 83
    print(
        json.dumps(
            {
                "backbone": args.backbone,
                "bank": list(model.model.memory_bank.shape),
                "fit_seconds": fit_seconds,
                "test_seconds": test_seconds,
                "scoring_images_per_second": test_images / test_seconds,
                "peak_memory_gb": _peak_memory_gb(),
                "image_auroc": _metric(results, "image", "auroc"),
                "pixel_auroc": _metric(results, "pixel", "auroc"),
                "anomalib_results": {key: float(value) for key, value in results.items()},
            }
        )
    )


def _peak_memory_gb() -> float:
    """Peak resident memory of this process (VmHWM, which unlike ru_maxrss starts afresh at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _metric(results: dict, level: str, name: str) -> float | None:
    """A metric from anomalib's test results, whose key spelling has changed between releases."""
    for key, value in results.items():
        if key.lower().startswith(level) and name in key.lower():
            return float(value)
    return None


if __name__ == "__main__":
    main()
