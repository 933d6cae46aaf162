"""Hostile load on `patchcore serve`: memory, answers and the line's own stream under an attack mix.

    .venv/bin/python benchmarks/hostile_load.py [--model FILE] [--data ../shared/data] [--out benchmarks/results]
                                                [--seconds 120] [--baseline-seconds 40] [--hostile-clients 16]
                                                [--single-clients 4] [--bad-clients 2] [--normal-clients 2] [--seed 0]
                                                [--server-option=--max-memory-mb=1024 ...] [--label hostile_load]

Starts the real server (`patchcore serve MODEL --device cpu` in a subprocess, on 127.0.0.1 and a free
port; with its default limits unless --server-option says otherwise) and sends it, from this one
process, only to 127.0.0.1, for a bounded time and a bounded number of clients:

- the normal stream: ``--normal-clients`` clients (a line's cameras), each sending one MVTec AD
  bottle test image (seeded order), and its next when the last is answered; a 503 is retried after
  its Retry-After. Every answer is checked against the library's own score and decision for the
  image (``PatchCore.load(model).predict`` in this process, before the server starts).
- first alone for ``--baseline-seconds`` (its throughput and latency without the attack), then
  beside the attack for ``--seconds``:
- ``--hostile-clients`` clients sending, back to back, requests of 4 images each: one-colour PNGs
  just under the server's pixel limit (8-bit RGB, 16-bit gray, 8-bit gray, RGBA; tens of KB on the
  wire, 40 MP each decoded), with pictures asked for: the load that killed the server before the
  intake and the budget (16 such clients took it to 23 GB in 40 s);
- ``--single-clients`` clients sending those images one a request, back to back (these fit the
  budget one at a time, so admission, waiting and 503 are exercised, not only 413);
- ``--bad-clients`` clients cycling through bad requests, each with the status it must get: a
  truncated PNG (422), a text file (415), an EPS (415), a body just over --max-request-mb (413),
  headers sent a byte every 0.5 s (408 after the header timeout), a body sent 1 KB a second (408
  after the read timeout);
- a readiness probe every 0.5 s (/v2/health/ready, must answer 200 throughout).

A watchdog samples the resident memory of the server's whole process tree every 0.1 s and kills
it if it passes its idle size plus the memory budget plus 2 GB, so that a failed run cannot take
the machine down. Reported: idle and peak memory of the tree, every status code per client kind,
transport errors (dropped connections), readiness, the normal stream's images/s and p50/p99
latency alone and under attack, and the checks of the issue's bar. Written to
``--out/LABEL.json`` and ``.md`` with the commit, the command and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image
from provenance import provenance, stamped  # benchmarks/provenance.py: this folder is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
BOUNDARY = "patchcore-hostile-boundary"
#: the server's defaults, which the hostile images are made to fit just under
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_REQUEST_MB = 32.0
#: the watchdog's margin over the idle server and its budget
WATCHDOG_MARGIN_BYTES = 2 * 2**30
#: what the issue allows over the idle server at the default budget on this machine
OVER_IDLE_BAR_BYTES = 1.5 * 2**30
#: the normal stream's throughput under attack over alone, at least
THROUGHPUT_BAR = 0.5
#: largest |score difference| from the library allowed for a normal image (batches of different
#: sizes differ in the last digits)
SCORE_TOLERANCE = 1e-4
BAD_KINDS = {"truncated": 422, "text": 415, "eps": 415, "oversized": 413, "slow_headers": 408, "slow_body": 408}


# ---------------------------------------------------------------------------------------------
# What is sent


def multipart(files: list[tuple[str, bytes]]) -> bytes:
    parts = []
    for name, data in files:
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def hostile_images(max_pixels: int) -> dict[str, bytes]:
    """One-colour PNGs just under ``max_pixels``: 8-bit RGB, 16-bit gray, 8-bit gray, RGBA."""
    side = math.isqrt(max_pixels - 1)
    made = {}
    for kind, make in (
        ("rgb8", lambda: Image.new("RGB", (side, side), (90, 140, 200))),
        ("gray16", lambda: Image.fromarray(np.full((side, side), 30_000, dtype=np.uint16))),
        ("gray8", lambda: Image.new("L", (side, side), 90)),
        ("rgba8", lambda: Image.new("RGBA", (side, side), (90, 140, 200, 128))),
    ):
        buffer = io.BytesIO()
        make().save(buffer, format="PNG", optimize=True)
        made[kind] = buffer.getvalue()
    return made


def bad_bodies(good_png: bytes, max_request_mb: float) -> dict[str, bytes]:
    eps = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(eps, format="EPS")
    return {
        "truncated": multipart([("truncated.png", good_png[: len(good_png) // 2])]),
        "text": multipart([("notes.png", b"this is not an image\n" * 20)]),
        "eps": multipart([("drawing.eps", eps.getvalue())]),
        "oversized": multipart([("huge.png", b"\0" * (int(max_request_mb * 2**20) + 1024))]),
    }


# ---------------------------------------------------------------------------------------------
# The server and the watchdog


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of a process and all its children."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


class Watchdog(threading.Thread):
    """Samples the server tree's memory every 0.1 s; kills the tree past ``limit`` bytes."""

    def __init__(self, pid: int, limit: int) -> None:
        super().__init__(daemon=True)
        self.process, self.limit = psutil.Process(pid), limit
        self.peak = 0
        self.killed = False
        self.stop = threading.Event()
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        started = time.monotonic()
        while not self.stop.is_set():
            try:
                rss = tree_rss(self.process)
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self.samples.append((time.monotonic() - started, rss))
            if rss > self.limit:
                self.killed = True
                for member in [*self.process.children(recursive=True), self.process]:
                    try:
                        member.kill()
                    except psutil.Error:
                        pass
                return
            time.sleep(0.1)


