"""Ray's overhead against local runs on one machine, and the bytes per image that cross the network.

    .venv/bin/python benchmarks/ray_overhead.py [--model FILE] [--images test|all] [--data ../shared/data]
                                                [--out benchmarks/results]

Scoring (``predict``): the same model and images through ``patchcore predict`` as users run it,
each a fresh process, pictures on (the default):

- local: ``predict MODEL IMAGES --out DIR`` (one process, PyTorch's default threads);
- ray_local: ``predict ... --ray``: the command starts a local Ray instance (one actor per CPU);
- ray_cluster: ``predict ... --ray ADDRESS`` on a two-node Ray cluster on this machine
  (``ray start --head`` and a worker node, 2 CPUs each, started beforehand, token authentication
  on; the tests' ``tests/end_to_end/ray_cluster.py``): 4 actors sharing this machine's cores.

Each configuration runs twice: on one image and on all IMAGES. The one-image run's wall time is
the startup (interpreter, PyTorch, model, and for Ray the instance or the connection, the actor
pool and each actor's model load); scoring throughput is (N - 1) images over the difference of the
two wall times. End to end is N images over the full run's wall time. The cluster's own start
(``ray start``, both nodes) is reported apart.

Bytes per image that cross the network with ``--ray`` on a real cluster, measured from the run's
inputs and outputs: the image file (read on the driver's node, sent to an actor), the record the
actor sends back (its JSON), and the PNG picture (when pictures are on); the model's files cross
once per node. Ray's own framing per batch (a few hundred bytes for 8 images) is not counted.

The Ray runs' records are checked against the local run's: max |score difference| and the flags.

The model: ``--model`` or, without it, MobileNetV2 fitted here on bottle's 209 good images (the
tests' model: ImageNet weights, 10% coreset, seed 42; minutes). IMAGES: bottle's 83 test images
(``test``) or all 292 bottle images (``all``, the default: a longer run puts less weight on startup). Writes ray_overhead.json and ray_overhead.md; their
sections are ``predict`` and ``network`` (a ``fit`` section can sit beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "end_to_end"))

from provenance import describe, headline, provenance, short, stamped  # noqa: E402  (benchmarks/provenance.py, beside this file)
from ray_cluster import LocalRayCluster, auth_env  # noqa: E402  (the tests' helper)

CONFIGURATIONS = ("local", "ray_local", "ray_cluster")
TIMEOUT_S = 900


def patchcore(*arguments: object, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Runs ``patchcore`` in a fresh process: (wall seconds, stderr); fails loudly if it fails."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "patchcore.cli", *map(str, arguments)], env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"patchcore {' '.join(map(str, arguments))} failed ({result.returncode}): {result.stderr[-2000:]}")
    return seconds, result.stderr


def image_list(data: Path, which: str) -> list[Path]:
    bottle = data / "mvtec_ad" / "bottle"
    folders = [bottle / "test"] + ([bottle / "train"] if which == "all" else [])
    return sorted(p for folder in folders for p in folder.rglob("*.png"))


def fit_model(data: Path, folder: Path) -> Path:
    model = folder / "bottle.safetensors"
    patchcore("fit", data / "mvtec_ad" / "bottle", "--backbone", "mobilenet_v2", "--out", model, "--quiet")
    return model


def describe_model(path: Path) -> str:
    """The backbone, bank and file size, from the model file's settings."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        settings = json.loads(handle.metadata()["patchcore"])
    rows, width = settings["memory_bank_shape"]
    return f"{settings['backbone']}, bank {rows} x {width}, {path.stat().st_size / 1e6:.1f} MB"


