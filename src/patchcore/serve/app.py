"""The inference server: a thin HTTP shell (FastAPI) over ``PatchCore.load`` and ``predict_loaded``.

Routes follow the KServe v2 protocol's conventions where it has one:

    GET  /                                  the inspection page (served from the package, works offline)
    GET  /v2/health/live                    the process is up
    GET  /v2/health/ready                   the model is loaded and warmed up
    GET  /v2/models/<name>                  what the model is: backbone, input, bank, thresholds, checksum
    POST /v2/models/<name>/predict          images (multipart files, or one image as the raw body) -> results
    POST /v2/repository/models/<name>/load  reload the model file; a bad file leaves the old model serving
    GET  /metrics                           Prometheus text

Uploads are decoded on worker threads, scored in micro-batches on one scoring thread
(``batching.py``), and turned into records (map at the image's size, regions, pictures) on worker
threads again, so that decoding, scoring and encoding of different requests overlap.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import cv2
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException, MultiPartParser

from .. import __version__
from ..data import BadInputError, DamagedImageError, file_sha256 as digest_of_file, ImageTooLargeError, LoadedImage, NotAnImageError, prepare_image, read_image_bytes
from ..render import predict_picture
from ..runtime import EXPORT_FORMAT_VERSION, EXPORTED_SUFFIXES, ExportedModel
from ..errors import ModelFileError, WeightsError, is_missing_pytorch
from .batching import MicroBatcher, QueueFullError

if TYPE_CHECKING:  # PyTorch is imported only to serve a .safetensors model: an exported one needs none
    from ..model import PatchCore, Prediction

PAGE = Path(__file__).parent / "page"
#: images larger than this many pixels are refused from their header (decompression bombs)
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
#: files per multipart request
MAX_FILES_PER_REQUEST = 256
#: seconds a client is asked to wait when the queue is full
RETRY_AFTER_SECONDS = 1


@dataclass
class ServedModel:
    """A loaded, warmed-up model and what clients are told about it."""

    model: PatchCore
    path: Path
    sha256: str
    loaded_at: str
    metadata: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: str | Path) -> str:
    """The model file's SHA-256, which clients see as the model's version."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"'{path}': no such model file")
    return digest_of_file(path)


