"""Exported models against the PyTorch model on MVTec AD bottle's 83 test images: scores, maps,
decisions and metrics, each engine scoring the same prepared batches (speed and memory:
export_speed.py).

    .venv/bin/python benchmarks/export_parity.py [--model FILE] [--data ../shared/data] [--out benchmarks/results]

Without ``--model`` a MobileNetV2 bottle model is fitted first. The model is exported with
``patchcore export`` to ONNX and to OpenVINO (into a temporary folder); the 83 images are decoded
and prepared once, with the library's code, and scored in batches of 8 by PyTorch
(``PatchCore.score``), ONNX Runtime and OpenVINO (compiled with the export's float32 setting). The
maps on the input grid are brought to each mask's 900 x 900 grid the library's way for the pixel
metrics. Writes export_parity.json and export_parity.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from provenance import describe, headline, provenance, stamped  # benchmarks/provenance.py: this folder is on sys.path when run as a script

from patchcore import PatchCore
from patchcore.data import list_test_samples, prepare_image
from patchcore.intake import read_image, read_mask
from patchcore.metrics import image_auroc, pixel_auroc

REPO = Path(__file__).resolve().parents[1]
BATCH = 8


def score_all(run, batches) -> tuple[np.ndarray, np.ndarray]:
    outputs = [run(batch) for batch in batches]
    return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PATCHCORE_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    fields = provenance()
    bottle = args.data / "mvtec_ad" / "bottle"
    scratch = Path(tempfile.mkdtemp(prefix="export_parity."))
    model_file = args.model
    if model_file is None:
        model_file = scratch / "bottle.safetensors"
        subprocess.run([sys.executable, "-m", "patchcore.cli", "fit", str(bottle), "--backbone", "mobilenet_v2", "--out", str(model_file), "--quiet"], check=True)
    for fmt, out in (("onnx", scratch / "bottle.onnx"), ("openvino", scratch / "ov" / "bottle.xml")):
        subprocess.run([sys.executable, "-m", "patchcore.cli", "export", str(model_file), "--format", fmt, "--out", str(out)], check=True)

    import onnxruntime
    import openvino

    model = PatchCore.load(model_file, device="cpu", progress=False)
    samples = list_test_samples(bottle)
    rgbs = [read_image(s.path) for s in samples]
    prepared = torch.from_numpy(np.stack([prepare_image(s.path, rgb, model.layout_).array for s, rgb in zip(samples, rgbs)]))
    batches = list(prepared.split(BATCH))
    session = onnxruntime.InferenceSession(str(scratch / "bottle.onnx"), providers=["CPUExecutionProvider"])
    settings = json.loads((scratch / "ov" / "bottle.json").read_text())
    compiled = openvino.Core().compile_model(str(scratch / "ov" / "bottle.xml"), "CPU", settings["openvino_compile_config"])

    def run_openvino(batch):
        outputs = compiled(batch.numpy())
        return outputs[0], outputs[1]

    engines = {
        "pytorch": lambda batch: _score_prepared(model, batch),
        "onnxruntime": lambda batch: tuple(session.run(None, {"images": batch.numpy()})),
        "openvino": run_openvino,
    }
    labels = np.array([s.label for s in samples])
    masks = [read_mask(s.mask_path, s.path, rgb.shape[:2]) for s, rgb in zip(samples, rgbs)]
    threshold = model.calibration_.image_threshold
    results: dict = {}
    for name, run in engines.items():
        scores, maps = score_all(run, batches)
        full = [model.layout_.map_to_image(m, rgb.shape[:2]) for m, rgb in zip(maps, rgbs)]
        results[name] = {
            "scores": scores, "maps": maps,
            "image_auroc": image_auroc(labels, scores),
            "pixel_auroc": pixel_auroc(masks, full),
            "decisions": scores >= threshold,
        }
    reference = results["pytorch"]
    span = float(reference["maps"].max() - reference["maps"].min())
    fields["machine"].update(onnxruntime=onnxruntime.__version__, openvino=openvino.__version__)
    summary = stamped(fields, {"model": str(model_file), "images": len(samples), "batch": BATCH, "map_range": span, "engines": {}})
    for name, result in results.items():
        summary["engines"][name] = {
            "image_auroc": round(result["image_auroc"], 6),
            "pixel_auroc": round(result["pixel_auroc"], 6),
            "max_relative_score_difference": float(np.max(np.abs(result["scores"] - reference["scores"]) / reference["scores"])),
            "max_map_difference": float(np.abs(result["maps"] - reference["maps"]).max()),
            "max_map_difference_of_range": float(np.abs(result["maps"] - reference["maps"]).max() / span),
            "decisions_differing": int((result["decisions"] != reference["decisions"]).sum()),
        }
    checks = {
        name: e["max_relative_score_difference"] <= 1e-4 and e["max_map_difference_of_range"] < 1e-3 and e["decisions_differing"] == 0
        and f"{e['image_auroc']:.3f}" == f"{summary['engines']['pytorch']['image_auroc']:.3f}"
        and f"{e['pixel_auroc']:.3f}" == f"{summary['engines']['pytorch']['pixel_auroc']:.3f}"
        for name, e in summary["engines"].items()
    }
    summary["checks_pass"] = checks
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_parity.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"Machine: {describe(summary['machine'])}. Command: {headline(summary)}. Model: MobileNetV2 on MVTec AD bottle; its {len(samples)} test images, batches of {BATCH}, decoded and prepared once by the library.",
        "",
        "| engine | image AUROC | pixel AUROC | max relative score difference | max map difference (of the map's range) | decisions differing | parity checks |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in summary["engines"].items():
        lines.append(
            f"| {name} | {e['image_auroc']:.3f} | {e['pixel_auroc']:.3f} | "
            f"{e['max_relative_score_difference']:.1e} | {e['max_map_difference']:.1e} ({e['max_map_difference_of_range']:.1e}) | {e['decisions_differing']} | {'pass' if checks[name] else 'FAIL'} |"
        )
    (args.out / "export_parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _score_prepared(model: PatchCore, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    scores, maps = model.score_inputs(batch)
    return scores.numpy(), maps.numpy()


if __name__ == "__main__":
    main()
