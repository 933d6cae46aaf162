"""Speed and peak memory of scoring on the CPU: PyTorch against the exported model in ONNX Runtime
and in OpenVINO, for MobileNetV2 and Wide ResNet-50, in one run.

    .venv/bin/python benchmarks/export_speed.py [--model mobilenet_v2=FILE] [--model wide_resnet50_2=FILE]
                                                 [--rounds 3] [--data ../shared/data] [--out benchmarks/results]

A backbone without ``--model`` is fitted on MVTec AD bottle's 209 good images first (10% coreset,
seed 42): MobileNetV2 with its ImageNet weights; Wide ResNet-50 with random weights saved on the
spot (none can be downloaded here), which gives the real network's cost and bank size but not its
accuracy: its figures are for timing only. Each model is exported with ``patchcore export`` to
ONNX and to OpenVINO.

Bottle's 83 test images are decoded and prepared once by the library and saved; every engine
scores exactly those arrays, in batches of 8, in a fresh process of its own, so that its peak
memory (the process's peak resident set: the interpreter, the libraries, the model and the work)
is its own. PyTorch scores with ``PatchCore`` (faiss search), the exports with
``patchcore.runtime.ExportedModel``, as users run them. Speed: each process scores one batch to
warm up, then all 83 images once; the engines take turns for ``--rounds`` rounds and each
engine's fastest round counts, so that a slow moment of the shared machine does not land on one
engine only. Writes export_speed.json and export_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from provenance import describe, headline, provenance, stamped  # benchmarks/provenance.py: this folder is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
BATCH = 8
ENGINES = ("pytorch", "onnxruntime", "openvino")
BACKBONES = ("mobilenet_v2", "wide_resnet50_2")


def resident_mb(field: str = "VmRSS") -> float:
    """This process's resident set now (VmRSS), or its peak so far (VmHWM), in MB (Linux). Not
    getrusage's ru_maxrss: Linux carries that across exec, so a child started by a large parent
    would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(engine: str, model_path: str, images_path: str) -> None:
    """One engine in its own process: load, warm up, score every image once; print a JSON line."""
    started = time.perf_counter()
    if engine == "pytorch":
        import torch

        from patchcore import PatchCore

        model = PatchCore.load(model_path, device="cpu", progress=False)

        def score(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model.score_inputs(torch.from_numpy(batch))[0].numpy()
    else:
        from patchcore.runtime import ExportedModel

        exported = ExportedModel(model_path)

        def score(batch: np.ndarray) -> np.ndarray:
            return exported.score(batch)[0]
    load_seconds = time.perf_counter() - started
    loaded_mb = resident_mb()
    images = np.load(images_path, mmap_mode="r")
    batches = [np.ascontiguousarray(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]
    score(batches[0])  # warm-up
    started = time.perf_counter()
    scores = np.concatenate([score(batch) for batch in batches])
    seconds = time.perf_counter() - started
    peak_mb = resident_mb("VmHWM")
    print(json.dumps({"seconds": seconds, "images": len(images), "load_seconds": load_seconds, "loaded_mb": loaded_mb, "peak_mb": peak_mb, "scores": scores.tolist()}))


def fit(backbone: str, bottle: Path, scratch: Path) -> Path:
    path = scratch / f"bottle_{backbone}.safetensors"
    command = [sys.executable, "-m", "patchcore.cli", "fit", str(bottle), "--backbone", backbone, "--out", str(path), "--quiet"]
    if backbone != "mobilenet_v2":
        import torch
        import torchvision

        torch.manual_seed(0)
        weights = scratch / f"{backbone}_random.pth"
        torch.save(getattr(torchvision.models, backbone)(weights=None).state_dict(), weights)
        command += ["--weights", str(weights)]
    subprocess.run(command, check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="BACKBONE=FILE", help="a fitted bottle model to use instead of fitting one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PATCHCORE_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "MODEL", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    import onnxruntime
    import openvino

    from patchcore import PatchCore
    from patchcore.data import list_test_samples, prepare_image
    from patchcore.intake import read_image

    bottle = args.data / "mvtec_ad" / "bottle"
    scratch = Path(tempfile.mkdtemp(prefix="export_speed."))
    given = dict(item.split("=", 1) for item in args.model)
    fields = provenance(onnxruntime=onnxruntime.__version__, openvino=openvino.__version__)
    summary: dict = stamped(fields, {"images": None, "batch": BATCH, "rounds": args.rounds, "backbones": {}})
    for backbone in BACKBONES:
        model_file = Path(given[backbone]) if backbone in given else fit(backbone, bottle, scratch)
        files = {"pytorch": model_file, "onnxruntime": scratch / f"{backbone}.onnx", "openvino": scratch / "ov" / f"{backbone}.xml"}
        for fmt, engine in (("onnx", "onnxruntime"), ("openvino", "openvino")):
            subprocess.run([sys.executable, "-m", "patchcore.cli", "export", str(model_file), "--format", fmt, "--out", str(files[engine])], check=True)
        model = PatchCore.load(model_file, device="cpu", progress=False)
        samples = list_test_samples(bottle)
        images = np.stack([prepare_image(s.path, read_image(s.path), model.layout_).array for s in samples])
        summary["images"] = len(samples)
        images_path = scratch / f"{backbone}_images.npy"
        np.save(images_path, images)
        bank_shape = list(model.memory_bank_.shape)
        del model
        runs: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
        for round_number in range(args.rounds):
            for engine in ENGINES:
                command = [sys.executable, __file__, "--child", engine, str(files[engine]), str(images_path)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                runs[engine].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"{backbone} {engine} round {round_number + 1}: {runs[engine][-1]['images'] / runs[engine][-1]['seconds']:.2f} images/s, peak {runs[engine][-1]['peak_mb']:.0f} MB", flush=True)
        sizes = {
            "pytorch": model_file.stat().st_size,
            "onnxruntime": sum(p.stat().st_size for p in scratch.glob(f"{backbone}.onnx*")),
            "openvino": sum(files["openvino"].with_suffix(s).stat().st_size for s in (".xml", ".bin", ".json")),
        }
        reference_scores = np.array(runs["pytorch"][0]["scores"])
        engines = {}
        for engine in ENGINES:
            fastest = min(runs[engine], key=lambda r: r["seconds"])
            engines[engine] = {
                "images_per_second": fastest["images"] / fastest["seconds"],
                "peak_mb": max(r["peak_mb"] for r in runs[engine]),
                "loaded_mb": max(r["loaded_mb"] for r in runs[engine]),
                "load_seconds": min(r["load_seconds"] for r in runs[engine]),
                "model_mb": sizes[engine] / 1e6,
                "max_relative_score_difference": float(np.max(np.abs(np.array(runs[engine][0]["scores"]) - reference_scores) / reference_scores)),
            }
        for engine in ENGINES:
            engines[engine]["speed_vs_pytorch"] = engines[engine]["images_per_second"] / engines["pytorch"]["images_per_second"]
            engines[engine]["peak_vs_pytorch"] = engines[engine]["peak_mb"] / engines["pytorch"]["peak_mb"]
        summary["backbones"][backbone] = {
            "weights": "ImageNet" if backbone == "mobilenet_v2" else "random (timing only)",
            "memory_bank_shape": bank_shape,
            "engines": engines,
            "onnxruntime_peak_within_1_5x_pytorch": engines["onnxruntime"]["peak_vs_pytorch"] <= 1.5,
            "a_runtime_faster_than_pytorch": max(engines[e]["speed_vs_pytorch"] for e in ("onnxruntime", "openvino")) > 1.0,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_speed.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"Machine: {describe(summary['machine'])}. Command: {headline(summary)}. MVTec AD bottle's {summary['images']} test images, prepared once, batches of {BATCH}; "
        f"each engine in its own process, the fastest of {args.rounds} interleaved rounds; peak memory is the process's peak resident set.",
        "",
        "| backbone (bank) | engine | images/s (vs PyTorch) | peak memory MB (vs PyTorch) | load s | model file MB | max relative score difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for backbone, result in summary["backbones"].items():
        for engine, e in result["engines"].items():
            label = f"{backbone}, {result['weights']} ({result['memory_bank_shape'][0]} x {result['memory_bank_shape'][1]})"
            lines.append(
                f"| {label} | {engine} | {e['images_per_second']:.2f} ({e['speed_vs_pytorch']:.2f}x) | {e['peak_mb']:.0f} ({e['peak_vs_pytorch']:.2f}x) | "
                f"{e['load_seconds']:.1f} | {e['model_mb']:.0f} | {e['max_relative_score_difference']:.1e} |"
            )
    lines.append("")
    for backbone, result in summary["backbones"].items():
        lines.append(
            f"- {backbone}: ONNX Runtime's peak memory within 1.5x PyTorch's: {'yes' if result['onnxruntime_peak_within_1_5x_pytorch'] else 'NO'}; "
            f"a runtime faster than PyTorch: {'yes' if result['a_runtime_faster_than_pytorch'] else 'NO'}"
        )
    (args.out / "export_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
