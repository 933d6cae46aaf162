"""The drift watch read from the record (``patchcore drift``): each model's latest decisions at
each station, through the same :class:`~patchcore.record.drift.DriftWatch` the server feeds."""

from __future__ import annotations

from typing import Any

from ..calibrate import Calibration
from .drift import DEFAULT_WINDOW, DriftWatch
from .store import RecordStore


def drift_report(store: RecordStore, model_name: str | None = None, station: str | None = None) -> list[dict[str, Any]]:
    """One entry per model and station: the model's name and checksum, the station, and the
    drift status over its latest decisions. Without ``model_name``, each name's newest model."""
    latest: dict[str, dict] = {}
    for model in store.models(model_name):
        latest[model["name"]] = model  # oldest first: the last of a name is its newest
    report = []
    for model in latest.values():
        calibration = Calibration.from_dict(model["description"]["calibration"])
        stations = [station] if station is not None else store.stations(model["sha256"])
        for name in stations:
            pairs = store.recent_scores(model["sha256"], name, DEFAULT_WINDOW)
            if not pairs:
                continue
            watch = DriftWatch.from_decisions(calibration, pairs)
            report.append({"model_name": model["name"], "model_sha256": model["sha256"], "station": name, "status": watch.status().to_dict()})
    return report
