"""The server, started for real as ``patchcore serve`` in a subprocess and spoken to over HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from patchcore import PatchCore
from patchcore.cli import main

from serving import RunningServer

DEFECT = "broken_large/000.png"
GOOD = "good/000.png"


@pytest.fixture(scope="module")
def bottle_test(data_root) -> Path:
    return data_root / "mvtec_ad" / "bottle" / "test"


@pytest.fixture(scope="module")
def library(bottle_model_file) -> PatchCore:
    return PatchCore.load(bottle_model_file, device="cpu", progress=False)


@pytest.fixture(scope="module")
def server(bottle_model_file, tmp_path_factory):
    """One server for the tests that do not change it, with small limits to test them cheaply."""
    running = RunningServer(bottle_model_file, "--max-request-mb", "2", "--max-image-pixels", "1000000", log=tmp_path_factory.mktemp("server") / "server.log")
    running.wait_ready()
    yield running
    running.stop()


def post_files(url: str, files: list[tuple[str, bytes]], **params) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/bottle/predict", files=[("file", (name, data, "image/png")) for name, data in files], params=params, timeout=60)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Health and metadata


def test_live_at_once_and_ready_within_seconds(bottle_model_file, start_server):
    running = start_server(bottle_model_file, wait=False)
    started = time.monotonic()
    while True:  # live as soon as the process listens, whether or not the model is loaded yet
        try:
            live = httpx.get(f"{running.url}/v2/health/live", timeout=1)
            break
        except httpx.TransportError:
            assert time.monotonic() - started < 30, running.log.read_text()
            time.sleep(0.05)
    assert live.status_code == 200 and live.json() == {"live": True}
    ready_after = running.wait_ready()
    assert ready_after < 30  # about 3 s here: import torch, load, one warm-up image
    assert httpx.get(f"{running.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{running.url}/v2/models/bottle/ready").json() == {"name": "bottle", "ready": True}


def test_metadata_describes_the_model_file(server, bottle_model_file, library):
    reply = httpx.get(f"{server.url}/v2/models/bottle")
    assert reply.status_code == 200
    body = reply.json()
    meta = body["patchcore"]
    sha = hashlib.sha256(bottle_model_file.read_bytes()).hexdigest()
    assert body["name"] == "bottle" and body["versions"] == [sha[:12]]
    assert meta["file_sha256"] == sha
    assert meta["backbone"] == "mobilenet_v2" and meta["layers"] == list(library.layers)
    assert meta["memory_bank_shape"] == [21238, 128] and meta["num_fit_images"] == 208  # 132.png set aside
    check = meta["contamination"]
    assert check["setting"] == "auto" and check["num_set_aside"] == 1 and check["description"].startswith("set aside 1 of 209 training images")
    assert [(s["name"], s["set_aside"]) for s in check["suspects"]] == [("132.png", True)]  # its name only: not the server's folders
    assert meta["input"]["mode"] == "square" and meta["input"]["image_size"] == 256
    assert meta["image_threshold"] == library.calibration_.image_threshold
    assert meta["pixel_threshold"] == library.calibration_.pixel_threshold
    assert meta["decision_rule"] == library.calibration_.describe()
    assert len(meta["good_scores"]) == 208
    assert body["server"]["max_request_mb"] == 2 and body["server"]["max_batch"] == 8


def test_unknown_model_name_is_404(server):
    reply = httpx.post(f"{server.url}/v2/models/cable/predict", content=b"x")
    assert reply.status_code == 404
    assert reply.json() == {"error": "no model named 'cable' here; this server serves 'bottle'"}
    assert httpx.get(f"{server.url}/v2/models/cable").status_code == 404


# ---------------------------------------------------------------------------------------------
# Scoring


def test_a_defect_fails_with_a_region_on_it_and_a_good_part_passes(server, bottle_test, library, data_root):
    defect, good = bottle_test / DEFECT, bottle_test / GOOD
    reply = post_files(server.url, [("defect.png", defect.read_bytes()), ("good.png", good.read_bytes())])
    assert reply.status_code == 200
    failed, passed = reply.json()["results"]
    expected = library.predict([defect, good])
    assert failed["path"] == "defect.png" and passed["path"] == "good.png"
    assert abs(failed["score"] - expected[0].score) <= 1e-5 and abs(passed["score"] - expected[1].score) <= 1e-5
    assert failed["is_anomalous"] is True and passed["is_anomalous"] is False
    assert failed["threshold"] == passed["threshold"] == library.calibration_.image_threshold
    assert failed["image_size"] == [900, 900]
    mask = np.asarray(Image.open(data_root / "mvtec_ad" / "bottle" / "ground_truth" / "broken_large" / "000_mask.png")) > 127
    assert failed["regions"], "a defect should have a region"
    x, y, width, height = failed["regions"][0]["box"]
    assert mask[y : y + height, x : x + width].any()  # the region's box overlaps the ground truth
    assert failed["regions"][0]["peak_normalized_score"] >= 1.0  # regions are where the map passes the pixel threshold
    assert passed["regions"] == []


def test_curl_upload_as_in_the_readme(server, bottle_test):
    command = ["curl", "-s", "-F", f"file=@{bottle_test / DEFECT}", f"{server.url}/v2/models/bottle/predict"]
    reply = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    [result] = reply["results"]
    assert result["path"] == "000.png" and result["is_anomalous"] is True and len(result["regions"]) >= 1


def test_raw_body_and_pictures(server, bottle_test, library):
    reply = httpx.post(f"{server.url}/v2/models/bottle/predict", content=(bottle_test / DEFECT).read_bytes(), params={"picture": "true", "filename": "part.png"}, timeout=60)
    assert reply.status_code == 200
    [result] = reply.json()["results"]
    assert result["path"] == "part.png"
    assert result["picture"].startswith("data:image/jpeg;base64,") and result["anomaly_map"].startswith("data:image/png;base64,")
    import base64

    picture = Image.open(io.BytesIO(base64.b64decode(result["picture"].split(",", 1)[1])))
    assert picture.format == "JPEG" and picture.size == (900, 900 + 24)  # the image and its caption band
    level = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["anomaly_map"].split(",", 1)[1]))))
    assert level.shape == (900, 900)
    [prediction] = library.predict([bottle_test / DEFECT])
    # the map on the pictures' scale: 128 is the pixel threshold
    expected = np.clip(library.calibration_.normalize_maps(prediction.anomaly_map) / 2, 0, 1) * 255
    assert np.abs(level.astype(float) - expected).max() <= 1.0


def test_one_bad_file_in_a_batch_gets_its_own_error(server, bottle_test, tmp_path):
    good = (bottle_test / GOOD).read_bytes()
    reply = post_files(server.url, [("a.png", good), ("notes.png", b"not an image\n"), ("cut.png", good[: len(good) // 2]), ("b.png", good)])
    assert reply.status_code == 200
    a, notes, cut, b = reply.json()["results"]
    assert a["is_anomalous"] is False and b["score"] == a["score"]
    assert notes == {"path": "notes.png", "error": "'notes.png': not an accepted image format (not an image; accepted: PNG, JPEG, BMP, TIFF, WebP, PNM)", "status": 415}
    assert cut["status"] == 422 and cut["error"].startswith("'cut.png': not a readable image (")


@pytest.mark.parametrize(
    ("name", "make", "status", "message"),
    [
        ("text", lambda good: b"hello", 415, "'image': not an accepted image format (not an image; accepted: PNG, JPEG, BMP, TIFF, WebP, PNM)"),
        ("empty", lambda good: b"", 400, "no image: send image files as multipart form data, or one image as the request body"),
        ("truncated", lambda good: good[:20000], 422, None),
        ("bomb", lambda good: png_bytes(np.zeros((1001, 1000), np.uint8)), 413, "'image': image is 1000x1001 px, more than the limit of 1,000,000 pixels (--max-image-pixels)"),
        ("tiny", lambda good: png_bytes(np.zeros((4, 4), np.uint8)), 422, "'image': image is 4x4 px, too small (at least 8x8)"),
        ("body", lambda good: b"\0" * (2 * 1024 * 1024 + 1), 413, "request body is larger than the limit of 2 MB (--max-request-mb)"),
    ],
)
def test_a_bad_request_gets_a_clear_status_and_message(server, bottle_test, name, make, status, message):
    reply = httpx.post(f"{server.url}/v2/models/bottle/predict", content=make((bottle_test / GOOD).read_bytes()), timeout=60)
    assert reply.status_code == status
    if message is not None:
        assert reply.json()["error"] == message
    else:
        assert reply.json()["error"].startswith("'image': not a readable image (")


def test_too_many_files_for_the_queue_is_413(bottle_model_file, start_server, bottle_test):
    running = start_server(bottle_model_file, "--max-queue", "2")
    good = (bottle_test / GOOD).read_bytes()
    reply = post_files(running.url, [(f"{i}.png", good) for i in range(3)])
    assert reply.status_code == 413
    assert reply.json() == {"error": "request has 3 images, more than the queue holds (2, --max-queue); send fewer per request"}


def test_a_full_queue_answers_503_with_retry_after_and_recovers(bottle_model_file, start_server, bottle_test):
    running = start_server(bottle_model_file, "--max-queue", "1", "--max-batch", "1", "--max-wait-ms", "0")
    good = (bottle_test / GOOD).read_bytes()
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: post_files(running.url, [(f"{i}.png", good)]), range(32)))
    statuses = [r.status_code for r in replies]
    assert set(statuses) == {200, 503}, statuses
    refused = [r for r in replies if r.status_code == 503]
    assert all(r.headers["Retry-After"] == "1" for r in refused)
    assert refused[0].json() == {"error": "the queue is full (1 of 1 images waiting); retry shortly"}
    scores = {r.json()["results"][0]["score"] for r in replies if r.status_code == 200}
    assert len(scores) == 1  # the same image, the same score whichever batch it was in
    assert post_files(running.url, [("again.png", good)]).status_code == 200


def test_metrics_count_requests_images_and_batches(bottle_model_file, start_server, bottle_test):
    running = start_server(bottle_model_file)
    good, defect = (bottle_test / GOOD).read_bytes(), (bottle_test / DEFECT).read_bytes()
    assert post_files(running.url, [("g.png", good), ("d.png", defect), ("x.png", b"text")]).status_code == 200
    assert post_files(running.url, [("x.png", b"text")]).status_code == 415
    text = httpx.get(f"{running.url}/metrics").text

    def value(sample: str) -> float:
        match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
        assert match, f"{sample} not in /metrics"
        return float(match.group(1))

    assert value('patchcore_images_total{outcome="scored"}') == 2
    assert value('patchcore_images_total{outcome="not_an_image"}') == 2
    assert value("patchcore_anomalies_total") == 1
    assert value('patchcore_requests_total{route="/v2/models/{requested}/predict",status="200"}') == 1
    assert value('patchcore_requests_total{route="/v2/models/{requested}/predict",status="415"}') == 1
    # one batch of the first request's two images; the warm-up and the all-bad request make none
    assert value("patchcore_batch_size_count") == 1
    assert value("patchcore_batch_size_sum") == 2
    assert value("patchcore_queue_depth") == 0
    assert value("patchcore_predict_seconds_count") == 2


# ---------------------------------------------------------------------------------------------
# Reload


def _sha(url: str) -> str:
    return httpx.get(f"{url}/v2/models/bottle").json()["patchcore"]["file_sha256"]


def test_reload_keeps_the_old_model_on_a_damaged_file_and_switches_on_a_good_one(bottle_model_file, library, start_server, bottle_test, tmp_path):
    served = tmp_path / "bottle.safetensors"
    shutil.copy(bottle_model_file, served)
    token = "reload-token-0123456789abcdef"
    running = start_server(served, env={"PATCHCORE_ADMIN_TOKEN": token})
    admin = {"Authorization": f"Bearer {token}"}
    before = _sha(running.url)
    good = (bottle_test / GOOD).read_bytes()

    served.write_bytes(served.read_bytes()[:5000])  # a copy cut short, as by a failed transfer
    reply = httpx.post(f"{running.url}/v2/repository/models/bottle/load", headers=admin, timeout=60)
    assert reply.status_code == 422
    assert reply.json()["error"].startswith(f"reload failed: '{served}': ")  # the operator who holds the token may see the path
    assert "still serving the model loaded at" in reply.json()["error"] and before[:12] in reply.json()["error"]
    assert _sha(running.url) == before
    assert post_files(running.url, [("g.png", good)]).status_code == 200

    # A different model: the same bank cut at a 20% false-alarm rate.
    changed = PatchCore.load(bottle_model_file, device="cpu", progress=False)
    changed.calibration_ = changed.calibration_.at_rate(0.2)
    changed.save(served)
    stop, statuses = threading.Event(), []

    def keep_asking() -> None:
        while not stop.is_set():
            statuses.append(post_files(running.url, [("g.png", good)]).status_code)

    with ThreadPoolExecutor(3) as pool:
        askers = [pool.submit(keep_asking) for _ in range(3)]
        time.sleep(0.5)
        # Several switches while images are being scored: building a model must never overlap a
        # batch (torch.fx tracing patches torch for a moment; a batch beside it failed with 500).
        replies = [httpx.post(f"{running.url}/v2/repository/models/bottle/load", headers=admin, timeout=60) for _ in range(4)]
        time.sleep(0.5)
        stop.set()
        [asker.result() for asker in askers]
    assert [r.status_code for r in replies] == [200] * 4 and all(r.json()["loaded"] is True for r in replies)
    assert len(statuses) >= 8 and set(statuses) == {200}, statuses  # no request failed across the switches
    assert _sha(running.url) == hashlib.sha256(served.read_bytes()).hexdigest() != before
    [result] = post_files(running.url, [("g.png", good)]).json()["results"]
    assert result["threshold"] == changed.calibration_.image_threshold != library.calibration_.image_threshold


def test_sighup_reloads_the_file(bottle_model_file, start_server, tmp_path):
    served = tmp_path / "bottle.safetensors"
    shutil.copy(bottle_model_file, served)
    running = start_server(served)
    before = _sha(running.url)
    served.write_text("not a model")
    running.process.send_signal(signal.SIGHUP)
    _wait_for_log(running, "SIGHUP: reload failed")
    assert running.process.poll() is None and _sha(running.url) == before

    changed = PatchCore.load(bottle_model_file, device="cpu", progress=False)
    changed.calibration_ = changed.calibration_.at_rate(0.2)
    changed.save(served)
    running.process.send_signal(signal.SIGHUP)
    _wait_for_log(running, "SIGHUP: loaded")
    assert _sha(running.url) == hashlib.sha256(served.read_bytes()).hexdigest()


def _wait_for_log(running: RunningServer, text: str, timeout: float = 60) -> None:
    started = time.monotonic()
    while text not in running.log.read_text():
        assert time.monotonic() - started < timeout, running.log.read_text()
        time.sleep(0.1)


def test_a_damaged_model_file_stops_the_server_at_start_with_one_line(tmp_path):
    damaged = tmp_path / "part.safetensors"
    damaged.write_bytes(b"\0" * 100)
    done = subprocess.run([sys.executable, "-m", "patchcore.cli", "serve", str(damaged), "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith(f"patchcore: error: '{damaged}': ")


# ---------------------------------------------------------------------------------------------
# One code path: predict's JSON lines and the server's answers


def test_predict_writes_the_same_records_as_the_server(server, bottle_model_file, bottle_test, tmp_path):
    paths = [bottle_test / DEFECT, bottle_test / "contamination" / "001.png", bottle_test / GOOD]
    assert main(["predict", str(bottle_model_file), *map(str, paths), "--out", str(tmp_path), "--no-pictures", "--quiet", "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    answers = post_files(server.url, [(str(p), p.read_bytes()) for p in paths]).json()["results"]
    assert len(lines) == len(answers) == 3
    for line, answer in zip(lines, answers):
        assert line["path"] == answer["path"]
        assert abs(line["score"] - answer["score"]) <= 1e-5
        assert line["is_anomalous"] == answer["is_anomalous"] and line["threshold"] == answer["threshold"]
        assert [r["box"] for r in line["regions"]] == [r["box"] for r in answer["regions"]]
        assert [r["area"] for r in line["regions"]] == [r["area"] for r in answer["regions"]]
    assert sum(len(line["regions"]) for line in lines[:2]) >= 2 and lines[2]["regions"] == []