def read_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def predict_section(model: Path, images: list[Path], work: Path) -> tuple[dict, dict]:
    """(the predict figures per configuration, the network figures from the local run's outputs)."""
    one_image = images[:1]
    results: dict[str, dict] = {}
    outputs: dict[str, Path] = {}

    def measure(name: str, extra: list[str], env: dict[str, str] | None) -> None:
        startup, _ = patchcore("predict", model, *one_image, "--out", work / f"{name}_one", "--quiet", *extra, env=env)
        total, stderr = patchcore("predict", model, *images, "--out", work / name, "--quiet", *extra, env=env)
        outputs[name] = work / name
        results[name] = {
            "startup_s": round(startup, 2),
            "total_s": round(total, 2),
            "end_to_end_images_per_s": round(len(images) / total, 3),
            "scoring_images_per_s": round((len(images) - 1) / (total - startup), 3) if total > startup else None,
            "ray_line": stderr.strip().splitlines()[-1] if extra else None,
        }
        print(f"{name}: {results[name]}", flush=True)

    measure("local", [], None)
    measure("ray_local", ["--ray"], auth_env())
    started = time.perf_counter()
    with LocalRayCluster(nodes=2, cpus_per_node=2, object_store_bytes=100 * 2**20) as cluster:
        cluster_start = time.perf_counter() - started
        measure("ray_cluster", ["--ray", cluster.address], cluster.env)
    results["ray_cluster"]["cluster_start_s"] = round(cluster_start, 2)

    reference = read_records(outputs["local"])
    for name in ("ray_local", "ray_cluster"):
        got = read_records(outputs[name])
        assert [r["path"] for r in got] == [r["path"] for r in reference], f"{name}: not in the local run's order"
        results[name]["max_abs_score_difference_vs_local"] = max(abs(a["score"] - b["score"]) for a, b in zip(got, reference))
        results[name]["same_flags_as_local"] = sum(a["is_anomalous"] == b["is_anomalous"] for a, b in zip(got, reference))
        for key in ("end_to_end_images_per_s", "scoring_images_per_s"):
            results[name][f"{key}_vs_local"] = round(results[name][key] / results["local"][key], 3)
        results[name]["startup_vs_local_s"] = round(results[name]["startup_s"] - results["local"]["startup_s"], 2)

    records = [{k: v for k, v in r.items() if k != "picture"} for r in reference]
    pictures = sorted((outputs["local"] / "images").iterdir())
    network = {
        "images": len(images),
        "image_bytes_mean": round(statistics.mean(p.stat().st_size for p in images)),
        "record_bytes_mean": round(statistics.mean(len(json.dumps(r).encode()) for r in records)),
        "picture_bytes_mean": round(statistics.mean(p.stat().st_size for p in pictures)),
        "model_bytes_once_per_node": sum(p.stat().st_size for p in [model] if p.is_file()),
    }
    network["per_image_in_bytes"] = network["image_bytes_mean"]
    network["per_image_out_bytes_no_pictures"] = network["record_bytes_mean"]
    network["per_image_out_bytes_with_pictures"] = network["record_bytes_mean"] + network["picture_bytes_mean"]
    return results, network


def fit_section(data: Path, work: Path) -> dict:
    """``patchcore fit`` on bottle's 209 good images (MobileNetV2, 10% coreset), locally, with ``--ray``
    (a local instance) and with ``--ray ADDRESS`` (the two-node cluster): wall time, the models
    compared entry for entry, and the bytes per image that cross the network."""
    import torch

    from patchcore import PatchCore

    bottle = data / "mvtec_ad" / "bottle"
    results: dict[str, dict] = {}

    def measure(name: str, extra: list, env: dict[str, str] | None) -> None:
        seconds, stderr = patchcore("fit", bottle, "--backbone", "mobilenet_v2", "--out", work / f"fit_{name}.safetensors", "--quiet", *extra, env=env)
        line = [l for l in stderr.splitlines() if l.startswith("features extracted on Ray")]
        results[name] = {"total_s": round(seconds, 2), "ray_line": line[0] if line else None}
        print(f"fit {name}: {results[name]}", flush=True)

    measure("local", [], None)
    measure("ray_local", ["--ray"], auth_env())
    with LocalRayCluster(nodes=2, cpus_per_node=2, object_store_bytes=100 * 2**20) as cluster:
        measure("ray_cluster", ["--ray", cluster.address], cluster.env)
    reference = PatchCore.load(work / "fit_local.safetensors", progress=False)
    for name in ("ray_local", "ray_cluster"):
        model = PatchCore.load(work / f"fit_{name}.safetensors", progress=False)
        results[name]["same_model_as_local"] = bool(torch.equal(model.memory_bank_, reference.memory_bank_) and model.calibration_ == reference.calibration_)
        results[name]["time_vs_local"] = round(results[name]["total_s"] / results["local"]["total_s"], 3)
    images = sorted((bottle / "train" / "good").glob("*.png"))
    bank_rows, width = reference.memory_bank_.shape
    patches_per_image = 32 * 32  # 256 px, stride 8
    results["network"] = {
        "images": len(images),
        "per_image_in_bytes": round(statistics.mean(p.stat().st_size for p in images)),  # the image file, to an actor
        "per_image_out_bytes": patches_per_image * 128 * 2,  # its patches' float16 128-d projection, to the driver
        "bank_bytes_once": bank_rows * width * 4,  # the chosen rows to the driver, then the bank to each actor
        "calibration_bytes_per_image": 4 * 8,  # score, map peak, map sum, pixels
    }
    return results


