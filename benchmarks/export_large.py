"""Export a model whose memory bank is over 2 GB (past one protobuf's limit) and score with it.

    .venv/bin/python benchmarks/export_large.py [--model FILE] [--gigabytes 2.25] [--data ../shared/data] [--out benchmarks/results]

The model is MVTec AD bottle's MobileNetV2 model (fitted first without ``--model``), its bank of
21,402 x 128 entries repeated, each copy moved by small Gaussian noise (seeded), to ``--gigabytes``
of float32: the bank a large fit would give, at a size no 2-core fit reaches in minutes. It is
exported to ONNX, whose weights then go to external data (``.onnx.data`` beside the graph). Four
bottle test images (two good, two defective) are scored by the PyTorch model with that bank and
by the export in ONNX Runtime, in a process of its own whose peak memory is read. Reports the
files' sizes, the export's time and the process's peak memory, and the scores' agreement. Writes
export_large.json and export_large.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from export_speed import resident_mb  # this folder is on sys.path when run as a script
from provenance import describe, headline, provenance, stamped

REPO = Path(__file__).resolve().parents[1]
IMAGES = ["good/000.png", "good/001.png", "broken_large/000.png", "contamination/001.png"]


def child(model_path: str, *images: str) -> None:
    """Score ``images`` with the export through the runtime; print a JSON line."""
    from patchcore.runtime import ExportedModel

    started = time.perf_counter()
    model = ExportedModel(model_path, batch_size=len(images))
    loaded = time.perf_counter() - started
    started = time.perf_counter()
    scores = [p.score for p in model.predict(images)]
    print(json.dumps({"scores": scores, "load_seconds": loaded, "score_seconds": time.perf_counter() - started, "peak_mb": resident_mb("VmHWM")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--gigabytes", type=float, default=2.25, help="the bank's size in GB (1e9 bytes) of float32")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PATCHCORE_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    import torch

    from patchcore import PatchCore
    from patchcore.export import export_model

    fields = provenance()
    from patchcore.search import NearestNeighbourIndex

    bottle = args.data / "mvtec_ad" / "bottle"
    scratch = Path(tempfile.mkdtemp(prefix="export_large."))
    model_file = args.model
    if model_file is None:
        model_file = scratch / "bottle.safetensors"
        subprocess.run([sys.executable, "-m", "patchcore.cli", "fit", str(bottle), "--backbone", "mobilenet_v2", "--out", str(model_file), "--quiet"], check=True)
    model = PatchCore.load(model_file, device="cpu", progress=False)
    bank = model.memory_bank_
    entries = math.ceil(args.gigabytes * 1e9 / (4 * bank.shape[1]))
    large = bank.repeat(math.ceil(entries / len(bank)), 1)[:entries].contiguous()
    generator = torch.Generator().manual_seed(0)
    spread = 0.01 * float(bank.std())
    for start in range(len(bank), entries, 1 << 20):  # in chunks: no second bank-sized tensor of noise
        chunk = large[start : start + (1 << 20)]
        chunk += spread * torch.randn(chunk.shape, generator=generator)
    model.memory_bank_ = large
    model.index_ = NearestNeighbourIndex(large, "exact")
    bank_bytes = large.numel() * large.element_size()
    print(f"bank {tuple(large.shape)}: {bank_bytes / 1e9:.2f} GB", flush=True)

    out = scratch / "large.onnx"
    started = time.perf_counter()
    export_model(model, out)
    export_seconds = time.perf_counter() - started
    export_peak = resident_mb("VmHWM")
    files = {p.name: p.stat().st_size for p in sorted(scratch.glob("large.onnx*"))}
    print(f"exported in {export_seconds:.0f} s: {files}", flush=True)

    images = [str(bottle / "test" / name) for name in IMAGES]
    done = subprocess.run([sys.executable, __file__, "--child", str(out), *images], capture_output=True, text=True, check=True)
    runtime = json.loads(done.stdout.strip().splitlines()[-1])
    started = time.perf_counter()
    expected = [p.score for p in model.predict(images)]
    pytorch_seconds = time.perf_counter() - started
    relative = float(np.max(np.abs(np.array(runtime["scores"]) - expected) / np.array(expected)))

    summary = stamped(fields, {
        "memory_bank_shape": list(large.shape),
        "memory_bank_bytes": bank_bytes,
        "files_bytes": files,
        "external_data": "large.onnx.data" in files,
        "export_seconds": export_seconds,
        "export_process_peak_mb": export_peak,
        "images": IMAGES,
        "pytorch_scores": expected,
        "onnxruntime_scores": runtime["scores"],
        "max_relative_score_difference": relative,
        "onnxruntime_load_seconds": runtime["load_seconds"],
        "onnxruntime_score_seconds": runtime["score_seconds"],
        "onnxruntime_process_peak_mb": runtime["peak_mb"],
        "pytorch_score_seconds": pytorch_seconds,
        "decisions_equal": [s >= model.calibration_.image_threshold for s in runtime["scores"]] == [s >= model.calibration_.image_threshold for s in expected],
    })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_large.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"Machine: {describe(summary['machine'])}. Command: {headline(summary)}. Bottle's MobileNetV2 bank repeated with noise to {large.shape[0]:,} x {large.shape[1]} entries ({bank_bytes / 1e9:.2f} GB of float32).",
        "",
        "| file | size |",
        "|---|---|",
        *[f"| {name} | {size / 1e6:,.1f} MB |" for name, size in files.items()],
        "",
        f"- export: {export_seconds:.0f} s; the exporting process's peak memory {export_peak / 1024:.1f} GB (it also holds the PyTorch model and its faiss index)",
        f"- ONNX Runtime: loaded in {runtime['load_seconds']:.1f} s; {len(images)} images scored in {runtime['score_seconds']:.1f} s "
        f"(PyTorch: {pytorch_seconds:.1f} s); peak memory {runtime['peak_mb'] / 1024:.1f} GB",
        f"- scores: max relative difference from PyTorch {relative:.1e}; decisions equal: {'yes' if summary['decisions_equal'] else 'NO'}",
    ]
    (args.out / "export_large.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
