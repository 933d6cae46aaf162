"""The record's store, writer, kept images and exports, on real SQLite files (PostgreSQL: the
end-to-end tests)."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from patchcore.errors import BadInputError
from patchcore.record.export import write_decisions
from patchcore.record.images import KeptImages
from patchcore.record.recorder import decision_row, new_decision_id
from patchcore.record.schema import FORMAT_VERSION
from patchcore.record.store import RecordError, RecordStore, RecordUnreachableError, format_version
from patchcore.record.writer import RecordUnavailableError, RecordWriter

FORMAT_1 = Path(__file__).resolve().parents[1] / "data" / "record_format1.sqlite"
MODEL = "a" * 64


def model_row(sha256: str = MODEL, name: str = "bottle") -> dict:
    return {"sha256": sha256, "name": name, "engine": "pytorch", "first_seen": "2026-12-01T00:00:00.000000Z", "settings": "{}", "description": json.dumps({"calibration": {}})}


def row(index: int, *, station: str = "cam1", flagged: bool = False, file_name: str | None = None, image: str | None = None, time: str | None = None) -> dict:
    result = {"image_size": [900, 800], "threshold": 1.0, "score": 2.0 if flagged else 0.5, "normalized_score": 1.5 if flagged else 0.3, "is_anomalous": flagged,
              "regions": [{"box": [1, 2, 3, 4]}] if flagged else []}
    return decision_row(
        result, decision_id=new_decision_id(), station=station, part=f"p{index}", model_name="bottle", model_sha256=MODEL, engine="pytorch",
        decision_rule="rule", image_sha256=image or f"{index:064x}", file_name=file_name or f"img{index}.png", latency_ms=5.0, image_kept=False,
        time=time or f"2026-12-07T08:{index // 60:02d}:{index % 60:02d}.000000Z",
    )


@pytest.fixture
def store(tmp_path) -> RecordStore:
    opened = RecordStore.open(tmp_path / "record.sqlite")
    opened.write([model_row()], [])
    yield opened
    opened.close()


def test_a_new_record_is_the_newest_format_in_wal_mode(tmp_path):
    store = RecordStore.open(tmp_path / "new.sqlite")
    assert format_version(store) == FORMAT_VERSION == 2
    with sqlite3.connect(tmp_path / "new.sqlite") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_a_format_1_record_is_upgraded_in_place_keeping_every_row(tmp_path):
    copy = tmp_path / "old.sqlite"
    shutil.copy(FORMAT_1, copy)
    with sqlite3.connect(copy) as connection:
        before = connection.execute("SELECT id, time, station, part, score, decision, file_name FROM decisions ORDER BY id").fetchall()
        assert connection.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0001"
    assert len(before) == 3
    store = RecordStore.open(copy)
    assert format_version(store) == 2
    rows, total = store.decisions(oldest_first=True)
    assert total == 3
    assert [(r["id"], r["time"], r["station"], r["part"], r["score"], r["decision"], r["file_name"]) for r in rows] == [tuple(b) for b in before]
    assert all(r["image_kept"] is False and r["review"] is None for r in rows)
    # format 2's table works on the upgraded file
    assert store.add_review(rows[2]["id"], "false_alarm", "ann", "glare")["verdict"] == "false_alarm"
    assert store.decisions(reviewed="false_alarm")[1] == 1
    store.close()


def test_a_record_of_a_newer_format_is_refused_in_one_line(tmp_path):
    path = tmp_path / "future.sqlite"
    RecordStore.open(path).close()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0003'")
    with pytest.raises(RecordError) as refused:
        RecordStore.open(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "format 3" in message and "newer than this patchcore reads" in message


def test_files_that_are_no_record_are_refused_in_one_line(tmp_path):
    text_file = tmp_path / "notes.sqlite"
    text_file.write_text("not a database at all " * 100)
    with pytest.raises(RecordError, match="not a record database") as refused:
        RecordStore.open(text_file)
    assert "\n" not in str(refused.value) and str(text_file) in str(refused.value)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(RecordError, match="not a patchcore record .*invoices"):
        RecordStore.open(other)
    with pytest.raises(RecordError, match="no such record"):
        RecordStore.open(tmp_path / "missing.sqlite", create=False)


def test_an_unreachable_database_server_is_one_line_naming_it_without_its_password():
    with pytest.raises(RecordUnreachableError) as refused:
        RecordStore.open("postgresql+psycopg://inspector:secret@127.0.0.1:9/record")
    message = str(refused.value)
    assert "\n" not in message and "127.0.0.1:9/record" in message and "secret" not in message and "cannot reach" in message


def test_writing_the_same_rows_twice_keeps_them_once(store):
    rows = [row(i) for i in range(5)]
    store.write([model_row()], rows)
    store.write([model_row()], rows[2:] + [row(9)])  # a replay after a crash, and one new
    assert store.count() == 6


def test_filters_pages_and_newest_first(store):
    store.write([], [row(i, station="cam2" if i % 3 == 0 else "cam1", flagged=i % 2 == 0) for i in range(20)])
    rows, total = store.decisions(station="cam2", decision="anomalous", limit=2)
    expected = [i for i in range(20) if i % 3 == 0 and i % 2 == 0]  # 0, 6, 12, 18
    assert total == len(expected) == 4
    assert [r["part"] for r in rows] == ["p18", "p12"]
    rows, _ = store.decisions(station="cam2", decision="anomalous", limit=2, offset=2)
    assert [r["part"] for r in rows] == ["p6", "p0"]
    rows, total = store.decisions(since="2026-12-07T08:00:05.000000Z", until="2026-12-07T08:00:08.000000Z")
    assert sorted(r["part"] for r in rows) == ["p5", "p6", "p7"] and total == 3
    assert store.decisions(part="p7")[0][0]["regions"] == []
    assert store.decisions(part="p8")[0][0]["regions"] == [{"box": [1, 2, 3, 4]}]
    with pytest.raises(BadInputError, match="decision must be one of"):
        store.decisions(decision="bad")


def test_reviews_are_appended_and_the_latest_one_counts(store):
    rows = [row(i, flagged=True) for i in range(3)]
    store.write([], rows)
    first = rows[0]["id"]
    store.add_review(first, "false_alarm", "ann", "glare on the neck")
    store.add_review(first, "confirmed_defect", "bob", "a crack under the glare")
    assert store.add_review("f" * 32, "false_alarm", "ann") is None  # no such decision
    found = store.decision(first)
    assert [r["verdict"] for r in found["reviews"]] == ["false_alarm", "confirmed_defect"]  # nothing erased
    assert found["review"]["verdict"] == "confirmed_defect" and found["review"]["reviewer"] == "bob"
    store.add_review(rows[1]["id"], "false_alarm", "ann")
    assert [r["id"] for r in store.decisions(reviewed="false_alarm")[0]] == [rows[1]["id"]]
    assert {r["id"] for r in store.decisions(reviewed="yes")[0]} == {first, rows[1]["id"]}
    assert [r["id"] for r in store.decisions(reviewed="no")[0]] == [rows[2]["id"]]
    with pytest.raises(BadInputError, match="verdict must be one of"):
        store.add_review(first, "maybe", "ann")
    with pytest.raises(BadInputError, match="control characters"):
        store.add_review(first, "false_alarm", "ann\x1b[2J")


def test_the_writer_commits_before_it_answers_and_batches_concurrent_decisions(store):
    writer = RecordWriter(store)
    writer.start()
    rows = [row(i) for i in range(300)]
    futures = []
    threads = [threading.Thread(target=lambda part=rows[k::6]: futures.extend(writer.submit(decision_rows=[r]) for r in part)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for future in futures:
        future.result(timeout=30)
        assert future.done()
    # every resolved future's row is in the file, read by another connection
    assert RecordStore.open(store.url).count() == 300
    writer.close()


def test_a_failed_write_without_a_spool_fails_the_callers(store):
    writer = RecordWriter(store)
    writer.start()
    bad = row(1)
    bad["model_sha256"] = "b" * 64  # no such model: the foreign key refuses it
    with pytest.raises(RecordUnavailableError, match="cannot write to the record"):
        writer.submit(decision_rows=[bad]).result(timeout=30)
    writer.submit(decision_rows=[row(2)]).result(timeout=30)  # the writer goes on
    assert store.count() == 1
    writer.close()


def test_kept_images_are_content_addressed_and_the_cap_drops_the_oldest_unreviewed_first(tmp_path):
    images = KeptImages(tmp_path / "kept", max_bytes=250)
    kept = []
    for index in range(4):
        sha = f"{index:064x}"
        path = images.keep(bytes([index]) * 100, sha, "png")
        assert path == tmp_path / "kept" / sha[:2] / f"{sha}.png" and path.read_bytes() == bytes([index]) * 100
        kept.append({"sha256": sha, "nbytes": 100})
    assert images.keep(b"\0" * 100, f"{0:064x}", "png").stat().st_size == 100  # the same image again: kept once
    # 400 bytes over a 250 cap: drop the oldest unreviewed (0 is reviewed), 1 and 2
    assert images.over_cap(kept, reviewed={f"{0:064x}"}) == [f"{1:064x}", f"{2:064x}"]
    # all reviewed: nothing dropped, even over the cap
    assert images.over_cap(kept, reviewed={k["sha256"] for k in kept}) == []
    assert images.find("../../etc/passwd") is None


def test_retention_keeps_reviewed_decisions_unless_asked(store):
    rows = [row(i, time=f"2026-01-0{i + 1}T00:00:00.000000Z") for i in range(4)]
    store.write([], rows)
    store.add_review(rows[0]["id"], "false_alarm", "ann")
    removed, _ = store.prune("2026-01-03T00:00:00.000000Z")
    assert removed == 1  # rows[1]; rows[0] is reviewed
    assert {r["id"] for r in store.decisions()[0]} == {rows[0]["id"], rows[2]["id"], rows[3]["id"]}
    removed, _ = store.prune("2026-01-03T00:00:00.000000Z", include_reviewed=True)
    assert removed == 1 and store.decision(rows[0]["id"]) is None


def test_csv_export_neutralises_formulas_and_parquet_keeps_every_row(store, tmp_path):
    hostile = ["=HYPERLINK(\"http://x\")", "+1+1", "-2", "@SUM(A1)", "\tTAB", "plain.png"]
    store.write([], [row(i, file_name=name) for i, name in enumerate(hostile)])
    out = tmp_path / "decisions.csv"
    assert write_decisions(store.iter_decisions(), "csv", out) == 6
    with open(out, newline="") as handle:
        names = [line["file_name"] for line in csv.DictReader(handle)]
    assert names == ["'" + name for name in hostile[:5]] + ["plain.png"]
    import pyarrow.parquet as pq

    table = pq.read_table(write_parquet_path := tmp_path / "d.parquet") if write_decisions(store.iter_decisions(), "parquet", tmp_path / "d.parquet") == 6 else None
    assert table.num_rows == 6 and table.column("file_name").to_pylist() == hostile  # Parquet is typed: no neutralising needed
    assert write_parquet_path.stat().st_size > 0
    jsonl = tmp_path / "d.jsonl"
    write_decisions(store.iter_decisions(), "jsonl", jsonl)
    assert [json.loads(line)["file_name"] for line in jsonl.read_text().splitlines()] == hostile