def start_server(model: Path, options: list[str], log: Path) -> tuple[subprocess.Popen, str, int]:
    port = free_port()
    command = [sys.executable, "-m", "patchcore.cli", "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *options]
    # its decision record (on by default, as for a user) goes beside the log, not to the user's state folder
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": str(log.with_suffix(".state"))}
    process = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return process, url, port
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not ready: {log.read_text()}")


# ---------------------------------------------------------------------------------------------
# The clients


class Tally:
    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.wrong: list[str] = []

    def as_dict(self) -> dict:
        return {"statuses": dict(sorted(self.statuses.items())), "transport_errors": dict(self.errors), "wrong": self.wrong[:20], "wrong_count": len(self.wrong)}


async def normal_client(client: httpx.AsyncClient, url: str, stream: list[tuple[str, bytes]], reference: dict, end: float, tally: Tally, latencies: list[float], stop: asyncio.Event) -> None:
    """One camera: an image, its answer, the next; a 503 retried after its Retry-After."""
    position = 0
    while time.monotonic() < end and not stop.is_set():
        name, body = stream[position % len(stream)]
        position += 1
        started = time.monotonic()
        while True:
            try:
                reply = await client.post(f"{url}/v2/models/bottle/predict", content=body, headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, timeout=120)
            except httpx.TransportError as error:
                tally.errors[type(error).__name__] += 1
                await asyncio.sleep(0.2)
                continue
            tally.statuses[str(reply.status_code)] += 1
            if reply.status_code == 503:
                if "retry-after" not in reply.headers:
                    tally.wrong.append(f"{name}: 503 without Retry-After")
                await asyncio.sleep(float(reply.headers.get("retry-after", "1")))
                continue
            break
        if reply.status_code != 200:
            tally.wrong.append(f"{name}: status {reply.status_code}: {reply.text[:200]}")
            continue
        result = reply.json()["results"][0]
        expected = reference[name]
        if abs(result["score"] - expected["score"]) > SCORE_TOLERANCE or result["is_anomalous"] != expected["is_anomalous"]:
            tally.wrong.append(f"{name}: score {result['score']:.6f} / {result['is_anomalous']} against the library's {expected['score']:.6f} / {expected['is_anomalous']}")
            continue
        latencies.append(time.monotonic() - started)


async def hostile_client(client: httpx.AsyncClient, url: str, bodies: list[bytes], end: float, tally: Tally) -> None:
    """Back to back, whatever the answer."""
    position = 0
    while time.monotonic() < end:
        body = bodies[position % len(bodies)]
        position += 1
        try:
            reply = await client.post(f"{url}/v2/models/bottle/predict?picture=true", content=body, headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, timeout=300)
            tally.statuses[str(reply.status_code)] += 1
            if reply.status_code == 503 and "retry-after" not in reply.headers:
                tally.wrong.append("503 without Retry-After")
            if reply.status_code >= 500 and reply.status_code != 503:
                tally.wrong.append(f"status {reply.status_code}: {reply.text[:200]}")
        except httpx.TransportError as error:
            tally.errors[type(error).__name__] += 1
            await asyncio.sleep(0.1)


async def slow_exchange(port: int, head: bytes, piece: bytes, gap: float) -> tuple[int | None, str | None]:
    """Send ``head``, then ``piece`` every ``gap`` s until the server answers: its status, or what went wrong."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as error:
        return None, type(error).__name__
    try:
        writer.write(head)
        await writer.drain()
        answer = asyncio.ensure_future(reader.readline())
        deadline = time.monotonic() + 120  # far past the server's timeouts
        while not answer.done() and time.monotonic() < deadline:
            await asyncio.wait([answer], timeout=gap)
            if not answer.done():
                writer.write(piece)
                await writer.drain()
        line = await asyncio.wait_for(answer, 10)
        if not line.startswith(b"HTTP/1.1 "):
            return None, "closed without an answer"
        return int(line.split()[1]), None
    except (OSError, asyncio.TimeoutError) as error:
        return None, type(error).__name__
    finally:
        writer.close()


async def bad_client(client: httpx.AsyncClient, url: str, port: int, bodies: dict[str, bytes], end: float, tallies: dict[str, Tally], order: list[str]) -> None:
    position = 0
    while time.monotonic() < end:
        kind = order[position % len(order)]
        position += 1
        tally = tallies[kind]
        if kind == "slow_headers":
            head = b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
            status, error = await slow_exchange(port, head, b"a", 0.5)
        elif kind == "slow_body":
            head = f"POST /v2/models/bottle/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: {2**20}\r\n\r\n".encode()
            status, error = await slow_exchange(port, head, b"\0" * 1024, 1.0)
        else:
            try:
                reply = await client.post(f"{url}/v2/models/bottle/predict", content=bodies[kind], headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, timeout=120)
                status, error = reply.status_code, None
            except httpx.TransportError as failure:
                status, error = None, type(failure).__name__
        if error is not None:
            tally.errors[error] += 1
        else:
            tally.statuses[str(status)] += 1
            if status != BAD_KINDS[kind] and not (status == 503 and kind != "slow_headers"):
                tally.wrong.append(f"status {status}, expected {BAD_KINDS[kind]}")


async def readiness_probe(url: str, end: float, results: list[tuple[int | str, float]]) -> None:
    async with httpx.AsyncClient() as client:
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                reply = await client.get(f"{url}/v2/health/ready", timeout=30)
                results.append((reply.status_code, time.monotonic() - started))
            except httpx.TransportError as error:
                results.append((type(error).__name__, time.monotonic() - started))
            await asyncio.sleep(0.5)


def stream_figures(latencies: list[float], seconds: float) -> dict:
    ordered = sorted(latencies)

    def at(share: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else math.nan

    return {"images": len(latencies), "seconds": seconds, "images_per_second": len(latencies) / seconds, "latency_ms": {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": at(1.0)}}


async def phase(url: str, port: int, seconds: float, normal_stream: list, reference: dict, args, attack: dict | None) -> dict:
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    normal_tally, latencies, stop = Tally(), [], asyncio.Event()
    readiness: list = []
    tasks = []
    async with httpx.AsyncClient(limits=limits) as normal, httpx.AsyncClient(limits=limits) as attacker:
        rng = random.Random(args.seed)
        for number in range(args.normal_clients):
            own = normal_stream[:]
            rng.shuffle(own)
            tasks.append(normal_client(normal, url, own, reference, end, normal_tally, latencies, stop))
        tasks.append(readiness_probe(url, end, readiness))
        tallies = {}
        if attack is not None:
            tallies = {"hostile_4_images": Tally(), "hostile_1_image": Tally(), **{kind: Tally() for kind in BAD_KINDS}}
            quad = multipart([(f"{kind}.png", data) for kind, data in attack["images"].items()])
            singles = [multipart([(f"{kind}.png", data)]) for kind, data in attack["images"].items()]
            tasks += [hostile_client(attacker, url, [quad], end, tallies["hostile_4_images"]) for _ in range(args.hostile_clients)]
            tasks += [hostile_client(attacker, url, singles[i:] + singles[:i], end, tallies["hostile_1_image"]) for i in range(args.single_clients)]
            kinds = list(BAD_KINDS)
            tasks += [bad_client(attacker, url, port, attack["bad"], end, tallies, kinds[i:] + kinds[:i]) for i in range(args.bad_clients)]
        started = time.monotonic()
        await asyncio.gather(*tasks)
        wall = time.monotonic() - started
    return {
        "normal": {**stream_figures(latencies, seconds), **normal_tally.as_dict()},
        "attack": {kind: tally.as_dict() for kind, tally in tallies.items()},
        "readiness": {
            "probes": len(readiness), "statuses": dict(Counter(str(s) for s, _ in readiness)),
            "max_latency_ms": 1000 * max((t for _, t in readiness), default=math.nan),
        },
        "wall_seconds": wall,
    }


# ---------------------------------------------------------------------------------------------
# Running it


def reference_predictions(model: Path, images: list[Path]) -> dict[str, dict]:
    from patchcore import PatchCore

    library = PatchCore.load(model, device="cpu", progress=False)
    return {f"{p.parent.name}/{p.name}": {"score": r.score, "is_anomalous": bool(r.is_anomalous)} for p, r in zip(images, library.predict(images))}


def option_value(options: list[str], name: str, default: float) -> float:
    for i, option in enumerate(options):
        if option == name and i + 1 < len(options):
            return float(options[i + 1])
        if option.startswith(name + "="):
            return float(option.split("=", 1)[1])
    return default


def run(args: argparse.Namespace, fields: dict) -> dict:
    options = [part for option in args.server_option for part in option.split("=", 1)] if args.server_option else []
    max_pixels = int(option_value(options, "--max-image-pixels", DEFAULT_MAX_IMAGE_PIXELS))
    max_request_mb = option_value(options, "--max-request-mb", DEFAULT_MAX_REQUEST_MB)
    images = sorted((args.data / "mvtec_ad" / "bottle" / "test").rglob("*.png"))
    results: dict = stamped(fields, {
        "server_options": ["--device", "cpu", *options],
        "seconds": args.seconds, "baseline_seconds": args.baseline_seconds, "clients": {
            "normal": args.normal_clients, "hostile_4_images": args.hostile_clients, "hostile_1_image": args.single_clients, "bad": args.bad_clients,
        },
    })
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = args.model
        if model is None:
            model = scratch / "bottle.safetensors"
            print(f"fit: bottle, MobileNetV2 -> {model}", flush=True)
            subprocess.run([sys.executable, "-m", "patchcore.cli", "fit", str(args.data / "mvtec_ad" / "bottle"), "--backbone", "mobilenet_v2", "--out", str(model), "--quiet"], check=True)
        print("reference: the library's score and decision for each bottle test image", flush=True)
        reference = reference_predictions(model, images)
        normal_stream = [(f"{p.parent.name}/{p.name}", multipart([(f"{p.parent.name}/{p.name}", p.read_bytes())])) for p in images]
        print(f"hostile images: 4 one-colour PNGs of {math.isqrt(max_pixels - 1)}^2 px", flush=True)
        attack = {"images": hostile_images(max_pixels), "bad": bad_bodies(images[0].read_bytes(), max_request_mb)}
        results["hostile_image_bytes"] = {kind: len(data) for kind, data in attack["images"].items()}
        log = scratch / "server.log"
        process, url, port = start_server(model, options, log)
        try:
            server = httpx.get(f"{url}/v2/models/bottle").json()["server"]
            budget = int(server["max_memory_mb"] * 2**20)
            results["server_limits"] = server
            time.sleep(1.0)
            idle = tree_rss(psutil.Process(process.pid))
            watchdog = Watchdog(process.pid, idle + budget + WATCHDOG_MARGIN_BYTES)
            watchdog.start()
            print(f"server ready: idle {idle / 2**20:.0f} MB, budget {budget / 2**20:.0f} MB; normal stream alone for {args.baseline_seconds:g} s", flush=True)
            alone = asyncio.run(phase(url, port, args.baseline_seconds, normal_stream, reference, args, None))
            print(f"  {alone['normal']['images_per_second']:.2f} images/s, p99 {alone['normal']['latency_ms']['p99']:.0f} ms; attack for {args.seconds:g} s", flush=True)
            peak_before_attack = watchdog.peak
            attacked = asyncio.run(phase(url, port, args.seconds, normal_stream, reference, args, attack))
            time.sleep(1.0)
            watchdog.stop.set()
            watchdog.join()
            alive = process.poll() is None and not watchdog.killed
            metrics = httpx.get(f"{url}/metrics", timeout=30).text if alive else ""
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
        results["server_log_tail"] = log.read_text().splitlines()[-20:]
    results["memory"] = {
        "idle_mb": idle / 2**20, "budget_mb": budget / 2**20, "peak_mb": watchdog.peak / 2**20, "peak_over_idle_mb": (watchdog.peak - idle) / 2**20,
        "peak_before_attack_mb": peak_before_attack / 2**20, "watchdog_limit_mb": watchdog.limit / 2**20, "killed_by_watchdog": watchdog.killed,
        "fixed_overhead_mb": (watchdog.peak - idle - budget) / 2**20,
    }
    results["alone"], results["attacked"] = alone, attacked
    results["metrics"] = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line.startswith(("patchcore_admission_refusals_total", "patchcore_images_total", "patchcore_requests_total"))}
    statuses = Counter()
    for part in [attacked["normal"], *attacked["attack"].values()]:
        statuses.update(part["statuses"])
    transport_errors = sum(sum(part["transport_errors"].values()) for part in [alone["normal"], attacked["normal"], *attacked["attack"].values()])
    ratio = attacked["normal"]["images_per_second"] / alone["normal"]["images_per_second"]
    results["checks"] = {
        "server_never_killed": alive,
        "peak_within_idle_plus_1_5_gb": watchdog.peak - idle <= OVER_IDLE_BAR_BYTES,
        "no_500_502_504": not any(code in statuses for code in ("500", "502", "504")),
        "no_dropped_connections": transport_errors == 0,
        "every_503_with_retry_after": not any("Retry-After" in w for part in [attacked["normal"], *attacked["attack"].values()] for w in part["wrong"]),
        "readiness_answered_throughout": set(attacked["readiness"]["statuses"]) == {"200"} and set(alone["readiness"]["statuses"]) == {"200"},
        "every_normal_image_scored_as_the_library": alone["normal"]["wrong_count"] == 0 and attacked["normal"]["wrong_count"] == 0,
        "bad_requests_got_their_status": all(attacked["attack"][kind]["wrong_count"] == 0 for kind in BAD_KINDS),
        "normal_throughput_at_least_half": ratio >= THROUGHPUT_BAR,
    }
    results["normal_throughput_ratio"] = ratio
    results["status_counts"] = dict(sorted(statuses.items()))
    results["all_checks_pass"] = all(results["checks"].values())
    return results


def markdown(r: dict) -> str:
    m, alone, attacked = r["memory"], r["alone"]["normal"], r["attacked"]["normal"]
    lines = [
        "# Hostile load on `patchcore serve`", "",
        f"`{r['command']}` at commit `{r['commit']}`{' with uncommitted changes to ' + ', '.join(r.get('changed_files', [])) if r.get('dirty') else ''}, {r['date']}, "
        f"on {r['machine']['cpu']} ({r['machine']['cores']} cores, {r['machine']['memory_gb']} GB).",
        f"Server: `patchcore serve MODEL {' '.join(r['server_options'])}` (bottle, MobileNetV2); budget {m['budget_mb']:.0f} MB.", "",
        "| memory of the server's process tree | MB |", "|---|---|",
        f"| idle (model loaded, warm) | {m['idle_mb']:.0f} |", f"| peak during the run | {m['peak_mb']:.0f} |",
        f"| peak over idle | **{m['peak_over_idle_mb']:.0f}** (bar: 1,536) |", f"| of which over the budget (fixed overhead) | {m['fixed_overhead_mb']:.0f} |",
        f"| watchdog limit (idle + budget + 2 GB) | {m['watchdog_limit_mb']:.0f} (killed: {m['killed_by_watchdog']}) |", "",
        f"| normal stream ({r['clients']['normal']} clients, one bottle image a request) | alone ({r['baseline_seconds']:g} s) | under attack ({r['seconds']:g} s) |", "|---|---|---|",
        f"| images scored / s | {alone['images_per_second']:.2f} | {attacked['images_per_second']:.2f} (**{r['normal_throughput_ratio']:.2f}x**) |",
        f"| latency p50 / p99 (ms, retries included) | {alone['latency_ms']['p50']:.0f} / {alone['latency_ms']['p99']:.0f} | {attacked['latency_ms']['p50']:.0f} / {attacked['latency_ms']['p99']:.0f} |",
        f"| statuses | {alone['statuses']} | {attacked['statuses']} |",
        f"| answers differing from the library | {alone['wrong_count']} | {attacked['wrong_count']} |", "",
        "| attacking clients | statuses | transport errors |", "|---|---|---|",
    ]
    for kind, part in r["attacked"]["attack"].items():
        lines.append(f"| {kind} | {part['statuses']} | {part['transport_errors'] or 0} |")
    ready = r["attacked"]["readiness"]
    lines += [
        "", f"Readiness probes under attack: {ready['probes']}, statuses {ready['statuses']}, slowest {ready['max_latency_ms']:.0f} ms.", "",
        "| check | |", "|---|---|",
        *[f"| {name.replace('_', ' ')} | {'pass' if ok else '**FAIL**'} |" for name, ok in r["checks"].items()], "",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a bottle model (default: fit one, MobileNetV2)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--baseline-seconds", type=float, default=40.0)
    parser.add_argument("--hostile-clients", type=int, default=16)
    parser.add_argument("--single-clients", type=int, default=4)
    parser.add_argument("--bad-clients", type=int, default=2)
    parser.add_argument("--normal-clients", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="hostile_load", help="the results files' name: OUT/LABEL.json and .md")
    parser.add_argument("--server-option", action="append", help="passed to patchcore serve, e.g. --server-option=--max-memory-mb=2048")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 600 or not 0 < args.baseline_seconds <= 600 or args.hostile_clients + args.single_clients + args.bad_clients > 64:
        parser.error("bounded runs only: at most 600 s a phase and 64 attacking clients")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    results = run(args, provenance(argv))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.label}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{args.label}.md").write_text(markdown(results))
    print(markdown(results))
    return 0 if results["all_checks_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
