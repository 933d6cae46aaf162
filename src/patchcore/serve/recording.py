"""The server's side of the inspection record: each served model registered by checksum, one
row per decision (its id in the answer), the answer held until the rows are committed, the
image kept when the policy says so, and a drift watch per station over the decisions since.
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from ..record.drift import DEFAULT_WINDOW, DriftWatch
from ..record.recorder import Recorder, check_label, decision_row, new_decision_id

if TYPE_CHECKING:
    from .holder import ServedModel
    from .metrics import ServerMetrics


class ServerRecord:
    """A recorder, and the drift watches of the model being served, by station."""

    def __init__(self, recorder: Recorder, model_name: str, metrics: ServerMetrics) -> None:
        self.recorder, self.model_name, self.metrics = recorder, model_name, metrics
        self.station = recorder.options.station
        self.watches: dict[str, DriftWatch] = {}
        self.served_sha256: str | None = None
        self.calibration = None

    def station_of(self, requested: str | None) -> str:
        """The request's station (a camera of several), or the server's (--station)."""
        return self.station if requested is None else check_label(requested, "station")

    @staticmethod
    def part_of(requested: str | None) -> str | None:
        return None if requested is None else check_label(requested, "part")

    async def on_model(self, served: ServedModel, pool: Executor) -> None:
        """A model was loaded: keep it in the record (by checksum) before it decides anything,
        and watch its decisions from the record's latest ones on."""
        await asyncio.wrap_future(self.recorder.register(served.model, served.sha256, self.model_name))
        self.served_sha256, self.calibration = served.sha256, served.model.calibration_
        self.watches = {}
        if self.recorder.store is not None:
            seeds = await asyncio.get_running_loop().run_in_executor(pool, self.recent, served.sha256)
            for station, pairs in seeds.items():
                self.watches[station] = DriftWatch.from_decisions(self.calibration, pairs)
                self.publish(station, self.watches[station])

    def recent(self, sha256: str) -> dict[str, list[tuple[float, bool]]]:
        store = self.recorder.store
        return {station: store.recent_scores(sha256, station, DEFAULT_WINDOW) for station in store.stations(sha256)}

    def watch(self, station: str) -> DriftWatch:
        if station not in self.watches:
            self.watches[station] = DriftWatch(self.calibration)
        return self.watches[station]

    def row(
        self, result: dict[str, Any], served: ServedModel, station: str, part: str | None, digest: str, file_name: str, latency_ms: float, kept: bool
    ) -> dict[str, Any]:
        return decision_row(
            result, decision_id=new_decision_id(), station=station, part=part, model_name=self.model_name, model_sha256=served.sha256,
            engine=served.metadata["engine"], decision_rule=served.metadata["decision_rule"], image_sha256=digest, file_name=file_name,
            latency_ms=latency_ms, image_kept=kept,
        )

    async def commit(self, rows: list[dict], images: list[dict], served: ServedModel) -> None:
        """Wait until the rows are committed (raises :class:`RecordUnavailableError`), then
        watch them for drift."""
        if not rows:
            return
        await asyncio.wrap_future(self.recorder.submit(rows, images))
        if served.sha256 != self.served_sha256:
            return  # decided by a model reloaded since: its watches are gone
        for row in rows:
            watch = self.watch(row["station"])
            watch.add(row["score"], row["decision"] == "anomalous")
        for station in {row["station"] for row in rows}:
            self.publish(station, self.watches[station])

    def publish(self, station: str, watch: DriftWatch) -> None:
        status = watch.status().to_dict()
        self.metrics.publish_drift(station, status)

    def drift(self) -> dict[str, Any]:
        stations = {station: watch.status().to_dict() for station, watch in sorted(self.watches.items())}
        return {"alarm": any(status["alarm"] for status in stations.values()), "stations": stations}


def digests(files: list[tuple[str, bytes]]) -> list[str]:
    """Each upload's SHA-256 (the record's image checksum; the kept file's name)."""
    return [hashlib.sha256(data).hexdigest() for _, data in files]

