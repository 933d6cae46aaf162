"""Feedback into the model: the kept images of decisions people reviewed as false alarms, which
``patchcore fit --update --from-record`` adds to the model's bank.

A decision counts by its latest review (reviews are appended; a later one supersedes). An image
that any decision's latest review calls a confirmed defect is never fed back, whichever model
decided it: one good-looking decision of a defective part must not teach the model the defect.
Each image is fed back once (by checksum), however many decisions it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .images import KeptImages
from .store import RecordStore


@dataclass(frozen=True)
class FeedbackImage:
    """A kept image reviewed as a false alarm, and the decisions that flagged it."""

    sha256: str
    path: Path
    decision_ids: tuple[str, ...]


@dataclass
class Feedback:
    """What the record holds for a model: images to add, and what could not be added."""

    images: list[FeedbackImage] = field(default_factory=list)
    #: reviewed false alarms whose image is not in the kept folder (not kept, or dropped)
    missing_decision_ids: list[str] = field(default_factory=list)
    #: images reviewed as a false alarm of this model but as a confirmed defect by another decision's latest review
    defect_sha256s: list[str] = field(default_factory=list)

    @property
    def num_decisions(self) -> int:
        return sum(len(image.decision_ids) for image in self.images)


def reviewed_false_alarms(store: RecordStore, model_name: str, keep_dir: str | Path) -> Feedback:
    """The kept images of decisions by models named ``model_name`` (any version of the file)
    whose latest review is a false alarm, oldest decision first, each image once; leaving out
    every image a confirmed-defect review names, and counting decisions whose image is not kept."""
    false_alarms, _ = store.decisions(model_name=model_name, reviewed="false_alarm", limit=None, oldest_first=True)
    defects, _ = store.decisions(reviewed="confirmed_defect", limit=None)
    defective = {row["image_sha256"] for row in defects}
    kept = KeptImages(keep_dir, max_bytes=0)  # read only: the cap matters to writers
    feedback = Feedback()
    by_sha256: dict[str, list[str]] = {}
    paths: dict[str, Path] = {}
    for row in false_alarms:
        sha256 = row["image_sha256"]
        if sha256 in defective:
            if sha256 not in feedback.defect_sha256s:
                feedback.defect_sha256s.append(sha256)
            continue
        if sha256 not in paths:
            path = kept.find(sha256)
            if path is None:
                feedback.missing_decision_ids.append(row["id"])
                continue
            paths[sha256] = path
        by_sha256.setdefault(sha256, []).append(row["id"])
    feedback.images = [FeedbackImage(sha256, paths[sha256], tuple(ids)) for sha256, ids in by_sha256.items()]
    return feedback
