"""What the inspection record costs `patchcore serve`: throughput and latency with the record off,
on (SQLite, the default) and on with ``--keep-images flagged``, side by side in one run.

    .venv/bin/python benchmarks/record_load.py [--model FILE] [--data ../shared/data] [--out benchmarks/results]
                                               [--requests 1600] [--clients 16] [--rounds 2] [--warm-up 48] [--seed 0]

Each run starts a fresh server (`patchcore serve MODEL --device cpu`, the default batching) with
its own empty ``$XDG_STATE_HOME``, so that "record on" is the default record, a new SQLite file at
``$XDG_STATE_HOME/patchcore/record.sqlite`` (its kept images in ``record.sqlite.images/``):

- off: ``--record off``;
- on: no record option (the default SQLite file);
- on_keep_flagged: ``--keep-images flagged``.

Every run sends the same seeded list of ``--requests`` requests, each one of MVTec AD bottle's
83 test images (valid images only), from ``--clients`` concurrent clients; ``--warm-up``
requests go first, not timed. The load itself is serve_load.py's (``load``: httpx.AsyncClient,
bodies built once, a health probe every second, memory and CPU sampled), and so are the answer
checks (every answer 200 with the library's score for its image).

The machine is shared (2 cores, other work on them), so the configurations run interleaved in
rounds, ABC then CBA (off, on, on_keep_flagged, on_keep_flagged, on, off, ...): a slow stretch
of the machine falls on every configuration alike. Reported per configuration: the median over
its rounds of images/s and of the p50/p90/p99 latency of the answers, with the lowest and highest;
the ratios on/off and on_keep_flagged/off of the medians (the bar: throughput at least 0.95x,
p99 at most 1.1x), and the same ratios within each round as their spread.

After each record-on run (server stopped) the SQLite file is read: its decisions must be exactly
the answers' decision ids (warm-up included), one row each; with ``--keep-images flagged`` the
kept folder must hold exactly the images of the flagged decisions (content-addressed: an image
sent again is kept once), each row's ``image_kept`` true exactly when it was flagged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import describe, headline, provenance, stamped
from serve_load import SCORE_TOLERANCE, Server, bottle_test_images, image_name, load, multipart, reference_predictions, request_list, summarise

REPO = Path(__file__).resolve().parents[1]
#: the issue's bar: record on against record off, throughput at least, p99 latency at most
THROUGHPUT_BAR = 0.95
P99_BAR = 1.10
CONFIGURATIONS = {
    "off": ["--record", "off"],
    "on": [],  # the default: a SQLite file in $XDG_STATE_HOME/patchcore
    "on_keep_flagged": ["--keep-images", "flagged"],
}
#: serve_load.summarise's checks that say the answers were right (its memory check is for long runs)
ANSWER_CHECKS = ("all_answered", "no_unexpected_5xx", "every_answer_right", "scores_equal_library", "health_answered_200")


def round_order(rounds: int) -> list[tuple[int, str]]:
    """(round, configuration) in run order: ABC, CBA, ABC, ..."""
    names = list(CONFIGURATIONS)
    return [(r, name) for r in range(rounds) for name in (names if r % 2 == 0 else names[::-1])]


def check_record(database: Path, keep_dir: Path | None, answered_ids: list[str | None]) -> dict:
    """The record after a run: its decisions are exactly the answered ids, and the kept folder
    holds exactly the flagged images (when ``keep_dir``)."""
    figures: dict = {"file": str(database), "exists": database.is_file()}
    if not database.is_file():
        figures["checks"] = {"record_file_exists": False}
        return figures
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT id, decision, image_sha256, image_kept FROM decisions").fetchall()
        models = connection.execute("SELECT COUNT(*) FROM models").fetchone()[0]
        kept_rows = {sha for (sha,) in connection.execute("SELECT sha256 FROM kept_images")}
    connection.close()
    in_record = [row[0] for row in rows]
    answered = set(answered_ids)
    figures.update({
        "bytes": database.stat().st_size + sum(p.stat().st_size for p in database.parent.glob(database.name + "-*") if p.is_file()),
        "decision_rows": len(rows), "answers_200_with_id": len(answered_ids), "distinct_answered_ids": len(answered),
        "answered_ids_missing_from_record": len(answered - set(in_record)), "record_rows_not_answered": len(set(in_record) - answered),
        "flagged_rows": sum(1 for row in rows if row[1] == "anomalous"), "model_rows": models,
    })
    figures["checks"] = {
        "every_answer_has_a_decision_id": None not in answered and len(answered) == len(answered_ids),
        "rows_equal_answers": len(rows) == len(answered_ids) and set(in_record) == answered,
        "one_model_row": models == 1,
    }
    flagged = {row[2] for row in rows if row[1] == "anomalous"}
    if keep_dir is not None:
        files = {path.name.split(".")[0]: path.stat().st_size for path in keep_dir.glob("*/*") if not path.name.startswith(".")}
        figures["kept"] = {"folder": str(keep_dir), "files": len(files), "bytes": sum(files.values()), "distinct_flagged_images": len(flagged), "kept_images_rows": len(kept_rows)}
        figures["checks"].update({
            "kept_files_equal_flagged_images": set(files) == flagged,
            "kept_rows_equal_kept_files": kept_rows == set(files),
            "image_kept_exactly_when_flagged": all(bool(row[3]) == (row[1] == "anomalous") for row in rows),
        })
    else:
        figures["checks"]["no_image_kept"] = not kept_rows and not any(row[3] for row in rows)
    return figures


def one_run(name: str, round_number: int, model_file: Path, keys: list[str], warm_keys: list[str], bodies: dict[str, bytes], reference: dict, args, scratch: Path) -> dict:
    state = scratch / f"state_{name}_{round_number}"
    state.mkdir()
    options = list(CONFIGURATIONS[name])
    server = Server(model_file, options, scratch / f"server_{name}_{round_number}.log", state=state)  # its default record goes to state
    try:
        ready = server.wait_ready()
        warm = asyncio.run(load(server.url, model_file.stem, server.process.pid, warm_keys, bodies, reference, args.clients)) if warm_keys else None
        raw = asyncio.run(load(server.url, model_file.stem, server.process.pid, keys, bodies, reference, args.clients))
    finally:
        exit_code = server.stop()
    summary = summarise(name, options, raw, keys, ready, exit_code, args.score_tolerance)
    summary["memory_mb"].pop("trace", None)
    log = server.log.read_text()
    summary["record_line"] = next((line for line in log.splitlines() if line.startswith("record:")), None)
    summary["round"] = round_number
    summary["checks"] = {key: summary["checks"][key] for key in ANSWER_CHECKS}
    ids = [i for outcomes in ([] if warm is None else warm["outcomes"], raw["outcomes"]) for o in outcomes if o and o["status"] == 200 for i in o.get("decision_ids", [None])]
    summary["warm_up_requests"] = len(warm_keys)
    if name == "off":
        summary["checks"]["answers_carry_no_decision_id"] = all(i is None for i in ids)
        summary["checks"]["no_record_written"] = not any(state.rglob("*.sqlite"))
    else:
        database = state / "patchcore" / "record.sqlite"
        summary["record"] = check_record(database, database.with_name(database.name + ".images") if "--keep-images" in options else None, ids)
        summary["checks"].update(summary["record"]["checks"])
    if not all(summary["checks"].values()):
        summary["server_log_tail"] = log[-1500:]
    return summary


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def main_run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    images = bottle_test_images(args.data)
    results: dict = stamped(provenance(), {
        "requests": args.requests, "warm_up_requests": args.warm_up, "clients": args.clients, "rounds": args.rounds, "seed": args.seed,
        "images": {"count": len(images), "good": sum(p.parent.name == "good" for p in images)},
        "configurations": {name: ["--device", "cpu", *options] for name, options in CONFIGURATIONS.items()},
        "bar": {"throughput_ratio_at_least": THROUGHPUT_BAR, "p99_ratio_at_most": P99_BAR},
    })
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model_file = args.model
        if model_file is None:
            model_file = scratch / "bottle.safetensors"
            print(f"fit: bottle, MobileNetV2 -> {model_file}", flush=True)
            command = [sys.executable, "-m", "patchcore.cli", "fit", str(args.data / "mvtec_ad" / "bottle"), "--backbone", "mobilenet_v2", "--out", str(model_file), "--quiet"]
            subprocess.run(command, check=True)
        results["model"] = str(model_file)
        print("reference: PatchCore.load(model).predict(83 images) in this process", flush=True)
        reference = reference_predictions(model_file, images)
        results["score_tolerance"] = args.score_tolerance
        bodies = {image_name(path): multipart(image_name(path), path.read_bytes()) for path in images}
        keys = request_list(images, args.requests, 0.0, args.seed)
        warm_keys = request_list(images, args.warm_up, 0.0, args.seed + 1) if args.warm_up else []

        runs = []
        for round_number, name in round_order(args.rounds):
            print(f"round {round_number + 1}, {name}: {args.requests} requests from {args.clients} clients, server {' '.join(CONFIGURATIONS[name]) or '(defaults)'}", flush=True)
            r = one_run(name, round_number, model_file, keys, warm_keys, bodies, reference, args, scratch)
            runs.append({"configuration": name, **r})
            record = r.get("record", {})
            print(
                f"  {r['images_scored_per_second']:.2f} images/s, p50/p90/p99 {r['latency_ms']['p50']:.0f}/{r['latency_ms']['p90']:.0f}/{r['latency_ms']['p99']:.0f} ms, "
                f"mean batch {r['batches']['mean_batch_size']:.2f}, other processes {r['cpu_seconds']['other_processes_cores_busy']:.2f} cores"
                + (f", record rows {record['decision_rows']} / answers {record['answers_200_with_id']}" if record.get("exists") else "")
                + (f", kept {record['kept']['files']} files / {record['kept']['distinct_flagged_images']} flagged images" if "kept" in record else "")
                + f"; checks {'all pass' if all(r['checks'].values()) else [k for k, v in r['checks'].items() if not v]}",
                flush=True,
            )
    results["runs"] = runs
    results["summary"] = summary = {}
    for name in CONFIGURATIONS:
        mine = sorted((r for r in runs if r["configuration"] == name), key=lambda r: r["round"])
        summary[name] = {
            "images_per_second": spread([r["images_scored_per_second"] for r in mine]),
            **{f"latency_{q}_ms": spread([r["latency_ms"][q] for r in mine]) for q in ("p50", "p90", "p99")},
            "other_processes_cores_busy": spread([r["cpu_seconds"]["other_processes_cores_busy"] for r in mine]),
            "server_cores_busy": spread([r["cpu_seconds"]["server_cores_busy"] for r in mine]),
        }
    results["ratios"] = ratios = {}
    for name in ("on", "on_keep_flagged"):
        within = [
            (next(r for r in runs if r["configuration"] == name and r["round"] == k), next(r for r in runs if r["configuration"] == "off" and r["round"] == k))
            for k in range(args.rounds)
        ]
        ratios[name] = {
            "throughput": summary[name]["images_per_second"]["median"] / summary["off"]["images_per_second"]["median"],
            "p50": summary[name]["latency_p50_ms"]["median"] / summary["off"]["latency_p50_ms"]["median"],
            "p99": summary[name]["latency_p99_ms"]["median"] / summary["off"]["latency_p99_ms"]["median"],
            "throughput_within_rounds": [a["images_scored_per_second"] / b["images_scored_per_second"] for a, b in within],
            "p99_within_rounds": [a["latency_ms"]["p99"] / b["latency_ms"]["p99"] for a, b in within],
        }
        ratios[name]["meets_bar"] = ratios[name]["throughput"] >= THROUGHPUT_BAR and ratios[name]["p99"] <= P99_BAR
    results["bar_met"] = all(ratio["meets_bar"] for ratio in ratios.values())
    results["all_checks_pass"] = all(all(r["checks"].values()) for r in runs)
    results["run_seconds"] = time.perf_counter() - started
    results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return results


LABELS = {"off": "record off (`--record off`)", "on": "record on (SQLite, the default)", "on_keep_flagged": "record on, `--keep-images flagged`"}


def markdown(r: dict) -> str:
    names = list(CONFIGURATIONS)
    s, ratios = r["summary"], r["ratios"]

    def cell(figure: dict, digits: int = 0) -> str:
        return f"{figure['median']:.{digits}f} ({figure['min']:.{digits}f}-{figure['max']:.{digits}f})"

    lines = [
        f"Machine: {describe(r['machine'])}. Command: {headline(r)} ({r['run_seconds'] / 60:.0f} min in all, finished {r['finished']}).",
        "",
        (f"`patchcore serve` (default batching) on MVTec AD bottle's {r['images']['count']} test images with a MobileNetV2 model: {r['requests']} requests "
         f"per run (one valid image each, the same seeded list every run, after {r['warm_up_requests']} untimed warm-up requests) from {r['clients']} concurrent clients. "
         f"Each configuration ran {r['rounds']} times on a fresh server, interleaved in rounds ABC, CBA, ... on a shared 2-core machine; "
         "figures are the median of its rounds (lowest-highest in brackets)."),
        "",
        "| | " + " | ".join(LABELS[n] for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
        "| images/s | " + " | ".join(cell(s[n]["images_per_second"], 2) for n in names) + " |",
        "| latency p50 (ms) | " + " | ".join(cell(s[n]["latency_p50_ms"]) for n in names) + " |",
        "| latency p90 (ms) | " + " | ".join(cell(s[n]["latency_p90_ms"]) for n in names) + " |",
        "| latency p99 (ms) | " + " | ".join(cell(s[n]["latency_p99_ms"]) for n in names) + " |",
        "| server cores busy | " + " | ".join(cell(s[n]["server_cores_busy"], 2) for n in names) + " |",
        "| other processes' cores busy (the machine's noise) | " + " | ".join(cell(s[n]["other_processes_cores_busy"], 2) for n in names) + " |",
        "| throughput / record off | 1 | " + " | ".join(f"**{ratios[n]['throughput']:.3f}** (rounds: {', '.join(f'{v:.3f}' for v in ratios[n]['throughput_within_rounds'])})" for n in names[1:]) + " |",
        "| p99 latency / record off | 1 | " + " | ".join(f"**{ratios[n]['p99']:.3f}** (rounds: {', '.join(f'{v:.3f}' for v in ratios[n]['p99_within_rounds'])})" for n in names[1:]) + " |",
        "| p50 latency / record off | 1 | " + " | ".join(f"{ratios[n]['p50']:.3f}" for n in names[1:]) + " |",
        "",
        "Runs in order:",
        "",
        "| round | configuration | images/s | p50 / p90 / p99 (ms) | mean batch | other processes' cores | record rows / answers | kept files / flagged images | checks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        record = run.get("record", {})
        lines.append(
            f"| {run['round'] + 1} | {run['configuration']} | {run['images_scored_per_second']:.2f} | "
            f"{run['latency_ms']['p50']:.0f} / {run['latency_ms']['p90']:.0f} / {run['latency_ms']['p99']:.0f} | {run['batches']['mean_batch_size']:.2f} | "
            f"{run['cpu_seconds']['other_processes_cores_busy']:.2f} | "
            + (f"{record['decision_rows']} / {record['answers_200_with_id']}" if record.get("exists") else "-") + " | "
            + (f"{record['kept']['files']} / {record['kept']['distinct_flagged_images']}" if "kept" in record else "-") + " | "
            + ("all pass" if all(run["checks"].values()) else "FAIL: " + ", ".join(k for k, v in run["checks"].items() if not v)) + " |"
        )
    lines += [
        "",
        (f"Bar (the issue): with the record on, throughput at least {r['bar']['throughput_ratio_at_least']}x and p99 latency at most "
         f"{r['bar']['p99_ratio_at_most']}x of the record off, with and without `--keep-images flagged`: **{'met' if r['bar_met'] else 'NOT met'}**. "
         "Checks per run: every request answered 200 with the library's score (within "
         f"{r['score_tolerance']:g}) and decision; record on: the record's decisions are exactly the answered decision ids (warm-up included), "
         "one model row; keep flagged: the kept folder holds exactly the flagged decisions' images (content-addressed, each once), "
         "`image_kept` set exactly on flagged rows; record off: no decision id, no record file. "
         f"All pass: {'yes' if r['all_checks_pass'] else 'NO'}."),
    ]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model file (default: fit bottle with MobileNetV2 into a temporary folder)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PATCHCORE_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--requests", type=int, default=1600, help="timed requests per run (default: %(default)s)")
    parser.add_argument("--warm-up", type=int, default=48, help="untimed requests first, on each fresh server (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration, interleaved ABC, CBA, ... (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score-tolerance", type=float, default=SCORE_TOLERANCE, help="largest |score - library score| passed (default: %(default)s)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite record_load.md from record_load.json")
    options = parser.parse_args(argv)
    if options.rounds < 1 or options.requests < 1:
        parser.error("--rounds and --requests must be at least 1")
    return options


if __name__ == "__main__":
    arguments = parse()
    if arguments.markdown_only:
        summary = json.loads((arguments.out / "record_load.json").read_text())
    else:
        arguments.out.mkdir(parents=True, exist_ok=True)
        summary = main_run(arguments)
        (arguments.out / "record_load.json").write_text(json.dumps(summary, indent=2) + "\n")
    (arguments.out / "record_load.md").write_text(markdown(summary))
    print(markdown(summary))
