"""The inspection record as a server keeps it (SQLite, the default): every answered decision in
the record with the model, threshold and image that made it, read back over HTTP and by the
command line, kept images, and nothing answered lost when the server is killed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from patchcore.cli import main
from patchcore.data import file_sha256

DEFECTS = ["broken_large/000.png", "broken_small/001.png", "contamination/002.png"]
GOODS = ["good/000.png", "good/001.png", "good/002.png"]


@pytest.fixture(scope="module")
def bottle_test(data_root) -> Path:
    return data_root / "mvtec_ad" / "bottle" / "test"


def predict(url: str, paths: list[Path], headers: dict | None = None, **params) -> httpx.Response:
    files = [("file", (path.parent.name + "_" + path.name, path.read_bytes(), "image/png")) for path in paths]
    return httpx.post(f"{url}/v2/models/bottle/predict", files=files, params=params, headers=headers or {}, timeout=120)


def rows_of(record: Path) -> dict[str, dict]:
    with sqlite3.connect(record) as connection:
        connection.row_factory = sqlite3.Row
        return {row["id"]: dict(row) for row in connection.execute("SELECT * FROM decisions")}


def test_every_answered_decision_is_in_the_default_record_with_what_made_it(bottle_model_file, bottle_test, start_server):
    state = Path(os.environ["XDG_STATE_HOME"])
    record = state / "patchcore" / "record.sqlite"
    record.unlink(missing_ok=True)
    running = start_server(bottle_model_file, "--station", "line-3")
    assert f"record: {record} (station 'line-3'" in running.log.read_text()  # the start-up line names the file
    paths = [bottle_test / name for name in DEFECTS + GOODS]
    answer = predict(running.url, paths, part="SN-4711").json()
    camera = predict(running.url, paths[:1], station="camera-2").json()
    results = answer["results"] + camera["results"]
    assert all(len(result["decision_id"]) == 32 for result in results)
    assert httpx.get(f"{running.url}/v2").json()["record"] is True
    rows = rows_of(record)
    assert set(rows) == {result["decision_id"] for result in results}
    metadata = httpx.get(f"{running.url}/v2/models/bottle").json()["patchcore"]
    for result, path in zip(results, paths + paths[:1]):
        row = rows[result["decision_id"]]
        assert row["score"] == result["score"] and row["normalized_score"] == result["normalized_score"]
        assert row["decision"] == ("anomalous" if result["is_anomalous"] else "good")
        assert row["threshold"] == result["threshold"] == metadata["image_threshold"]
        assert row["decision_rule"] == metadata["decision_rule"]
        assert row["image_sha256"] == file_sha256(path)
        assert row["file_name"] == path.parent.name + "_" + path.name
        assert [row["width"], row["height"]] == result["image_size"]
        assert json.loads(row["regions"]) == result["regions"]
        assert row["model_sha256"] == file_sha256(bottle_model_file) and row["model_name"] == "bottle" and row["engine"] == "pytorch"
        assert row["latency_ms"] > 0
    assert [rows[r["decision_id"]]["station"] for r in results] == ["line-3"] * 6 + ["camera-2"]
    assert [rows[r["decision_id"]]["part"] for r in results] == ["SN-4711"] * 6 + [None]
    assert sum(r["is_anomalous"] for r in answer["results"]) == 3
    # the model that decided, kept by checksum with its settings and thresholds
    with sqlite3.connect(record) as connection:
        (sha, name, settings, description), = connection.execute("SELECT sha256, name, settings, description FROM models").fetchall()
    assert sha == file_sha256(bottle_model_file) and name == "bottle"
    assert json.loads(description)["calibration"]["image_threshold"] == metadata["image_threshold"]
    assert json.loads(settings)["backbone"] == "mobilenet_v2"

    # read back over HTTP: filters, paging, one decision
    listed = httpx.get(f"{running.url}/v2/models/bottle/decisions", params={"decision": "anomalous", "station": "line-3", "limit": 2}).json()
    assert listed["total"] == 3 and len(listed["decisions"]) == 2
    assert all(d["decision"] == "anomalous" and d["station"] == "line-3" and d["part"] == "SN-4711" for d in listed["decisions"])
    one = httpx.get(f"{running.url}/v2/models/bottle/decisions/{results[0]['decision_id']}").json()
    assert one["score"] == results[0]["score"] and one["reviews"] == [] and one["picture"] is None and one["image_kept"] is False
    assert httpx.get(f"{running.url}/v2/models/bottle/decisions/{'0' * 32}").status_code == 404
    assert httpx.get(f"{running.url}/v2/models/bottle/decisions", params={"since": "yesterday"}).status_code == 422
    # a station that is no label is refused before anything is scored
    refused = predict(running.url, paths[:1], station="x" * 201)
    assert refused.status_code == 422 and "station must be 1 to 200 printable characters" in refused.json()["error"]
    # a review over HTTP, appended
    reply = httpx.post(f"{running.url}/v2/models/bottle/decisions/{results[0]['decision_id']}/review", json={"verdict": "confirmed_defect", "reviewer": "ann", "note": "crack"})
    assert reply.status_code == 201 and reply.json()["reviewer"] == "ann"
    assert httpx.post(f"{running.url}/v2/models/bottle/decisions/{results[0]['decision_id']}/review", json={"verdict": "nice"}).status_code == 422
    # the drift route answers for the stations seen
    drift = httpx.get(f"{running.url}/v2/models/bottle/drift").json()
    assert set(drift["stations"]) == {"line-3", "camera-2"} and drift["alarm"] is False
    assert 'patchcore_record_decisions_total 7.0' in httpx.get(f"{running.url}/metrics").text
    running.stop()

    # the command line reads the same record
    out = record.parent / "anomalous.csv"  # 3 at line-3, 1 at camera-2
    assert main(["record", str(record), "--decision", "anomalous", "--format", "csv", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 4 and lines[0].startswith("id,time,station,part,model_name")
    assert main(["record", str(record), "--reviewed", "confirmed_defect", "--format", "jsonl", "--out", str(out)]) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [results[0]["decision_id"]]


def test_with_the_record_off_nothing_is_kept(bottle_model_file, bottle_test, start_server):
    running = start_server(bottle_model_file, "--record", "off")
    assert "record: off" in running.log.read_text()
    result = predict(running.url, [bottle_test / GOODS[0]]).json()["results"][0]
    assert "decision_id" not in result
    assert httpx.get(f"{running.url}/v2/models/bottle/decisions").status_code == 404
    assert httpx.get(f"{running.url}/v2").json()["record"] is False  # the page hides its history view


def test_flagged_images_are_kept_and_shown_and_reading_needs_a_key(bottle_model_file, bottle_test, start_server, tmp_path):
    record = tmp_path / "line.sqlite"
    keys = tmp_path / "keys.txt"
    keys.write_text("inspector-anna key-anna-0123456789abcdef\n")
    auth = {"Authorization": "Bearer key-anna-0123456789abcdef"}
    running = start_server(bottle_model_file, "--record", str(record), "--keep-images", "flagged", "--api-key-file", str(keys))
    paths = [bottle_test / name for name in DEFECTS + GOODS]
    results = predict(running.url, paths, headers=auth).json()["results"]
    flagged = {r["decision_id"]: p for r, p in zip(results, paths) if r["is_anomalous"]}
    assert len(flagged) == 3
    folder = tmp_path / "line.sqlite.images"
    kept = {path.name: path for path in folder.rglob("*.png")}
    assert sorted(kept) == sorted(f"{file_sha256(p)}.png" for p in flagged.values())
    for path in flagged.values():
        assert kept[f"{file_sha256(path)}.png"].read_bytes() == path.read_bytes()
    for route in ("decisions", f"decisions/{results[0]['decision_id']}", "drift"):
        assert httpx.get(f"{running.url}/v2/models/bottle/{route}").status_code == 401
    review = httpx.post(f"{running.url}/v2/models/bottle/decisions/{results[0]['decision_id']}/review", json={"verdict": "false_alarm", "reviewer": "mallory"})
    assert review.status_code == 401
    one = httpx.get(f"{running.url}/v2/models/bottle/decisions/{results[0]['decision_id']}", headers=auth).json()
    assert one["image_kept"] is True and one["picture"].startswith("data:image/jpeg;base64,")
    good = httpx.get(f"{running.url}/v2/models/bottle/decisions/{results[-1]['decision_id']}", headers=auth).json()
    assert good["image_kept"] is False and good["picture"] is None
    # the reviewer is the key's name, whatever the body says
    review = httpx.post(f"{running.url}/v2/models/bottle/decisions/{results[0]['decision_id']}/review", headers=auth, json={"verdict": "false_alarm", "reviewer": "mallory"})
    assert review.status_code == 201 and review.json()["reviewer"] == "inspector-anna"
    # Showing a kept image decodes it: paid from the memory budget like scoring, so a server whose
    # requests may hold 2 MB answers the decision without its picture (a 900-px PNG needs more).
    running.stop()
    small = start_server(bottle_model_file, "--record", str(record), "--keep-images", "flagged", "--api-key-file", str(keys), "--max-request-memory-mb", "2")
    one = httpx.get(f"{small.url}/v2/models/bottle/decisions/{results[0]['decision_id']}", headers=auth).json()
    assert one["picture"] is None and "too large to show" in one["picture_error"], one.get("picture_error")
    assert [r["reviewer"] for r in one["reviews"]] == ["inspector-anna"]


def test_killing_the_server_under_load_loses_no_answered_decision(bottle_model_file, bottle_test, tmp_path, start_server):
    record = tmp_path / "killed.sqlite"
    running = start_server(bottle_model_file, "--record", str(record), "--max-wait-ms", "5")
    paths = sorted(bottle_test.glob("*/*.png"))[:24]
    answered: list[str] = []
    stop = threading.Event()

    def client(offset: int) -> None:
        index = offset
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                path = paths[index % len(paths)]
                index += 4
                try:
                    reply = http.post(f"{running.url}/v2/models/bottle/predict", files=[("file", (path.name, path.read_bytes(), "image/png"))])
                except httpx.TransportError:
                    return  # the server died mid-request: that answer never came
                if reply.status_code == 200:
                    answered.extend(r["decision_id"] for r in reply.json()["results"])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(answered) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(running.process.pid, signal.SIGKILL)  # mid-load: requests in flight, a batch perhaps mid-commit
    running.process.wait()
    stop.set()
    for thread in threads:
        thread.join()
    assert len(answered) >= 30
    stored = rows_of(record)
    assert set(answered) <= set(stored)  # every answered decision survived
    assert len(stored) - len(answered) <= 16  # at most what was in flight: committed, answer not yet sent


def test_predict_keeps_its_decisions_too(bottle_model_file, bottle_test, tmp_path):
    record = tmp_path / "batch.sqlite"
    out = tmp_path / "out"
    paths = [bottle_test / name for name in DEFECTS[:1] + GOODS[:1]]
    assert main(["predict", str(bottle_model_file), *map(str, paths), "--out", str(out), "--no-pictures", "--quiet", "--record", str(record), "--station", "lab", "--keep-images", "all"]) == 0
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    rows = rows_of(record)
    assert set(rows) == {line["decision_id"] for line in lines}
    for line in lines:
        row = rows[line["decision_id"]]
        assert row["station"] == "lab" and row["score"] == line["score"] and row["image_kept"] == 1
        assert row["image_sha256"] == hashlib.sha256(Path(line["path"]).read_bytes()).hexdigest()
    assert len(list((tmp_path / "batch.sqlite.images").rglob("*.png"))) == 2
    # --record off, as serve takes it: a batch scored, nothing kept
    assert main(["predict", str(bottle_model_file), *map(str, paths), "--out", str(tmp_path / "off"), "--no-pictures", "--quiet", "--record", "off"]) == 0
    assert ["decision_id" in json.loads(line) for line in (tmp_path / "off" / "predictions.jsonl").read_text().splitlines()] == [False, False]


def test_a_record_that_cannot_be_used_stops_the_server_in_one_line(bottle_model_file, tmp_path):
    newer = tmp_path / "newer.sqlite"
    from patchcore.record.store import RecordStore

    RecordStore.open(newer).close()
    with sqlite3.connect(newer) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0009'")
    done = subprocess.run([sys.executable, "-m", "patchcore.cli", "serve", str(bottle_model_file), "--record", str(newer), "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"patchcore: error: '{newer}': the record is format 9, newer than this patchcore reads (formats 1 to 2); upgrade patchcore"]
