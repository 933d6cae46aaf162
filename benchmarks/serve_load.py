"""Load test of `patchcore serve`: answers, correctness, memory, throughput and latency under 16 clients.

    .venv/bin/python benchmarks/serve_load.py [--model FILE] [--data ../shared/data] [--out benchmarks/results]
                                              [--requests 4000] [--clients 16] [--bad-share 0.05] [--seed 0]
                                              [--full-queue-requests 1000] [--baseline-seconds 20]

Starts the real server (`patchcore serve MODEL --device cpu` in a subprocess, on a free port) and
sends it ``--requests`` requests, one image each as multipart form data, from ``--clients``
concurrent clients (httpx.AsyncClient, one process; every body is built once beforehand, so the
client costs little of the CPU it shares with the server). The requests are MVTec AD bottle's 83
test images (20 good, 63 defective) in a seeded shuffle, and ``--bad-share`` of bad requests split
evenly among four kinds, each with the status it must get:

- not_an_image: text bytes named .png -> 415;
- truncated: the first half of a real PNG -> 422;
- oversized: a body just over --max-request-mb (the server's default 32 MB; ``--max-request-mb``
  passes a smaller one to the server and sends a body just over that instead) -> 413;
- pixel_bomb: a real 1-bit PNG of 8000 x 8000 px (about 8 KB compressed, 64 Mpx, 192 MB as RGB),
  over the server's default --max-image-pixels of 40 Mpx and under Pillow's own bomb limits, so that
  the server's check is the one that refuses it -> 413.

Configurations, each on a fresh server, with the same seeded request list:

- batched: --max-batch 8 --max-wait-ms 10 (the defaults);
- unbatched: --max-batch 1 --max-wait-ms 0;
- full_queue: --max-batch 8 --max-wait-ms 10 --max-queue 4 (``--full-queue-requests`` requests):
  a queue deliberately too small for 16 clients, to show that a full queue answers 503 with
  Retry-After while everything else keeps working. Clients honour Retry-After and send the same
  request again; 503s are allowed in this run only.

Checked and reported per configuration: every request answered (transport errors must be 0);
status counts, no 5xx but the full-queue run's 503s, each bad request's status; every 200 equal
to the library's prediction for its image (``PatchCore.load(model).predict`` of the 83 images in
this process before any server starts: max |score difference| <= 1e-5, ``is_anomalous``
identical); the server's resident memory (VmRSS, sampled every 0.5 s) after warm-up (the first
10% of requests answered), at the end, its maximum and the growth from warm-up to end; requests/s,
images scored/s, p50/p90/p99 latency of scored requests; the mean batch size and the batch-size
histogram from /metrics; the latency of a /v2/health/ready probe sent every second meanwhile; the
CPU seconds of the server and of this client process.

The baseline is the library's scoring loop, as `patchcore predict --no-pictures` runs it:
``model.iter_predictions(paths)`` with ``to_record()`` of each prediction (the map at the image's
size and its regions, as the server's answer has), over the 83 images repeated for about
``--baseline-seconds``, in a child process, timed without the model load and a warm-up batch.
It runs before the first configuration and after each one, so each server figure is bracketed by
two baseline runs on the same machine, and the ratio server images/s / baseline images/s uses
their mean. `patchcore predict MODEL test/ test/ ... --no-pictures --quiet` itself (a subprocess,
start-up and model load included) is timed once too and quoted beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

from provenance import describe, headline, provenance, stamped  # benchmarks/provenance.py: this folder is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
BOUNDARY = "patchcore-load-test-boundary"
BAD_KINDS = {"not_an_image": 415, "truncated": 422, "oversized": 413, "pixel_bomb": 413}
#: largest |score difference| from the library allowed for a scored request
SCORE_TOLERANCE = 1e-5
#: share of the requests after which the server counts as warmed up (memory baseline)
WARM_UP_SHARE = 0.10
#: the issue's bar for server images/s over the library's images/s
THROUGHPUT_BAR = 0.80
#: memory growth from warm-up to end still called flat
MEMORY_GROWTH_BOUND = 0.05
CONFIGURATIONS = {
    "batched": ["--max-batch", "8", "--max-wait-ms", "10"],
    "unbatched": ["--max-batch", "1", "--max-wait-ms", "0"],
    "full_queue": ["--max-batch", "8", "--max-wait-ms", "10", "--max-queue", "4"],
}


def bottle_test_images(data: Path) -> list[Path]:
    images = sorted((data / "mvtec_ad" / "bottle" / "test").glob("*/*.png"))
    if not images:
        raise SystemExit(f"no bottle test images under {data / 'mvtec_ad' / 'bottle' / 'test'}; pass --data or set PATCHCORE_DATA")
    return images


def image_name(path: Path) -> str:
    """The name a test image is uploaded under (and answered with): its defect type and file name."""
    return f"{path.parent.name}__{path.name}"


# ---------------------------------------------------------------------------------------------
# The library's figures: reference scores, and the baseline scoring loop (child process)


def reference_predictions(model_file: Path, images: list[Path]) -> dict[str, dict]:
    """score and is_anomalous of each image from ``PatchCore.load(model).predict`` (batches of 8,
    its default), and the score with ``batch_size=1`` too (the backbone's float32 sums can differ in
    the last digits between a batch of one and larger batches); models freed after."""
    import gc

    from patchcore import PatchCore

    reference: dict[str, dict] = {}
    for batch_size, suffix in ((8, ""), (1, "_batch_1")):
        model = PatchCore.load(model_file, device="cpu", batch_size=batch_size, progress=False)
        for path, prediction in zip(images, model.predict(images)):
            if prediction.error is not None:
                raise RuntimeError(f"the library could not score {path}: {prediction.error}")
            entry = reference.setdefault(image_name(path), {})
            entry["score" + suffix], entry["is_anomalous" + suffix] = prediction.score, bool(prediction.is_anomalous)
        del model
        gc.collect()
    return reference


def worker_baseline(model_file: Path, data: Path, seconds: float) -> dict:
    """images/s of ``iter_predictions`` + ``to_record`` over the 83 images, whole passes, for about ``seconds``."""
    from patchcore import PatchCore

    images = bottle_test_images(data)
    started = time.perf_counter()
    model = PatchCore.load(model_file, device="cpu", progress=False)
    load_seconds = time.perf_counter() - started
    for prediction in model.iter_predictions(images[: model.batch_size]):  # warm-up, not timed
        prediction.to_record()
    scored, passes, started = 0, 0, time.perf_counter()
    while passes == 0 or time.perf_counter() - started < seconds:
        for prediction in model.iter_predictions(images):
            prediction.to_record()
            scored += prediction.error is None
        passes += 1
    elapsed = time.perf_counter() - started
    return {"images": scored, "passes": passes, "seconds": elapsed, "images_per_second": scored / elapsed, "load_seconds": load_seconds}


def run_child(*arguments: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {' '.join(arguments)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cli_baseline(model_file: Path, data: Path, passes: int, reference: dict[str, dict]) -> dict:
    """`patchcore predict MODEL test/ x passes --no-pictures --quiet`: wall time with start-up, and its scores checked."""
    test = data / "mvtec_ad" / "bottle" / "test"
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "patchcore.cli", "predict", str(model_file), *[str(test)] * passes, "--out", out, "--no-pictures", "--quiet", "--device", "cpu"]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        seconds = time.perf_counter() - started
        records = [json.loads(line) for line in (Path(out) / "predictions.jsonl").read_text().splitlines()]
    differences = [abs(r["score"] - reference[image_name(Path(r["path"]))]["score"]) for r in records]
    return {
        "command": f"patchcore predict MODEL {' '.join(['bottle/test'] * passes)} --out DIR --no-pictures --quiet --device cpu",
        "images": len(records), "passes": passes, "seconds": seconds, "images_per_second": len(records) / seconds,
        "max_score_difference": max(differences),
    }


# ---------------------------------------------------------------------------------------------
# Requests


def multipart(name: str, data: bytes) -> bytes:
    """One file field, encoded once, so that each request costs the client no encoding."""
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\nContent-Type: image/png\r\n\r\n'
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def pixel_bomb_png(width: int = 8_000, height: int = 8_000) -> bytes:
    """A valid 1-bit grayscale PNG of ``width`` x ``height`` black pixels, compressed row by row."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    packer = zlib.compressobj(9)
    block = row * 1000
    compressed = b"".join(packer.compress(block) for _ in range(height // 1000)) + packer.compress(row * (height % 1000)) + packer.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + chunk(b"IDAT", compressed) + chunk(b"IEND", b"")


def build_bodies(images: list[Path], max_request_mb: float) -> dict[str, bytes]:
    """Every distinct request body: one per test image, and one per kind of bad request."""
    bodies = {image_name(path): multipart(image_name(path), path.read_bytes()) for path in images}
    real = images[0].read_bytes()
    over = int(max_request_mb * 1024 * 1024) + 64 * 1024
    bodies["not_an_image"] = multipart("notes.png", b"these are notes, not an image\n" * 40)
    bodies["truncated"] = multipart("truncated.png", real[: len(real) // 2])
    bodies["oversized"] = multipart("oversized.png", bytes(over))
    bodies["pixel_bomb"] = multipart("pixel_bomb.png", pixel_bomb_png())
    return bodies


def request_list(images: list[Path], count: int, bad_share: float, seed: int) -> list[str]:
    """``count`` request keys: the images in turn, with bad ones (kinds in turn) mixed in, shuffled with ``seed``."""
    rng = random.Random(seed)
    bad = round(count * bad_share)
    kinds = list(BAD_KINDS)
    keys = [kinds[i % len(kinds)] for i in range(bad)]
    names = [image_name(p) for p in images]
    while len(keys) < count:
        rng.shuffle(names)
        keys.extend(names[: count - len(keys)])
    rng.shuffle(keys)
    return keys


# ---------------------------------------------------------------------------------------------
# The server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (every process, every core)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text to {'name{labels}': value}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def batch_figures(metrics: dict[str, float]) -> dict:
    count, total = metrics.get("patchcore_batch_size_count", 0.0), metrics.get("patchcore_batch_size_sum", 0.0)
    buckets = []
    for key, value in metrics.items():
        if match := re.fullmatch(r'patchcore_batch_size_bucket\{le="([^"]+)"\}', key):
            buckets.append((math.inf if match[1] == "+Inf" else float(match[1]), value))
    buckets.sort()
    histogram, below, lower = {}, 0.0, 0
    for bound, cumulative in buckets:
        if cumulative - below > 0:
            if bound == math.inf:
                label = f">{lower}"
            else:
                label = str(int(bound)) if int(bound) == lower + 1 else f"{lower + 1}-{int(bound)}"
            histogram[label] = int(cumulative - below)
        below = cumulative
        lower = int(bound) if bound != math.inf else lower
    return {"batches": int(count), "images": int(total), "mean_batch_size": total / count if count else 0.0, "histogram": histogram}


class Server:
    """`patchcore serve MODEL --port P --device cpu OPTIONS` in a subprocess. Its decision record
    (on by default, as for a user) goes to ``state`` (its ``$XDG_STATE_HOME``; default: a folder
    beside the log), never to the user's own state folder."""

    def __init__(self, model_file: Path, options: list[str], log: Path, state: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._handle = open(log, "w")  # noqa: SIM115 - open for the server's whole life, closed in stop()
        command = [sys.executable, "-m", "patchcore.cli", "serve", str(model_file), "--port", str(self.port), "--device", "cpu", *options]
        self.command = command
        self.state = state or log.with_suffix(".state")
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": str(self.state)}
        self.process = subprocess.Popen(command, stdout=self._handle, stderr=subprocess.STDOUT, env=environment)

    def wait_ready(self, timeout: float = 120.0) -> float:
        import httpx

        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2.0).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._handle.close()
        return self.process.returncode


# ---------------------------------------------------------------------------------------------
# One load run


async def load(url: str, model_name: str, pid: int, keys: list[str], bodies: dict[str, bytes], reference: dict[str, dict], clients: int) -> dict:
    import httpx

    predict_url = f"{url}/v2/models/{model_name}/predict"
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    outcomes: list[dict | None] = [None] * len(keys)
    attempts_503: list[dict] = []
    answered = 0
    rss: list[tuple[float, float, int]] = []  # (seconds from start, MB, requests answered)
    health: list[tuple[int, float]] = []
    order = iter(range(len(keys)))
    done = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal answered
        for number in order:
            key = keys[number]
            attempts, first_sent = 0, time.perf_counter()
            while True:
                attempts += 1
                started = time.perf_counter()
                try:
                    response = await client.post(predict_url, content=bodies[key], headers=headers)
                except httpx.HTTPError as error:
                    outcomes[number] = {"key": key, "status": None, "transport_error": f"{type(error).__name__}: {error}", "attempts": attempts}
                    break
                latency = time.perf_counter() - started
                if response.status_code == 503 and attempts < 100:
                    retry_after = response.headers.get("retry-after")
                    attempts_503.append({"retry_after": retry_after})
                    await asyncio.sleep(float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else 1.0)
                    continue
                outcomes[number] = judge(key, response, latency, attempts, reference)
                outcomes[number]["latency_with_retries"] = time.perf_counter() - first_sent
                break
            answered += 1

    async def sample_memory(origin: float) -> None:
        while not done.is_set():
            if (mb := rss_mb(pid)) is not None:
                rss.append((time.perf_counter() - origin, mb, answered))
            try:
                await asyncio.wait_for(done.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    async def probe_health() -> None:
        async with httpx.AsyncClient(timeout=60.0) as prober:
            while not done.is_set():
                started = time.perf_counter()
                try:
                    status = (await prober.get(f"{url}/v2/health/ready")).status_code
                except httpx.HTTPError:
                    status = 0
                health.append((status, time.perf_counter() - started))
                try:
                    await asyncio.wait_for(done.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    cpu_client, cpu_server, cpu_machine = time.process_time(), cpu_seconds(pid), busy_cpu_seconds()
    origin = time.perf_counter()
    background = [asyncio.create_task(sample_memory(origin)), asyncio.create_task(probe_health())]
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    wall = time.perf_counter() - origin
    done.set()
    await asyncio.gather(*background)
    cpu_client, cpu_server, cpu_machine = time.process_time() - cpu_client, cpu_seconds(pid) - cpu_server, busy_cpu_seconds() - cpu_machine
    async with httpx.AsyncClient(timeout=30.0) as client:
        metrics = parse_metrics((await client.get(f"{url}/metrics")).text)
    return {"outcomes": outcomes, "attempts_503": attempts_503, "wall": wall, "rss": rss, "health": health,
            "metrics": metrics, "cpu_client": cpu_client, "cpu_server": cpu_server, "cpu_machine": cpu_machine}


def judge(key: str, response, latency: float, attempts: int, reference: dict[str, dict]) -> dict:
    """What one answer was, and whether it was the right one."""
    outcome = {"key": key, "status": response.status_code, "latency": latency, "attempts": attempts}
    try:
        body = response.json()
    except ValueError:
        outcome["problem"] = "answer is not JSON"
        return outcome
    expected = BAD_KINDS.get(key, 200)
    results = body.get("results") or []
    # the decision ids a recording server gives (record_load.py finds them in its record)
    outcome["decision_ids"] = [result.get("decision_id") for result in results if isinstance(result, dict)]
    if response.status_code != expected:
        outcome["problem"] = f"expected {expected}, got {response.status_code}: {str(body)[:200]}"
    elif expected != 200:
        if results and results[0].get("status") != expected:
            outcome["problem"] = f"result status {results[0].get('status')} in a {expected} answer"
    elif len(results) != 1 or results[0].get("path") != key or "score" not in results[0]:
        outcome["problem"] = f"unexpected results {str(results)[:200]}"
    else:
        mine = reference[key]
        outcome["score_difference"] = abs(results[0]["score"] - mine["score"])
        outcome["relative_score_difference"] = outcome["score_difference"] / abs(mine["score"])
        outcome["score_difference_nearer"] = min(outcome["score_difference"], abs(results[0]["score"] - mine["score_batch_1"]))
        outcome["decision_matches"] = results[0]["is_anomalous"] == mine["is_anomalous"]
    return outcome


def percentile(values: list[float], share: float) -> float:
    import numpy as np

    return float(np.percentile(values, 100 * share)) if values else math.nan


def summarise(name: str, options: list[str], raw: dict, keys: list[str], ready_seconds: float, exit_code: int, tolerance: float) -> dict:
    outcomes = raw["outcomes"]
    statuses = Counter(str(o["status"]) if o and o["status"] is not None else "transport_error" for o in outcomes)
    transport_errors = sum(1 for o in outcomes if o is None or o["status"] is None)
    scored = [o for o in outcomes if o and o["status"] == 200]
    problems = [o for o in outcomes if o and "problem" in o]
    bad = {kind: Counter(str(o["status"]) for o in outcomes if o and o["key"] == kind) for kind in BAD_KINDS}
    differences = [o["score_difference"] for o in scored if "score_difference" in o]
    nearer = [o["score_difference_nearer"] for o in scored if "score_difference_nearer" in o]
    latencies = [o["latency"] for o in scored]
    total_requests = len(outcomes) + len(raw["attempts_503"])
    server_errors = {status: count for status, count in statuses.items() if status.startswith("5")}
    retry_after = Counter(a["retry_after"] for a in raw["attempts_503"])

    # Resident memory swings by a batch's worth (decoded images, maps) from one sample to the next,
    # so "after warm-up" and "end" are medians of the samples taken while the second 10% of the
    # requests were answered, and while the last 10% were.
    rss = raw["rss"]
    warm_mark = math.ceil(WARM_UP_SHARE * len(keys))
    warm_window = [mb for _, mb, count in rss if warm_mark <= count < 2 * warm_mark] or [mb for _, mb, count in rss if count >= warm_mark][:1]
    end_window = [mb for _, mb, count in rss if count >= len(keys) - warm_mark] or [mb for _, mb, _ in rss[-1:]]
    warm = percentile(warm_window, 0.5)
    end = percentile(end_window, 0.5)
    health_latencies = [seconds for _, seconds in raw["health"]]
    summary = {
        "server_options": ["--device", "cpu", *options],
        "ready_seconds": ready_seconds,
        "requests": len(outcomes),
        "requests_sent_with_retries": total_requests,
        "wall_seconds": raw["wall"],
        "requests_per_second": total_requests / raw["wall"],
        "answered_requests_per_second": len(outcomes) / raw["wall"],
        "images_scored": len(scored),
        "images_scored_per_second": len(scored) / raw["wall"],
        "latency_ms": {"p50": 1000 * percentile(latencies, 0.50), "p90": 1000 * percentile(latencies, 0.90), "p99": 1000 * percentile(latencies, 0.99), "max": 1000 * max(latencies, default=math.nan)},
        "latency_with_503_retries_ms": {
            "p50": 1000 * percentile([o["latency_with_retries"] for o in scored], 0.50),
            "p99": 1000 * percentile([o["latency_with_retries"] for o in scored], 0.99),
        },
        "bad_request_latency_ms_p50": {kind: 1000 * percentile([o["latency"] for o in outcomes if o and o["key"] == kind and "latency" in o], 0.5) for kind in BAD_KINDS},
        "transport_errors": transport_errors,
        "status_counts": dict(sorted(statuses.items())),
        "answers_503": len(raw["attempts_503"]),
        "answers_503_retry_after": dict(retry_after),
        "server_errors_other_than_503": {s: c for s, c in server_errors.items() if s != "503"},
        "bad_requests": {kind: {"expected": BAD_KINDS[kind], "got": dict(counts)} for kind, counts in bad.items()},
        "wrong_answers": len(problems),
        "wrong_answer_examples": [o["problem"] for o in problems[:5]],
        "max_score_difference": max(differences, default=math.nan),
        "max_score_difference_nearer_library_run": max(nearer, default=math.nan),
        "max_relative_score_difference": max((o["relative_score_difference"] for o in scored if "relative_score_difference" in o), default=math.nan),
        "max_attempts": max((o["attempts"] for o in outcomes if o), default=0),
        "decision_mismatches": sum(1 for o in scored if not o.get("decision_matches", False)),
        "memory_mb": {
            "after_warm_up": warm, "end": end, "last_sample": rss[-1][1] if rss else math.nan, "max": max((mb for _, mb, _ in rss), default=math.nan),
            "growth_warm_up_to_end": (end - warm) / warm if warm else math.nan, "samples": len(rss),
            "warm_up_mark_requests": warm_mark,
            "trace": [(round(t, 1), round(mb, 1), count) for t, mb, count in rss[:: max(1, len(rss) // 60)]],
        },
        "batches": batch_figures(raw["metrics"]),
        "health_probe": {"probes": len(raw["health"]), "not_200": sum(1 for s, _ in raw["health"] if s != 200), "max_ms": 1000 * max(health_latencies, default=math.nan), "p50_ms": 1000 * percentile(health_latencies, 0.5)},
        "cpu_seconds": {
            "server": raw["cpu_server"], "client": raw["cpu_client"], "whole_machine": raw["cpu_machine"],
            "server_cores_busy": raw["cpu_server"] / raw["wall"], "client_cores_busy": raw["cpu_client"] / raw["wall"],
            # what other processes on this shared machine took meanwhile (its noise)
            "other_processes_cores_busy": max(0.0, raw["cpu_machine"] - raw["cpu_server"] - raw["cpu_client"]) / raw["wall"],
        },
        "server_exit_code": exit_code,
    }
    allowed_503 = name == "full_queue"
    summary["checks"] = {
        "all_answered": transport_errors == 0 and all(o is not None for o in outcomes),
        "no_unexpected_5xx": not summary["server_errors_other_than_503"] and (allowed_503 or len(raw["attempts_503"]) == 0) and all(s[0] != "5" for s in statuses),
        "every_503_has_retry_after": all(a["retry_after"] for a in raw["attempts_503"]),
        "bad_requests_get_expected_status": all(set(counts) <= {str(BAD_KINDS[kind])} for kind, counts in bad.items()),
        "every_answer_right": not problems,
        "scores_equal_library": bool(differences) and max(differences) <= tolerance and summary["decision_mismatches"] == 0,
        "memory_flat": abs(summary["memory_mb"]["growth_warm_up_to_end"]) <= MEMORY_GROWTH_BOUND,
        "health_answered_200": summary["health_probe"]["not_200"] == 0,
    }
    if allowed_503:
        summary["checks"]["queue_full_answered_503"] = len(raw["attempts_503"]) > 0
    return summary


def run_configuration(name: str, model_file: Path, keys: list[str], bodies: dict[str, bytes], reference: dict[str, dict], args: argparse.Namespace, scratch: Path) -> dict:
    options = list(CONFIGURATIONS[name])
    if args.max_request_mb is not None:
        options += ["--max-request-mb", str(args.max_request_mb)]
    server = Server(model_file, options, scratch / f"server_{name}.log")
    try:
        ready = server.wait_ready()
        raw = asyncio.run(load(server.url, model_file.stem, server.process.pid, keys, bodies, reference, args.clients))
    finally:
        exit_code = server.stop()
    summary = summarise(name, options, raw, keys, ready, exit_code, args.score_tolerance)
    log = server.log.read_text()
    summary["server_log_tail"] = log[-1500:]
    return summary


# ---------------------------------------------------------------------------------------------


def main_run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    images = bottle_test_images(args.data)
    results: dict = stamped(provenance(), {
        "requests": args.requests, "full_queue_requests": args.full_queue_requests, "clients": args.clients,
        "bad_share": args.bad_share, "seed": args.seed,
        "max_request_mb": args.max_request_mb if args.max_request_mb is not None else 32.0,
        "max_request_mb_source": "--max-request-mb passed to the server" if args.max_request_mb is not None else "the server's default",
        "images": {"count": len(images), "good": sum(p.parent.name == "good" for p in images)},
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
        results["reference_scores"] = reference
        results["score_tolerance"] = args.score_tolerance
        results["library_batch_1_vs_batch_8_max_score_difference"] = max(abs(v["score"] - v["score_batch_1"]) for v in reference.values())
        results["library_batch_1_vs_batch_8_decisions_differing"] = sum(v["is_anomalous"] != v["is_anomalous_batch_1"] for v in reference.values())
        bodies = build_bodies(images, results["max_request_mb"])
        results["bad_request_bytes"] = {kind: len(bodies[kind]) for kind in BAD_KINDS}

        def baseline(label: str) -> dict:
            figures = run_child("--worker-baseline", str(model_file), "--data", str(args.data), "--baseline-seconds", str(args.baseline_seconds))
            print(f"baseline ({label}): {figures['images_per_second']:.2f} images/s over {figures['images']} images in {figures['seconds']:.1f} s", flush=True)
            return figures | {"when": label}

        baselines = [baseline("before batched")]
        passes = max(1, round(args.baseline_seconds * baselines[0]["images_per_second"] / len(images)))
        print(f"baseline: patchcore predict over the test folder x {passes}", flush=True)
        results["cli_predict"] = cli_baseline(model_file, args.data, passes, reference)
        print(f"  {results['cli_predict']['images_per_second']:.2f} images/s, start-up included ({results['cli_predict']['seconds']:.1f} s)", flush=True)

        runs = {}
        names = [n for n in CONFIGURATIONS if not (n == "full_queue" and args.full_queue_requests <= 0)]
        for position, name in enumerate(names):
            count = args.full_queue_requests if name == "full_queue" else args.requests
            keys = request_list(images, count, args.bad_share, args.seed)
            print(f"{name}: {count} requests from {args.clients} clients, server {' '.join(CONFIGURATIONS[name])}", flush=True)
            runs[name] = run_configuration(name, model_file, keys, bodies, reference, args, scratch)
            r = runs[name]
            print(
                f"  {r['images_scored_per_second']:.2f} images scored/s, {r['requests_per_second']:.2f} requests/s, p50/p90/p99 "
                f"{r['latency_ms']['p50']:.0f}/{r['latency_ms']['p90']:.0f}/{r['latency_ms']['p99']:.0f} ms, mean batch {r['batches']['mean_batch_size']:.2f}, "
                f"RSS {r['memory_mb']['after_warm_up']:.0f} -> {r['memory_mb']['end']:.0f} MB, statuses {r['status_counts']}, "
                f"max |score diff| {r['max_score_difference']:.2e}; checks {'all pass' if all(r['checks'].values()) else [k for k, v in r['checks'].items() if not v]}",
                flush=True,
            )
            if name != "full_queue" or position + 1 < len(names):
                baselines.append(baseline(f"after {name}"))
            bracket = baselines[-2:] if len(baselines) >= 2 else baselines
            r["baseline_images_per_second"] = sum(b["images_per_second"] for b in bracket) / len(bracket)
            r["ratio_to_library_baseline"] = r["images_scored_per_second"] / r["baseline_images_per_second"]
            r["ratio_to_cli_predict"] = r["images_scored_per_second"] / results["cli_predict"]["images_per_second"]
            if name != "full_queue":
                r["checks"]["throughput_at_least_bar"] = r["ratio_to_library_baseline"] >= THROUGHPUT_BAR
        results["baselines"] = baselines
        results["runs"] = runs
    results["all_checks_pass"] = all(all(r["checks"].values()) for r in runs.values())
    results["run_seconds"] = time.perf_counter() - started
    results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return results


def markdown(r: dict) -> str:
    runs = r["runs"]
    names = list(runs)
    header = "| | " + " | ".join(f"{n} (`{' '.join(runs[n]['server_options'][2:])}`)" for n in names) + " |"

    def row(label: str, value) -> str:
        return f"| {label} | " + " | ".join(value(runs[n]) for n in names) + " |"

    def statuses(run: dict) -> str:
        return ", ".join(f"{s}: {c}" for s, c in run["status_counts"].items())

    def bad(run: dict) -> str:
        return ", ".join(f"{k} {'/'.join(v['got'])}" for k, v in run["bad_requests"].items())

    lines = [
        f"Machine: {describe(r['machine'])}. Command: {headline(r)} ({r['run_seconds'] / 60:.0f} min in all, finished {r['finished']}).",
        "",
        (f"`patchcore serve` on MVTec AD bottle's {r['images']['count']} test images ({r['images']['good']} good) with a MobileNetV2 model, "
        f"{r['clients']} concurrent clients (httpx.AsyncClient, one process), one image per multipart request, "
        f"{r['bad_share']:.0%} bad requests (not an image, truncated PNG, body over {r['max_request_mb']:g} MB ({r['max_request_mb_source']}), "
        f"an 8000 x 8000 px 1-bit PNG), seed {r['seed']}. The full-queue run's clients honour Retry-After and send the request again."),
        "",
        header,
        "|---" * (len(names) + 1) + "|",
        row("requests (sent, with retries)", lambda x: f"{x['requests']} ({x['requests_sent_with_retries']})"),
        row("wall time (s)", lambda x: f"{x['wall_seconds']:.0f}"),
        row("requests/s", lambda x: f"{x['requests_per_second']:.2f}"),
        row("images scored/s", lambda x: f"{x['images_scored_per_second']:.2f}"),
        row("library baseline images/s (mean of the runs before and after)", lambda x: f"{x['baseline_images_per_second']:.2f}"),
        row("**server / library baseline**", lambda x: f"**{x['ratio_to_library_baseline']:.2f}**"),
        row("server / `patchcore predict` (start-up included)", lambda x: f"{x['ratio_to_cli_predict']:.2f}"),
        row("latency of scored requests p50 / p90 / p99 (ms)", lambda x: f"{x['latency_ms']['p50']:.0f} / {x['latency_ms']['p90']:.0f} / {x['latency_ms']['p99']:.0f}"),
        row("latency with 503 retries p50 / p99 (ms)", lambda x: f"{x['latency_with_503_retries_ms']['p50']:.0f} / {x['latency_with_503_retries_ms']['p99']:.0f}"),
        row("mean batch size (batches)", lambda x: f"{x['batches']['mean_batch_size']:.2f} ({x['batches']['batches']})"),
        row("batch sizes", lambda x: ", ".join(f"{k}: {v}" for k, v in x["batches"]["histogram"].items())),
        row("server RSS after warm-up / end (medians) / max (MB)", lambda x: f"{x['memory_mb']['after_warm_up']:.0f} / {x['memory_mb']['end']:.0f} / {x['memory_mb']['max']:.0f}"),
        row("RSS growth, warm-up to end", lambda x: f"{x['memory_mb']['growth_warm_up_to_end']:+.1%}"),
        row("transport errors", lambda x: str(x["transport_errors"])),
        row("final statuses", statuses),
        row("503 answers (Retry-After); most sends of one request", lambda x: f"{x['answers_503']}" + (f" (Retry-After {', '.join(f'{k}: {v}' for k, v in x['answers_503_retry_after'].items())})" if x["answers_503"] else "") + f"; {x['max_attempts']}"),
        row("bad requests' statuses", bad),
        row("max \\|score - library\\| (relative) / decisions differing", lambda x: f"{x['max_score_difference']:.1e} ({x['max_relative_score_difference']:.1e}) / {x['decision_mismatches']}"),
        row("max \\|score - nearer of the library's batch-8 and batch-1 runs\\|", lambda x: f"{x['max_score_difference_nearer_library_run']:.1e}"),
        row("health probe p50 / max (ms), not 200", lambda x: f"{x['health_probe']['p50_ms']:.0f} / {x['health_probe']['max_ms']:.0f}, {x['health_probe']['not_200']}"),
        row("CPU cores busy: server / client / other processes", lambda x: f"{x['cpu_seconds']['server_cores_busy']:.2f} / {x['cpu_seconds']['client_cores_busy']:.2f} / {x['cpu_seconds'].get('other_processes_cores_busy', math.nan):.2f}"),
        row("checks", lambda x: "all pass" if all(x["checks"].values()) else "FAIL: " + ", ".join(k for k, v in x["checks"].items() if not v)),
        "",
        ("Baselines: the library's loop `model.iter_predictions(paths)` + `to_record()` in a child process, model load and a warm-up batch "
        "excluded: " + ", ".join(f"{b['images_per_second']:.2f} images/s ({b['when']})" for b in r["baselines"]) + ". "
        f"`{r['cli_predict']['command']}`: {r['cli_predict']['images']} images in {r['cli_predict']['seconds']:.1f} s, "
        f"{r['cli_predict']['images_per_second']:.2f} images/s with start-up and model load (max |score - library| {r['cli_predict']['max_score_difference']:.1e})."),
        "",
        (f"Checks: every request answered; no 5xx but the full-queue run's 503s, each with Retry-After; each bad request its status "
        f"({', '.join(f'{k} {v}' for k, v in BAD_KINDS.items())}); every scored answer within {r['score_tolerance']:g} of the library's score "
        f"with the same decision (the library's own runs at batch sizes 8 and 1 differ by up to "
        f"{r['library_batch_1_vs_batch_8_max_score_difference']:.1e}, {r['library_batch_1_vs_batch_8_decisions_differing']} decisions differing); server RSS within "
        f"{MEMORY_GROWTH_BOUND:.0%} from after warm-up to end (medians of the samples over the second {WARM_UP_SHARE:.0%} of the requests and over the last); "
        f"/v2/health/ready answering 200 throughout; server images/s at least {THROUGHPUT_BAR:.2f} x the library's (batched and unbatched; "
        f"not the full-queue run, whose clients wait a second after each 503). "
        f"All pass: {'yes' if r['all_checks_pass'] else 'NO'}."),
    ]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model file (default: fit bottle with MobileNetV2 into a temporary folder)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PATCHCORE_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--requests", type=int, default=4000, help="requests per configuration (default: %(default)s)")
    parser.add_argument("--full-queue-requests", type=int, default=1000, help="requests of the --max-queue 4 run; 0 skips it (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--bad-share", type=float, default=0.05, help="share of bad requests (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-request-mb", type=float, help="passed to the server, and the oversized body made just over it (default: the server's 32 MB)")
    parser.add_argument("--score-tolerance", type=float, default=SCORE_TOLERANCE, help="largest |score - library score| passed (default: %(default)s)")
    parser.add_argument("--baseline-seconds", type=float, default=20.0, help="length of each library baseline run (default: %(default)s)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite serve_load.md from serve_load.json")
    parser.add_argument("--worker-baseline", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    if arguments.worker_baseline:
        print(json.dumps(worker_baseline(arguments.worker_baseline, arguments.data, arguments.baseline_seconds)))
    elif arguments.markdown_only:
        summary = json.loads((arguments.out / "serve_load.json").read_text())
        (arguments.out / "serve_load.md").write_text(markdown(summary))
        print(markdown(summary))
    else:
        arguments.out.mkdir(parents=True, exist_ok=True)
        summary = main_run(arguments)
        (arguments.out / "serve_load.json").write_text(json.dumps(summary, indent=2) + "\n")
        (arguments.out / "serve_load.md").write_text(markdown(summary))
        print(markdown(summary))
