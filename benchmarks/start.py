"""How long a user waits for the first answer: ``patchcore --help``, ``patchcore predict`` on one
image (a ``.safetensors`` model and its ONNX export) and ``patchcore serve`` until ready, each in
a fresh process, the working tree against an old commit, interleaved (benchmarks/against.py).

    .venv/bin/python benchmarks/start.py --against HEAD~3 [--rounds 5] [--model bottle.safetensors]

Each round runs every command once per side (old, new, old, new, ...), after one untimed run of
each so that the file cache is warm; the figure is the median wall time over the rounds, and
the ratio new / old. The model is a MobileNetV2 fit of MVTec AD bottle (``--model`` to reuse one),
fitted and exported by the working tree: both commits read the same files. ``predict`` writes
its records to a temporary folder; the records of both sides must agree (score and decision).

Writes ``start.json`` and ``start.md`` to ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from against import SIDES, Trees, child_env, comparison, interleave, summarise
from provenance import REPO

IMAGE = Path("mvtec_ad") / "bottle" / "test" / "broken_large" / "000.png"
#: what each command is, and what it runs (MODEL, ONNX, IMAGE, OUT filled in)
COMMANDS = {
    "help_s": ["--help"],
    "predict_one_image_s": ["predict", "{MODEL}", "{IMAGE}", "--out", "{OUT}", "--quiet"],
    "predict_one_image_onnx_s": ["predict", "{ONNX}", "{IMAGE}", "--out", "{OUT}", "--quiet"],
}
READY_TIMEOUT_S = 300


def imported_from(tree: Path) -> str:
    """Where a child of ``tree`` imports patchcore from (checked to be that tree's src/)."""
    done = subprocess.run([sys.executable, "-c", "import patchcore; print(patchcore.__file__)"], cwd=tree, env=child_env(tree),
                          capture_output=True, text=True, check=True)
    path = done.stdout.strip()
    if not Path(path).resolve().is_relative_to((tree / "src").resolve()):
        raise SystemExit(f"a child in {tree} imported patchcore from {path}")
    return path


def run_command(tree: Path, arguments: list[str]) -> float:
    """Wall seconds of ``python -m patchcore.cli ARGUMENTS`` in a fresh process of ``tree``."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "patchcore.cli", *arguments], cwd=tree, env=child_env(tree), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} in {tree} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_ready(tree: Path, model: Path, record: Path) -> float:
    """Wall seconds from starting ``patchcore serve MODEL`` to its first 200 on /v2/health/ready
    (the model loaded and warmed up on one image)."""
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "patchcore.cli", "serve", str(model), "--port", str(port), "--record", str(record)],
                              cwd=tree, env=child_env(tree), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while time.perf_counter() - started < READY_TIMEOUT_S:
            if server.poll() is not None:
                raise RuntimeError(f"serve in {tree} stopped ({server.returncode}):\n{server.stderr.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"serve in {tree} not ready after {READY_TIMEOUT_S} s")
    finally:
        server.terminate()
        server.wait(timeout=30)


def measure_side(tree: Path, files: dict[str, str], scratch: Path, label: str) -> dict:
    figures, records = {}, {}
    for name, template in COMMANDS.items():
        out = scratch / f"{label}-{name}"
        arguments = [part.format(OUT=out, **files) for part in template]
        figures[name] = run_command(tree, arguments)
        if (out / "predictions.jsonl").is_file():
            records[name] = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    figures["serve_ready_s"] = serve_ready(tree, Path(files["MODEL"]), scratch / f"{label}-record.sqlite")
    return {"figures": figures, "records": records}


def same_answers(a: dict, b: dict) -> bool:
    """Both sides' predict records give the same score (to 1e-6 relative) and decision."""
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            if x["is_anomalous"] != y["is_anomalous"] or abs(x["score"] - y["score"]) > 1e-6 * abs(x["score"]):
                return False
    return True


def markdown(result: dict) -> str:
    lines = [f"# Time to the first answer: working tree against {result['against']} ({result['against_commit'][:7]})", "",
             f"{result['date']}, {result['machine']['cpu']} ({result['machine']['cores']} cores); `{result['command']}`; "
             f"{result['rounds']} interleaved rounds, medians of fresh processes, warm file cache.", "",
             "| command | old (s) | new (s) | new / old |", "|---|---|---|---|"]
    for name, q in result["quantities"].items():
        lines.append(f"| {name.removesuffix('_s')} | {q['old_median']:.2f} | {q['new_median']:.2f} | {q['ratio_new_over_old']:.2f} |")
    lines += ["", f"predict's records agree between the commits (score to 1e-6, decision): {result['same_answers']}"]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    with Trees(args.against, "start") as trees, tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        model = args.model
        if model is None:
            model = scratch / "bottle.safetensors"
            print(f"fitting {model} (MobileNetV2, bottle)", flush=True)
            subprocess.run([sys.executable, "-m", "patchcore.cli", "fit", str(args.data / "mvtec_ad" / "bottle"), "--backbone", "mobilenet_v2",
                            "--out", str(model), "--quiet"], cwd=REPO, check=True)
        onnx = scratch / "bottle.onnx"
        subprocess.run([sys.executable, "-m", "patchcore.cli", "export", str(model), "--out", str(onnx)], cwd=REPO, check=True, capture_output=True)
        files = {"MODEL": str(model), "ONNX": str(onnx), "IMAGE": str(args.data / IMAGE)}
        sources = {side: imported_from(trees.paths[side]) for side in SIDES}
        for side in SIDES:  # warm the file cache (and numba's on-disk cache) for both
            measure_side(trees.paths[side], files, scratch, f"warm-{side}")
        records: dict[str, dict] = {}

        def measure(side: str, number: int) -> dict:
            done = measure_side(trees.paths[side], files, scratch, f"{side}-{number}")
            records.setdefault(side, done["records"])
            return {"figures": done["figures"], "patchcore_file": sources[side]}

        results = interleave(args.rounds, measure)
        quantities, _ = summarise(results, {}, 1.0)
        result = comparison("start", trees, 1.0, args.rounds, results, quantities, True, {}, time.perf_counter() - started,
                            ["wall time of fresh processes; lower is better; nothing is gated"],
                            {"same_answers": same_answers(records["old"], records["new"]), "image": str(IMAGE)})
        result.pop("verdict", None), result.pop("verdict_rule", None)
    (args.out / "start.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "start.md").write_text(markdown(result))
    print(markdown(result))
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, metavar="COMMIT", help="the old commit to measure beside the working tree")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians over them)")
    parser.add_argument("--model", type=Path, help="a MobileNetV2 bottle model to use instead of fitting one")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PATCHCORE_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse())