def load_served_model(path: str | Path, device: str = "auto", batch_size: int = 8, sha256: str | None = None) -> ServedModel:
    """Load a model file (``.safetensors``, or an exported ``.onnx`` / OpenVINO ``.xml``) and score one
    blank image through it, so that the first request is not slow.

    Building a PyTorch model traces the backbone with torch.fx, which patches torch globally for
    a moment: the server runs this on its scoring thread, never beside a batch being scored.
    """
    path = Path(path)
    sha256 = sha256 or file_sha256(path)
    if path.suffix in EXPORTED_SUFFIXES:
        model = ExportedModel(path, batch_size=batch_size)
    else:
        try:
            from ..model import PatchCore
        except ModuleNotFoundError as error:
            if not is_missing_pytorch(error):
                raise
            raise ModelFileError(
                f"'{path}': serving a .safetensors model needs PyTorch ({error}): pip install 'patchcore[full]', "
                "or serve a model exported with patchcore export (.onnx, .xml)"
            ) from None
        model = PatchCore.load(path, device=device, batch_size=batch_size, progress=False)
    side = model.layout_.image_size
    blank = prepare_image("warm-up", np.full((side, side, 3), 128, dtype=np.uint8), model.layout_, as_array=_exported(model))
    for prediction in model.predict_loaded([blank]):
        prediction.to_record()
    served = ServedModel(model, path, sha256, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    served.metadata = _describe(served)
    return served


def _format_version(served: ServedModel) -> int:
    """The newest model file format this server reads, for the kind of file it serves."""
    if _exported(served.model):
        return EXPORT_FORMAT_VERSION
    from ..storage import FORMAT_VERSION

    return FORMAT_VERSION


def _exported(model: PatchCore | ExportedModel) -> bool:
    return isinstance(model, ExportedModel)


def _describe(served: ServedModel) -> dict[str, Any]:
    model, calibration = served.model, served.model.calibration_
    settings = model.settings if _exported(model) else model.settings()
    return {
        "package_version": __version__,
        "model_file": str(served.path),
        "file_sha256": served.sha256,
        "loaded_at": served.loaded_at,
        "engine": model.engine if _exported(model) else "pytorch",
        "backbone": settings["backbone"],
        "layers": list(settings["layers"]),
        "input": {**model.layout_.to_dict(), "description": model.layout_.describe()},
        "memory_bank_shape": list(settings["memory_bank_shape"]),
        "num_fit_images": settings["num_fit_images"],
        "num_neighbors": settings["num_neighbors"],
        "index": "exact, in the exported graph" if _exported(model) else model.index,
        "device": "cpu" if _exported(model) else str(model.device),
        "image_threshold": calibration.image_threshold,
        "pixel_threshold": calibration.pixel_threshold,
        "image_good_mean": calibration.image_good_mean,
        "false_alarm_rate": calibration.false_alarm_rate,
        "decision_rule": calibration.describe(),
        "calibration_warning": calibration.warning,
        # the page re-cuts at any threshold and shows the rate that cut would give on good images
        "good_scores": [round(float(score), 6) for score in calibration.good_scores],
    }


class _Metrics:
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
        self.reloads = Counter("patchcore_model_reloads", "Model reloads, by result", ["result"], registry=self.registry)
        self.model = Info("patchcore_model", "The model being served", registry=self.registry)


class _State:
    served: ServedModel | None = None
    load_error: str | None = None
    batcher: MicroBatcher | None = None


def _not_ready_reason(state: _State) -> str:
    return f"model failed to load: {state.load_error}" if state.load_error else "model is loading"


def create_app(
    model_path: str | Path,
    *,
    name: str | None = None,
    device: str = "auto",
    max_batch: int = 8,
    max_wait_ms: float = 10.0,
    max_queue: int = 64,
    max_request_mb: float = 32.0,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    reload_on_sighup: bool = False,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The ASGI app serving the model at ``model_path`` under ``name`` (default: the file's stem).

    The model loads in the background once the app starts, so that liveness answers at once and
    readiness once the model is warm. If that first load fails, ``on_load_failure(message)`` is
    called (the command line uses it to stop with the message). ``reload_on_sighup`` makes
    SIGHUP reload the file, like the reload route; only where the app runs on the main thread.
    """
    if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
        raise ValueError(f"need --max-batch >= 1, --max-queue >= 1 and --max-wait-ms >= 0, got {max_batch}, {max_queue} and {max_wait_ms}")
    if max_request_mb <= 0 or max_image_pixels < 64:
        raise ValueError(f"need --max-request-mb > 0 and --max-image-pixels >= 64, got {max_request_mb} and {max_image_pixels}")
    model_path = Path(model_path)
    model_name = name or model_path.stem
    max_body = int(max_request_mb * 1024 * 1024)
    state = _State()
    metrics = _Metrics(max_batch)
    reload_lock = asyncio.Lock()

    async def reload() -> tuple[bool, str]:
        """Load the file again; on any failure keep serving the model there is."""
        async with reload_lock:
            try:
                sha256 = await run_in_threadpool(file_sha256, model_path)  # a missing file fails here, scoring undisturbed
                served = await state.batcher.run_exclusive(load_served_model, model_path, device, max_batch, sha256)
            except (ModelFileError, WeightsError, BadInputError, OSError, ValueError, RuntimeError) as error:
                metrics.reloads.labels("failed").inc()
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                if state.served is None:
                    state.load_error = message
                    return False, message
                return False, f"{message}; still serving the model loaded at {state.served.loaded_at} (sha256 {state.served.sha256[:12]})"
            state.served, state.load_error = served, None
            metrics.reloads.labels("ok").inc()
            metrics.model.info({"file": str(model_path), "sha256": served.sha256, "backbone": served.model.backbone, "loaded_at": served.loaded_at})
            return True, f"loaded {model_path} (sha256 {served.sha256[:12]})"

    async def first_load() -> None:
        loaded, message = await reload()
        if not loaded and on_load_failure is not None:
            on_load_failure(message)

    def score(items: list[tuple[ServedModel, LoadedImage]]) -> list[Prediction]:
        """Runs on the scoring thread. Each item is scored by the model it was decoded for, so a
        reload between upload and scoring cannot mismatch an image and a model."""
        results: list[Prediction | None] = [None] * len(items)
        for served in {id(s): s for s, _ in items}.values():
            positions = [i for i, (s, _) in enumerate(items) if s is served]
            for position, prediction in zip(positions, served.model.predict_loaded([items[i][1] for i in positions])):
                results[position] = prediction
        return results

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher = MicroBatcher(score, max_batch, max_wait_ms / 1000.0, max_queue, on_batch=metrics.batch_size.observe)
        state.batcher.start()
        metrics.queue_depth.set_function(lambda: state.batcher.depth)
        loading = asyncio.get_running_loop().create_task(first_load())
        hooked = reload_on_sighup and threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP")
        if hooked:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload_and_log()))
        yield
        if hooked:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        loading.cancel()
        await state.batcher.stop()

    async def _reload_and_log() -> None:
        loaded, message = await reload()
        print(f"patchcore serve: SIGHUP: {message}" if loaded else f"patchcore serve: SIGHUP: reload failed: {message}", file=sys.stderr, flush=True)

    app = FastAPI(title="patchcore", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.patchcore = state

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    def _unknown(requested: str) -> JSONResponse | None:
        if requested != model_name:
            return _error(404, f"no model named '{requested}' here; this server serves '{model_name}'")
        if state.served is None:
            return _error(503, _not_ready_reason(state), headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        return None

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/page", StaticFiles(directory=PAGE), name="page")

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        if state.served is None:
            return JSONResponse({"ready": False, "reason": _not_ready_reason(state)}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "patchcore", "version": __version__, "extensions": ["model_repository"], "models": [model_name]}

    @app.get("/v2/models/{requested}")
    async def model_metadata(requested: str) -> JSONResponse:
        if (refusal := _unknown(requested)) is not None:
            return refusal
        served = state.served
        return JSONResponse({
            "name": model_name,
            "versions": [served.sha256[:12]],
            "platform": f"patchcore-{served.metadata['engine']}",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1], "parameters": {"content": "encoded image files (PNG, JPEG, BMP, TIFF, WebP)"}}],
            "outputs": [
                {"name": "score", "datatype": "FP32", "shape": [-1]},
                {"name": "is_anomalous", "datatype": "BOOL", "shape": [-1]},
                {"name": "regions", "datatype": "JSON", "shape": [-1]},
            ],
            "patchcore": served.metadata,
            "server": {
                "max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_queue": max_queue,
                "max_request_mb": max_request_mb, "max_image_pixels": max_image_pixels, "model_format_version": _format_version(served),
            },
        })

    @app.get("/v2/models/{requested}/ready")
    async def model_ready(requested: str) -> JSONResponse:
        if (refusal := _unknown(requested)) is not None:
            return refusal
        return JSONResponse({"name": model_name, "ready": True})

    @app.post("/v2/models/{requested}/predict")
    async def predict(requested: str, request: Request, picture: bool = False, picture_format: str = "jpeg", filename: str = "image") -> JSONResponse:
        started = time.perf_counter()
        try:
            if (refusal := _unknown(requested)) is not None:
                return refusal
            if picture_format not in ("jpeg", "png"):
                return _error(422, f"picture_format must be jpeg or png, got {picture_format!r}")
            body = await _read_body(request, max_body)
            if body is None:
                return _error(413, f"request body is larger than the limit of {max_request_mb:g} MB (--max-request-mb)")
            uploads = await _uploads(request, body, filename)
            if isinstance(uploads, JSONResponse):
                return uploads
            if len(uploads) > max_queue:  # could never fit, however long the client waited
                return _error(413, f"request has {len(uploads)} images, more than the queue holds ({max_queue}, --max-queue); send fewer per request")
            served = state.served
            try:
                state.batcher.check_room(len(uploads))  # refuse before paying for the decoding
                loaded = await asyncio.gather(*(run_in_threadpool(_decode, upload, data, served, picture, max_image_pixels) for upload, data in uploads))
                readable = [item for item, _ in loaded if item.error is None]
                waiting = state.batcher.submit([(served, item) for item in readable])  # others may have filled it meanwhile
            except QueueFullError as error:
                return _error(503, str(error), headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            scored = iter(await asyncio.gather(*waiting))
            results, statuses = [], []
            for item, status in loaded:
                if item.error is not None:
                    metrics.images.labels(_REFUSALS[status]).inc()
                    results.append({"path": str(item.path), "error": item.error, "status": status})
                    statuses.append(status)
                    continue
                prediction = next(scored)
                results.append(await run_in_threadpool(_record, prediction, picture, picture_format))
                metrics.images.labels("scored").inc()
                metrics.anomalies.inc(int(prediction.is_anomalous))
                statuses.append(200)
            status = 200 if 200 in statuses else statuses[0]
            reply = {"model_name": model_name, "model_version": served.sha256[:12], "results": results}
            if status != 200:
                reply["error"] = results[0]["error"]
            return JSONResponse(reply, status_code=status)
        finally:
            metrics.latency.observe(time.perf_counter() - started)

    @app.post("/v2/repository/models/{requested}/load")
    async def load(requested: str) -> JSONResponse:
        if requested != model_name:
            return _error(404, f"no model named '{requested}' here; this server serves '{model_name}'")
        loaded, message = await reload()
        if not loaded:
            return _error(422, f"reload failed: {message}")
        return JSONResponse({"name": model_name, "loaded": True, "message": message, "patchcore": state.served.metadata})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# -----------------------------------------------------------------------------------------------
# Reading requests


_REFUSALS = {413: "too_large", 415: "not_an_image", 422: "unreadable"}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None when it is over ``limit`` bytes. An oversized body is still read
    (and dropped, up to a bound) so that the client gets the 413 instead of a broken connection."""
    declared = request.headers.get("content-length")
    over = declared is not None and declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            over = True
        if over:
            chunks = []
            if size > 4 * limit:
                break
            continue
        chunks.append(chunk)
    return None if over else b"".join(chunks)


async def _uploads(request: Request, body: bytes, filename: str) -> list[tuple[str, bytes]] | JSONResponse:
    """(file name, bytes) of each image: the files of a multipart form, else the body as one image."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        if not body:
            return _error(400, "no image: send image files as multipart form data, or one image as the request body")
        return [(filename, body)]

    async def once():
        yield body

    try:
        form = await MultiPartParser(request.headers, once(), max_files=MAX_FILES_PER_REQUEST, max_fields=64).parse()
    except MultiPartException as error:
        return _error(400, f"malformed multipart form: {error.message}")
    try:
        files = [value for _, value in form.multi_items() if not isinstance(value, str)]
        uploads = [(upload.filename or f"image{i + 1}", await upload.read()) for i, upload in enumerate(files)]
    finally:
        await form.close()
    if not uploads:
        return _error(400, "no image files in the multipart form (send them as file fields, e.g. curl -F file=@part.png)")
    return uploads


def _decode(name: str, data: bytes, served: ServedModel, keep_rgb: bool, max_pixels: int) -> tuple[LoadedImage, int]:
    """Decode and prepare one upload for ``served``'s model: the image and 200, or its error and status."""
    try:
        rgb = read_image_bytes(data, name, max_pixels)
    except ImageTooLargeError as error:
        return LoadedImage(Path(name), error=str(error)), 413
    except NotAnImageError as error:
        return LoadedImage(Path(name), error=str(error)), 415
    except (DamagedImageError, BadInputError) as error:
        return LoadedImage(Path(name), error=str(error)), 422
    loaded = prepare_image(name, rgb, served.model.layout_, keep_rgb, as_array=_exported(served.model))
    return loaded, 200 if loaded.error is None else 422


def _record(prediction: Prediction, picture: bool, picture_format: str) -> dict[str, Any]:
    """The JSON record (as ``predict`` writes it), with the overlay picture and the map when asked."""
    record = prediction.to_record()
    if picture:
        calibration = prediction.calibration
        overlay = predict_picture(prediction.image, prediction.map_at, calibration, prediction.score, prediction.is_anomalous)
        record["picture"] = _data_url(overlay[..., ::-1], picture_format)
        # the map on the pictures' fixed scale: 0 = typical good, 128 = the pixel threshold, 255 = twice as far
        level = np.clip(calibration.normalize_maps(prediction.anomaly_map) / 2.0, 0.0, 1.0)
        record["anomaly_map"] = _data_url((level * 255).round().astype(np.uint8), "png")
    return record


def _data_url(image: np.ndarray, kind: str) -> str:
    parameters = [cv2.IMWRITE_JPEG_QUALITY, 90] if kind == "jpeg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, encoded = cv2.imencode(".jpg" if kind == "jpeg" else ".png", np.ascontiguousarray(image), parameters)
    if not ok:
        raise RuntimeError(f"could not encode a {kind} picture")
    return f"data:image/{kind};base64,{base64.b64encode(encoded.tobytes()).decode('ascii')}"


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> int:
    """Run the server until interrupted (the ``patchcore serve`` command). Returns the exit status:
    2 when the model could not be loaded at start."""
    import uvicorn

    failure: list[str] = []
    server: uvicorn.Server | None = None

    def stop(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    app = create_app(model_path, reload_on_sighup=True, on_load_failure=stop, **options)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    print(f"patchcore serve: {model_path} at http://{host}:{port}/ (ready at /v2/health/ready; pid {os.getpid()})", file=sys.stderr, flush=True)
    server.run()
    if failure:
        print(f"patchcore: error: {failure[0]}", file=sys.stderr)
        return 2
    return 0
