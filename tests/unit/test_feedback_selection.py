"""Which kept images ``fit --update --from-record`` feeds back (record/feedback.py), on a real
SQLite record and a real kept-images folder."""

from __future__ import annotations

import hashlib
import json

import pytest

from patchcore.record.feedback import reviewed_false_alarms
from patchcore.record.images import KeptImages
from patchcore.record.recorder import decision_row, new_decision_id
from patchcore.record.store import RecordStore


def model_row(sha256: str, name: str) -> dict:
    return {"sha256": sha256, "name": name, "engine": "pytorch", "first_seen": "2026-12-01T00:00:00.000000Z", "settings": "{}", "description": json.dumps({})}


class Line:
    """A record and its kept folder, written the way a server writes them."""

    def __init__(self, tmp_path) -> None:
        self.store = RecordStore.open(tmp_path / "record.sqlite")
        self.kept = KeptImages(tmp_path / "record.sqlite.images", max_bytes=10**9)
        self.versions = {"bottle": ["1" * 64, "2" * 64], "screw": ["3" * 64]}  # bottle: a file updated once
        self.store.write([model_row(sha, name) for name, shas in self.versions.items() for sha in shas], [])
        self.second = 0

    def decide(self, image: bytes, *, model: str = "bottle", version: int = 0, keep: bool = True) -> str:
        """A flagged decision of ``image``; its bytes kept in the folder when ``keep``."""
        sha256 = hashlib.sha256(image).hexdigest()
        if keep:
            self.kept.keep(image, sha256, "png")
        self.second += 1
        result = {"image_size": [4, 4], "threshold": 1.0, "score": 2.0, "normalized_score": 1.5, "is_anomalous": True, "regions": []}
        row = decision_row(
            result, decision_id=new_decision_id(), station="cam1", part=None, model_name=model, model_sha256=self.versions[model][version],
            engine="pytorch", decision_rule="rule", image_sha256=sha256, file_name="x.png", latency_ms=1.0, image_kept=keep,
            time=f"2026-12-07T08:00:{self.second:02d}.000000Z",
        )
        self.store.write([], [row])
        return row["id"]


@pytest.fixture
def line(tmp_path):
    opened = Line(tmp_path)
    yield opened
    opened.store.close()


def test_the_latest_false_alarm_reviews_of_a_models_every_version_each_image_once(line, tmp_path):
    plain = line.decide(b"good part A")
    again = line.decide(b"good part A", version=1)  # the same image, flagged again by the updated file
    other = line.decide(b"good part B", version=1)
    changed_mind = line.decide(b"good part C")
    unreviewed = line.decide(b"good part D")
    other_model = line.decide(b"good part E", model="screw")
    for decision in (plain, again, other, other_model):
        line.store.add_review(decision, "false_alarm", "ann")
    line.store.add_review(changed_mind, "confirmed_defect", "ann")
    line.store.add_review(changed_mind, "false_alarm", "bob", "it was dust")  # the latest review counts

    feedback = reviewed_false_alarms(line.store, "bottle", tmp_path / "record.sqlite.images")
    sha = {name: hashlib.sha256(name).hexdigest() for name in (b"good part A", b"good part B", b"good part C")}
    assert [(image.sha256, image.decision_ids) for image in feedback.images] == [
        (sha[b"good part A"], (plain, again)), (sha[b"good part B"], (other,)), (sha[b"good part C"], (changed_mind,)),
    ]
    assert all(image.path.read_bytes() == name for image, name in zip(feedback.images, sha))
    assert feedback.num_decisions == 4 and feedback.missing_decision_ids == [] and feedback.defect_sha256s == []
    assert unreviewed not in {d for image in feedback.images for d in image.decision_ids}


def test_an_image_a_latest_review_calls_a_defect_is_never_fed_back(line, tmp_path):
    first = line.decide(b"cracked neck")
    second = line.decide(b"cracked neck")
    on_screw = line.decide(b"scratched thread")  # the same image reviewed as a defect under another model
    scratched = line.decide(b"scratched thread")
    corrected = line.decide(b"broken lip")
    line.store.add_review(first, "false_alarm", "ann")
    line.store.add_review(second, "confirmed_defect", "bob")
    line.store.add_review(scratched, "false_alarm", "ann")
    line.store.add_review(on_screw, "confirmed_defect", "bob")
    line.store.add_review(corrected, "false_alarm", "ann")
    line.store.add_review(corrected, "confirmed_defect", "ann", "looked again")  # latest: a defect
    line.store.add_review(line.decide(b"good part"), "false_alarm", "ann")

    feedback = reviewed_false_alarms(line.store, "bottle", tmp_path / "record.sqlite.images")
    assert [image.path.read_bytes() for image in feedback.images] == [b"good part"]
    assert feedback.defect_sha256s == [hashlib.sha256(b"cracked neck").hexdigest(), hashlib.sha256(b"scratched thread").hexdigest()]


def test_false_alarms_without_a_kept_image_are_counted_not_dropped_silently(line, tmp_path):
    not_kept = [line.decide(b"not kept 1", keep=False), line.decide(b"not kept 2", keep=False)]
    kept = line.decide(b"kept")
    for decision in not_kept + [kept]:
        line.store.add_review(decision, "false_alarm", "ann")
    feedback = reviewed_false_alarms(line.store, "bottle", tmp_path / "record.sqlite.images")
    assert feedback.missing_decision_ids == not_kept
    assert [image.decision_ids for image in feedback.images] == [(kept,)]
    # the folder given is where the images are looked for: elsewhere, every one is missing
    elsewhere = reviewed_false_alarms(line.store, "bottle", tmp_path / "elsewhere")
    assert elsewhere.images == [] and elsewhere.missing_decision_ids == not_kept + [kept]
