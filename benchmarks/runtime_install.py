"""Install sizes: a venv with only ``patchcore[runtime]`` (and with the server, or OpenVINO) against the
full install, and a prediction from the runtime-only venv.

    .venv/bin/python benchmarks/runtime_install.py [--full-venv .venv] [--data ../shared/data] [--out benchmarks/results]

Each install is a fresh venv (``python -m venv``, then ``pip install`` of a copy of this source
with the extras named, not editable); its size is the venv folder on disk, as ``du`` counts it.
The full install is the repository's ``.venv`` made by ``scripts/setup.sh`` (every extra, tests
and benchmarks included). A MobileNetV2 bottle model is fitted and exported to ONNX, and
``patchcore predict`` runs on it in the ``patchcore[runtime]`` venv, where importing torch fails.
Writes runtime_install.json and runtime_install.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import provenance, stamped  # benchmarks/provenance.py: this folder is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
INSTALLS = {"runtime": "patchcore[runtime]", "runtime,serve": "patchcore[runtime,serve]", "runtime,openvino": "patchcore[runtime,openvino]"}


def size_mb(folder: Path) -> float:
    return int(subprocess.run(["du", "-sk", str(folder)], capture_output=True, text=True, check=True).stdout.split()[0]) / 1024


def make_venv(folder: Path, source: Path, extras: str) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install", f"{source}[{extras}]"], check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-venv", type=Path, default=REPO / ".venv")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PATCHCORE_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    fields = provenance()
    scratch = Path(tempfile.mkdtemp(prefix="runtime_install."))
    source = scratch / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))

    sizes = {"full (scripts/setup.sh)": size_mb(args.full_venv)}
    venvs = {}
    for extras in INSTALLS:
        venvs[extras] = make_venv(scratch / f"venv-{extras.replace(',', '-')}", source, extras)
        sizes[INSTALLS[extras]] = size_mb(venvs[extras])
        print(f"{INSTALLS[extras]}: {sizes[INSTALLS[extras]]:.0f} MB", flush=True)

    bottle = args.data / "mvtec_ad" / "bottle"
    model = scratch / "bottle.safetensors"
    subprocess.run([sys.executable, "-m", "patchcore.cli", "fit", str(bottle), "--backbone", "mobilenet_v2", "--out", str(model), "--quiet"], check=True)
    subprocess.run([sys.executable, "-m", "patchcore.cli", "export", str(model), "--out", str(scratch / "bottle.onnx")], check=True)
    runtime = venvs["runtime"] / "bin"
    torch_probe = subprocess.run([str(runtime / "python"), "-c", "import torch"], capture_output=True, text=True)
    predicted = subprocess.run(
        [str(runtime / "patchcore"), "predict", str(scratch / "bottle.onnx"), str(bottle / "test"), "--out", str(scratch / "predicted"), "--no-pictures", "--quiet"],
        capture_output=True, text=True,
    )
    lines_written = (scratch / "predicted" / "predictions.jsonl").read_text().splitlines() if predicted.returncode == 0 else []
    summary = stamped(fields, {
        "sizes_mb": sizes,
        "runtime_venv_imports_torch": torch_probe.returncode == 0,
        "runtime_venv_predict_exit_status": predicted.returncode,
        "runtime_venv_predictions": len(lines_written),
        "runtime_venv_packages": subprocess.run([str(runtime / "python"), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout.split(),
    })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime_install.json").write_text(json.dumps(summary, indent=2) + "\n")
    full = sizes["full (scripts/setup.sh)"]
    lines = ["| install | size on disk | of the full install |", "|---|---|---|"]
    lines += [f"| `{name}` | {size:,.0f} MB | {size / full:.1%} |" for name, size in sizes.items()]
    lines += [
        "",
        f"In the `patchcore[runtime]` venv `import torch` {'works (NOT expected)' if summary['runtime_venv_imports_torch'] else 'fails'}; "
        f"`patchcore predict bottle.onnx bottle/test` exited {predicted.returncode} and wrote {len(lines_written)} predictions.",
        "",
        "Packages in the `patchcore[runtime]` venv: " + ", ".join(summary["runtime_venv_packages"]),
    ]
    (args.out / "runtime_install.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
