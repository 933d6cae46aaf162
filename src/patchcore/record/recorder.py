"""What a face (the server, ``predict --record``) uses to keep its decisions: the record
opened (or spooled to, when its database is down), the model that decides registered by
checksum, one row per decision, the image kept when the policy says so, and the group-commit
writer that answers once the rows are on disk.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInputError
from .images import DEFAULT_KEEP_MAX_GB, KEEP_POLICIES, SUFFIXES, KeptImages
from .store import RecordStore, RecordUnreachableError, default_keep_dir, default_record_path, record_url, shown, sqlite_file, state_dir, utc_now
from .writer import RecordWriter

@dataclass
class RecordOptions:
    """Where and how decisions are kept (the command line's ``--record``, ``--station``,
    ``--keep-*`` and spool options). ``location`` None: the default SQLite file."""

    location: str | None = None
    station: str | None = None  # default: this machine's name
    keep_images: str = "none"
    keep_dir: str | Path | None = None
    keep_max_gb: float = DEFAULT_KEEP_MAX_GB
    keep_days: float | None = None
    prune_reviewed: bool = False
    spool: str | Path | None = None
    offline_ok: bool = False

    def __post_init__(self) -> None:
        if self.keep_images not in KEEP_POLICIES:
            raise BadInputError(f"--keep-images must be one of {', '.join(KEEP_POLICIES)}, got {self.keep_images!r}")
        if self.keep_max_gb <= 0:
            raise BadInputError(f"--keep-max-gb must be above 0, got {self.keep_max_gb:g}")
        if self.keep_days is not None and self.keep_days <= 0:
            raise BadInputError(f"--keep-days must be above 0, got {self.keep_days:g}")
        self.station = check_label(self.station or socket.gethostname(), "station")


def check_label(value: str, what: str) -> str:
    """A station or part id: 1 to 200 printable characters (they come from the network)."""
    value = value.strip()
    if not value or len(value) > 200 or not value.isprintable():
        raise BadInputError(f"{what} must be 1 to 200 printable characters, got {value[:40]!r}")
    return value


def default_spool(url) -> Path:
    """The spool of a database server's record: one file per URL, in patchcore's state folder."""
    return state_dir() / f"spool-{hashlib.sha256(shown(url).encode()).hexdigest()[:12]}.sqlite"


class Recorder:
    """An open record and its writer. Raises :class:`patchcore.record.store.RecordError` (one
    line) when the record cannot be used; an unreachable database server only with
    ``offline_ok`` starts spooling instead."""

    def __init__(self, options: RecordOptions) -> None:
        self.options = options
        self.url = record_url(options.location or default_record_path())
        self.where = shown(self.url)
        server = sqlite_file(self.url) is None
        self.spool_path = Path(options.spool) if options.spool else (default_spool(self.url) if server else None)
        try:
            store: RecordStore | None = RecordStore.open(self.url)
        except RecordUnreachableError as error:
            if not options.offline_ok:
                raise RecordUnreachableError(f"{error} (--record-offline-ok starts anyway, spooling to {self.spool_path})") from None
            print(f"patchcore record: {error}; spooling to {self.spool_path} until it answers", file=sys.stderr, flush=True)
            store = None
        self.images: KeptImages | None = None
        if options.keep_images != "none":
            folder = options.keep_dir or default_keep_dir(self.url)
            if folder is None:
                raise BadInputError(f"--keep-images {options.keep_images} with a database server's record needs --keep-dir (a folder every server writing to it can reach)")
            self.images = KeptImages(folder, int(options.keep_max_gb * 1e9))
        self.writer = RecordWriter(
            store, location=self.url if store is None else None, spool=self.spool_path, images=self.images,
            keep_days=options.keep_days, prune_reviewed=options.prune_reviewed,
        )
        self.writer.start()

    @property
    def store(self) -> RecordStore | None:
        return self.writer.store

    def describe(self) -> str:
        """The start-up line: where decisions go, and what is kept."""
        kept = "no images kept" if self.images is None else (
            f"{self.options.keep_images} images kept in {self.images.folder} (at most {self.options.keep_max_gb:g} GB, oldest unreviewed dropped first)"
        )
        days = f", decisions kept {self.options.keep_days:g} days" + (" (reviewed ones too)" if self.options.prune_reviewed else " (reviewed ones always)") if self.options.keep_days else ""
        return f"record: {self.where} (station '{self.options.station}'; {kept}{days}; --record off to keep none)"

    def close(self) -> None:
        self.writer.close()

    # --- rows --------------------------------------------------------------------------------

    def register(self, model: Any, sha256: str, name: str) -> Future:
        """Keep the model that is about to decide: its settings, thresholds and decision rule."""
        return self.writer.submit(model_rows=[model_row(model, sha256, name)])

    def wants_image(self, is_anomalous: bool) -> bool:
        policy = self.options.keep_images
        return self.images is not None and (policy == "all" or (policy == "flagged" and is_anomalous))

    def keep_image(self, data: bytes, sha256: str, image_format: str) -> dict[str, Any]:
        """Write the image to the kept folder; its row for the writer."""
        suffix = SUFFIXES.get(image_format.upper(), "img")
        self.images.keep(data, sha256, suffix)
        return {"sha256": sha256, "suffix": suffix, "nbytes": len(data), "kept_at": utc_now()}

    def submit(self, decision_rows: list[dict], image_rows: list[dict] = ()) -> Future:
        return self.writer.submit(decision_rows=decision_rows, image_rows=image_rows)


def new_decision_id() -> str:
    return uuid.uuid4().hex


def model_row(model: Any, sha256: str, name: str) -> dict[str, Any]:
    """A scoring model as the record keeps it (any engine: ``settings()``, ``metadata()``, ``calibration_``)."""
    calibration = model.calibration_
    description = {
        "metadata": model.metadata(),
        "calibration": calibration.to_dict(),
        "decision_rule": calibration.describe(),
    }
    return {
        "sha256": sha256, "name": name, "engine": model.metadata()["engine"], "first_seen": utc_now(),
        "settings": json.dumps(model.settings(), default=str), "description": json.dumps(description, default=float),
    }


def decision_row(
    result: dict[str, Any], *, decision_id: str, station: str, part: str | None, model_name: str, model_sha256: str, engine: str,
    decision_rule: str, image_sha256: str, file_name: str, latency_ms: float | None, image_kept: bool, time: str | None = None,
) -> dict[str, Any]:
    """One decision's row, from the JSON record the face answers with (``Prediction.to_record``)."""
    width, height = result["image_size"]
    return {
        "id": decision_id, "time": time or utc_now(), "station": station, "part": part, "model_name": model_name,
        "model_sha256": model_sha256, "threshold": float(result["threshold"]), "decision_rule": decision_rule,
        "image_sha256": image_sha256, "file_name": file_name[:500], "width": int(width), "height": int(height),
        "score": float(result["score"]), "normalized_score": float(result["normalized_score"]),
        "decision": "anomalous" if result["is_anomalous"] else "good", "regions": json.dumps(result["regions"]),
        "latency_ms": latency_ms, "engine": engine, "image_kept": image_kept,
    }
