"""The server's Prometheus metrics, and the middleware that counts its requests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

if TYPE_CHECKING:
    from .holder import ServedModel

#: the drift watch's figures exported per station (``DriftStatus.to_dict()`` keys), and what each is
DRIFT_GAUGES = {
    "flag_rate": "Share of the window's decisions flagged anomalous",
    "expected_flag_rate": "The flag rate the model's calibration expects on good parts",
    "flag_rate_p_value": "One-sided binomial test of the window's flag rate against the calibration's interval",
    "score_shift_p_value": "Test of the window's scores against the calibration's good scores",
    "alarm": "1 while the drift watch raises an alarm",
    "decisions": "Decisions in the drift watch's window",
}

#: the media type of :meth:`ServerMetrics.text`
METRICS_MEDIA_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The server's Prometheus metrics, in a registry of its own (several apps may share a process)."""

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("patchcore_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry)
        self.images = Counter("patchcore_images", "Images received, by outcome: scored, or the reason they were refused", ["outcome"], registry=self.registry)
        self.anomalies = Counter("patchcore_anomalies", "Images scored as anomalous", registry=self.registry)
        self.latency = Histogram(
            "patchcore_predict_seconds", "Time from a predict request's arrival to its answer", registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.batch_size = Histogram(
            "patchcore_batch_size", "Images per backbone batch", registry=self.registry,
            buckets=sorted({1, 2, 4, 8, 16, 32, 64, max_batch}),
        )
        self.queue_depth = Gauge("patchcore_queue_depth", "Images waiting for a batch", registry=self.registry)
        self.memory_reserved = Gauge("patchcore_memory_reserved_bytes", "Bytes reserved by requests in flight (the memory budget in use)", registry=self.registry)
        self.memory_budget = Gauge("patchcore_memory_budget_bytes", "The memory budget (--max-memory-mb)", registry=self.registry)
        self.refusals = Counter("patchcore_admission_refusals", "Requests refused for room: busy (503) or never fits (413)", ["reason"], registry=self.registry)
        self.reloads = Counter("patchcore_model_reloads", "Model reloads, by result", ["result"], registry=self.registry)
        self.model = Info("patchcore_model", "The model being served", registry=self.registry)
        self.recorded = Counter("patchcore_record_decisions", "Decisions committed to the record (or its spool)", registry=self.registry)
        self.record_spooling = Gauge("patchcore_record_spooling", "1 while the record's database does not answer and decisions spool locally", registry=self.registry)
        self.drift = {
            key: Gauge(f"patchcore_drift_{key}", text, ["station"], registry=self.registry)
            for key, text in DRIFT_GAUGES.items()
        }

    def count_reload(self, loaded: bool, served: ServedModel | None) -> None:
        """A load or reload's result; after a good one, the model now served."""
        self.reloads.labels("ok" if loaded else "failed").inc()
        if loaded and served is not None:
            self.model.info({"file": served.path.name, "sha256": served.sha256, "backbone": served.metadata["backbone"], "loaded_at": served.loaded_at})

    def publish_drift(self, station: str, status: dict[str, Any]) -> None:
        """A station's drift status as gauges (NaN where a test has no figure yet)."""
        for key, gauge in self.drift.items():
            value = status.get(key)
            gauge.labels(station).set(float("nan") if value is None else float(value))

    def text(self) -> bytes:
        """The metrics in Prometheus's text format."""
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware counting requests by route and status (plain ASGI: Starlette's
    BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app: Any, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            self.counter.labels(getattr(route, "path", "other"), str(status[0])).inc()