def markdown(summary: dict) -> str:
    before, after = summary.get("load_average_1min", ["?", "?"])
    lines = [
        f"Machine: {describe(summary['machine'])}; 1-minute load average {before} at the start, {after} at the end (a shared machine). "
        f"{summary.get('images')}; model {summary.get('model')}. Pictures on; each run a fresh `patchcore predict` process, once.",
        "",
    ]
    sections = summary.get("sections", {})
    if sections:
        lines += ["Runs: " + "; ".join(f"{name}: {headline(s)}" for name, s in sections.items()), ""]
    if "predict" in summary:
        lines += [
            "## predict",
            "",
            "| run | startup s (1 image) | scoring images/s (vs local) | end to end images/s (vs local) | total s | max abs score diff vs local | same flags |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in CONFIGURATIONS:
            row = summary["predict"][name]
            versus = {key: f" ({row[key + '_vs_local']:.2f}x)" if name != "local" else "" for key in ("scoring_images_per_s", "end_to_end_images_per_s")}
            difference = f"{row['max_abs_score_difference_vs_local']:.1e}" if name != "local" else "-"
            flags = f"{row['same_flags_as_local']}/{summary['num_images']}" if name != "local" else "-"
            lines.append(
                f"| {name} | {row['startup_s']:.1f} | {row['scoring_images_per_s']:.2f}{versus['scoring_images_per_s']} | "
                f"{row['end_to_end_images_per_s']:.2f}{versus['end_to_end_images_per_s']} | {row['total_s']:.1f} | {difference} | {flags} |"
            )
        cluster = summary["predict"]["ray_cluster"]
        lines += ["", f"- two-node cluster start (`ray start --head` + a worker node, both up): {cluster['cluster_start_s']:.1f} s"]
        lines += [f"- {name}: {summary['predict'][name]['ray_line']}" for name in ("ray_local", "ray_cluster")]
    if "network" in summary:
        net = summary["network"]
        lines += [
            "",
            "## bytes per image across the network (predict --ray)",
            "",
            f"- in: the image file, {net['per_image_in_bytes'] / 1e3:.0f} KB on average (bottle PNGs, 900 x 900)",
            f"- out: its record, {net['record_bytes_mean'] / 1e3:.2f} KB; with its picture (PNG) {net['per_image_out_bytes_with_pictures'] / 1e3:.0f} KB",
            f"- once per node: the model's files, {net['model_bytes_once_per_node'] / 1e6:.1f} MB",
        ]
    if "fit" in summary:
        fit = summary["fit"]
        before, after = fit["load_average_1min"]
        lines += [
            "",
            f"## fit (bottle's 209 good images, MobileNetV2, 10% coreset; 1-minute load average {before} to {after})",
            "",
            "| run | total s | vs local | same model as local (bank and thresholds) |",
            "|---|---|---|---|",
        ]
        for name in CONFIGURATIONS:
            row = fit[name]
            same = "-" if name == "local" else ("yes" if row["same_model_as_local"] else "NO")
            versus = "-" if name == "local" else f"{row['time_vs_local']:.2f}x"
            lines.append(f"| {name} | {row['total_s']:.1f} | {versus} | {same} |")
        lines += [f"- {name}: {fit[name]['ray_line']}" for name in ("ray_local", "ray_cluster")]
        net = fit["network"]
        lines += [
            "",
            "## bytes across the network (fit --ray)",
            "",
            f"- per image, in: the image file, {net['per_image_in_bytes'] / 1e3:.0f} KB on average (bottle PNGs, 900 x 900)",
            f"- per image, out: its patches' float16 128-d projection, {net['per_image_out_bytes'] / 1e3:.0f} KB (1,024 patches at 256 px); "
            f"its left-out score, {net['calibration_bytes_per_image']} bytes",
            f"- once: the chosen rows to the driver, then the bank to each actor, {net['bank_bytes_once'] / 1e6:.1f} MB",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a .safetensors model (default: fit MobileNetV2 on bottle here)")
    parser.add_argument("--images", choices=["test", "all"], default="all", help="bottle's 83 test images, or all 292 (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PATCHCORE_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--only", choices=["predict", "fit"], help="run one section, keeping the other's figures from an earlier ray_overhead.json")
    args = parser.parse_args()

    import ray

    fields = provenance(ray=ray.__version__)
    images = image_list(args.data, args.images)
    earlier = args.out / "ray_overhead.json"
    summary = json.loads(earlier.read_text()) if args.only and earlier.is_file() else {}
    # which run made each section: the sections kept from the earlier file keep theirs
    sections = dict(summary.get("sections") or {name: short(summary) for name in ("predict", "network", "fit") if name in summary and "commit" in summary})
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as folder:
        work = Path(folder)
        if args.only != "fit":
            model = args.model or fit_model(args.data, work)
            described = describe_model(model)
            predict, network = predict_section(model, images, work)
            summary.update({
                "images": f"MVTec AD bottle, {'83 test images' if args.images == 'test' else 'all 292 images'}",
                "num_images": len(images),
                "model": described,
                # The machine is shared: other work running meanwhile slows every run, local and Ray alike.
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "predict": predict,
                "network": network,
            })
            sections["predict"] = sections["network"] = short(fields)
        if args.only != "predict":
            summary["fit"] = fit_section(args.data, work)
            summary["fit"]["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            sections["fit"] = short(fields)
    summary = stamped(fields, {**summary, "sections": sections})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray_overhead.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary)
    (args.out / "ray_overhead.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
