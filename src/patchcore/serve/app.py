"""The inference server: a thin HTTP shell (FastAPI) over ``PatchCore.load`` and ``predict_loaded``.

Routes follow the KServe v2 protocol's conventions where it has one:

    GET  /                                  the inspection page (served from the package, works offline)
    GET  /v2/health/live                    the process is up
    GET  /v2/health/ready                   the model is loaded and warmed up
    GET  /v2/models/<name>                  what the model is: backbone, input, bank, thresholds, checksum   [API key]
    POST /v2/models/<name>/predict          images (multipart files, or one image as the raw body) -> results [API key]
    POST /v2/repository/models/<name>/load  reload the model file; a bad file leaves the old model serving  [admin token]
    GET  /metrics                           Prometheus text

The guards live in modules of their own, in the order a request meets them: ``protocol.py``
(connections, slow headers), ``origin.py`` (Host and Origin), ``access.py`` (API keys, admin
token), ``requests.py`` (the body's size and time), ``budget.py`` (memory, before decoding).
Images are decoded by the intake (``intake.py``) on a small pool of threads, scored in
micro-batches on one scoring thread (``batching.py``), and turned into records (map at the
image's size, regions, pictures) on the pool again, one image at a time.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import cv2
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from .. import __version__
from ..data import LoadedImage, file_sha256 as digest_of_file, prepare_image
from ..errors import BadInputError, ModelFileError, WeightsError, is_missing_pytorch
from ..intake import ImageHeader, ImageTooLargeError, NotAnImageError, accepted_formats_text, read_header, read_image_bytes
from ..render import predict_picture, shrink
from ..runtime import EXPORT_FORMAT_VERSION, EXPORTED_SUFFIXES, ExportedModel
from .access import AccessRules, require_admin, require_api_key
from .batching import MicroBatcher, QueueFullError
from .budget import PICTURE_MAX_SIDE, BudgetBusyError, MemoryBudget, NeverFitsError, Reservation, image_cost, tile_count
from .limits import ServerLimits
from .origin import LOOPBACK_HOSTS, HostAndOriginGuard
from .requests import DRAIN_FACTOR, RequestError, declared_length, drain, read_body, uploads

if TYPE_CHECKING:  # PyTorch is imported only to serve a .safetensors model: an exported one needs none
    from ..model import PatchCore, Prediction

PAGE = Path(__file__).parent / "page"
#: seconds a client is asked to wait when the server is busy
RETRY_AFTER_SECONDS = 1
#: a body's reservation: the body, and the copies of its files that parsing makes
BODY_COPIES = 2
PICTURE_FORMATS = {"jpeg": "jpeg", "jpg": "jpeg", "png": "png"}
#: a request that reserves more than this (or than the small requests' share of the budget, if
#: less) is decoded on the large requests' thread: about 20 MP of images, whatever the budget
LARGE_LANE_BYTES = 256 * 2**20
#: how much lower the large requests' thread runs (Unix niceness, 0 to 19)
LARGE_LANE_NICENESS = 10
#: refusals for a request's content, answered after --refusal-delay (a 401 too)
DELAYED_REFUSALS = frozenset({400, 401, 413, 415, 422})


@dataclass
class ServedModel:
    """A loaded, warmed-up model and what clients are told about it."""

    model: PatchCore | ExportedModel
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


def load_served_model(
    path: str | Path, device: str = "auto", batch_size: int = 8, sha256: str | None = None, max_image_pixels: int | None = None
) -> ServedModel:
    """Load a model file (``.safetensors``, or an exported ``.onnx`` / OpenVINO ``.xml``) and score one
    blank image through it, so that the first request is not slow.

    Building a PyTorch model traces the backbone with torch.fx, which patches torch globally for
    a moment: the server runs this on its scoring thread, never beside a batch being scored.
    """
    path = Path(path)
    sha256 = sha256 or file_sha256(path)
    if path.suffix in EXPORTED_SUFFIXES:
        model = ExportedModel(path, batch_size=batch_size, max_image_pixels=max_image_pixels)
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
        model = PatchCore.load(path, device=device, batch_size=batch_size, progress=False, max_image_pixels=max_image_pixels)
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
        "model_file": served.path.name,  # its name, not where it lies: clients need not know the server's folders
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
        self.memory_reserved = Gauge("patchcore_memory_reserved_bytes", "Bytes reserved by requests in flight (the memory budget in use)", registry=self.registry)
        self.memory_budget = Gauge("patchcore_memory_budget_bytes", "The memory budget (--max-memory-mb)", registry=self.registry)
        self.refusals = Counter("patchcore_admission_refusals", "Requests refused for room: busy (503) or never fits (413)", ["reason"], registry=self.registry)
        self.reloads = Counter("patchcore_model_reloads", "Model reloads, by result", ["result"], registry=self.registry)
        self.model = Info("patchcore_model", "The model being served", registry=self.registry)


class _State:
    served: ServedModel | None = None
    load_error: str | None = None
    batcher: MicroBatcher | None = None
    budget: MemoryBudget | None = None


def create_app(
    model_path: str | Path,
    *,
    name: str | None = None,
    device: str = "auto",
    limits: ServerLimits | None = None,
    access: AccessRules | None = None,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
    reload_on_sighup: bool = False,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The ASGI app serving the model at ``model_path`` under ``name`` (default: the file's stem).

    The model loads in the background once the app starts, so that liveness answers at once and
    readiness once the model is warm. If that first load fails, ``on_load_failure(message)`` is
    called (the command line uses it to stop with the message). ``reload_on_sighup`` makes
    SIGHUP reload the file, like the reload route; only where the app runs on the main thread.
    ``limits`` (:class:`ServerLimits`), ``access`` (:class:`AccessRules`: keys and admin token)
    and ``allowed_hosts`` (the Host names answered; ``"*"`` for any) guard it.
    """
    limits = limits or ServerLimits()
    access = access or AccessRules()
    model_path = Path(model_path)
    model_name = name or model_path.stem
    state = _State()
    metrics = _Metrics(limits.max_batch)
    reload_lock = asyncio.Lock()
    # Headers, decoding and records on threads of their own: a pool for ordinary requests (a
    # line's images), and one thread for large ones (LARGE_LANE_BYTES), so that huge images take
    # at most one core, at a lower priority, and never hold up a line's ordinary images.
    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="patchcore-intake")
    large_lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchcore-large", initializer=_lower_priority)

    def public(message: str) -> str:
        """A load error as clients see it: the model file by name, not by its place on disk."""
        return message.replace(str(model_path), model_path.name)

    async def reload() -> tuple[bool, str]:
        """Load the file again; on any failure keep serving the model there is."""
        async with reload_lock:
            loop = asyncio.get_running_loop()
            try:
                sha256 = await loop.run_in_executor(pool, file_sha256, model_path)  # a missing file fails here, scoring undisturbed
                served = await state.batcher.run_exclusive(load_served_model, model_path, device, limits.max_batch, sha256, limits.max_image_pixels)
            except (ModelFileError, WeightsError, BadInputError, OSError, ValueError, RuntimeError) as error:
                metrics.reloads.labels("failed").inc()
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                if state.served is None:
                    state.load_error = message
                    return False, message
                return False, f"{message}; still serving the model loaded at {state.served.loaded_at} (sha256 {state.served.sha256[:12]})"
            state.served, state.load_error = served, None
            metrics.reloads.labels("ok").inc()
            metrics.model.info({"file": model_path.name, "sha256": served.sha256, "backbone": served.metadata["backbone"], "loaded_at": served.loaded_at})
            return True, f"loaded {model_path.name} (sha256 {served.sha256[:12]})"

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
        state.batcher = MicroBatcher(score, limits.max_batch, limits.max_wait_ms / 1000.0, limits.max_queue, on_batch=metrics.batch_size.observe)
        state.batcher.start()
        state.budget = MemoryBudget(limits.budget_bytes, limits.per_request_bytes)
        metrics.queue_depth.set_function(lambda: state.batcher.depth)
        metrics.memory_reserved.set_function(lambda: state.budget.in_use)
        metrics.memory_budget.set(state.budget.capacity)
        loading = asyncio.get_running_loop().create_task(first_load())
        hooked = reload_on_sighup and threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP")
        if hooked:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload_and_log()))
        yield
        if hooked:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        loading.cancel()
        await state.batcher.stop()
        pool.shutdown(wait=True)
        large_lane.shutdown(wait=True)

    async def _reload_and_log() -> None:
        loaded, message = await reload()
        print(f"patchcore serve: SIGHUP: {message}" if loaded else f"patchcore serve: SIGHUP: reload failed: {message}", file=sys.stderr, flush=True)

    # /docs would load Swagger UI from a CDN, which a plant's network does not reach: off.
    # The schema stays at /openapi.json.
    app = FastAPI(title="patchcore", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.patchcore = state
    app.state.access = access
    app.add_middleware(HostAndOriginGuard, allowed_hosts=allowed_hosts)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        answer = _error(error.status_code, str(error.detail), headers=error.headers)
        return await _slowed(answer) if error.status_code == 401 else answer  # slows the guessing of keys too

    app.add_middleware(_CountRequests, counter=metrics.requests)

    def _unknown(requested: str) -> JSONResponse | None:
        if requested != model_name:
            return _error(404, f"no model named '{requested}' here; this server serves '{model_name}'")
        if state.served is None:
            return _error(503, _not_ready_reason(), headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        return None

    def _not_ready_reason() -> str:
        return f"model failed to load: {public(state.load_error)}" if state.load_error else "model is loading"

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
            return JSONResponse({"ready": False, "reason": _not_ready_reason()}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "patchcore", "version": __version__, "extensions": ["model_repository"], "models": [model_name], "api_key_required": bool(access.api_keys)}

    @app.get("/v2/models/{requested}", dependencies=[Depends(require_api_key)])
    async def model_metadata(requested: str) -> JSONResponse:
        if (refusal := _unknown(requested)) is not None:
            return refusal
        served = state.served
        return JSONResponse({
            "name": model_name,
            "versions": [served.sha256[:12]],
            "platform": f"patchcore-{served.metadata['engine']}",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1], "parameters": {"content": f"encoded image files ({accepted_formats_text()})"}}],
            "outputs": [
                {"name": "score", "datatype": "FP32", "shape": [-1]},
                {"name": "is_anomalous", "datatype": "BOOL", "shape": [-1]},
                {"name": "regions", "datatype": "JSON", "shape": [-1]},
            ],
            "patchcore": served.metadata,
            "server": {**limits.to_dict(), "model_format_version": _format_version(served), "picture_max_side": PICTURE_MAX_SIDE},
        })

    @app.get("/v2/models/{requested}/ready")
    async def model_ready(requested: str) -> JSONResponse:
        if (refusal := _unknown(requested)) is not None:
            return refusal
        return JSONResponse({"name": model_name, "ready": True})

    @app.post("/v2/models/{requested}/predict", dependencies=[Depends(require_api_key)])
    async def predict(requested: str, request: Request, picture: bool = False, picture_format: str = "jpeg", filename: str = "image") -> JSONResponse:
        started = time.perf_counter()
        reservation = Reservation()
        try:
            if (refusal := _unknown(requested)) is not None:
                return await _drained(request, refusal)
            if picture_format not in PICTURE_FORMATS:
                answer = await _drained(request, _error(422, f"picture_format must be jpeg (or jpg) or png, got {picture_format!r}"))
            else:
                answer = await _predict(request, reservation, state.served, picture, PICTURE_FORMATS[picture_format], filename)
        except RequestError as error:
            # after a 408 the rest of the body may still be on its way: the connection is not reused
            answer = _error(error.status, error.message, headers={"Connection": "close"} if error.status == 408 else None)
        except NeverFitsError as error:
            metrics.refusals.labels("never_fits").inc()
            answer = _error(413, (
                f"request needs {error.args[0] / 2**20:.0f} MB of memory to decode, score and answer, more than one request may hold "
                f"({state.budget.per_request / 2**20:.0f} MB, --max-request-memory-mb); send fewer or smaller images per request"
            ))
        except (BudgetBusyError, QueueFullError) as error:
            metrics.refusals.labels("busy").inc()
            text = str(error) if isinstance(error, QueueFullError) else "the server is busy with other requests (its memory budget is in use); retry shortly"
            answer = _error(503, text, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        finally:
            state.budget.release(reservation)
            metrics.latency.observe(time.perf_counter() - started)
        return await _slowed(answer)

    async def _slowed(answer: JSONResponse) -> JSONResponse:
        """A request refused for what it holds (nothing in it could be scored) is answered after
        the refusal delay, its memory already given back: a client that repeats it back to back
        is held to one request a delay on each connection, so it cannot keep the server busy. A
        request with anything scored, a busy answer (503) or a timeout (408) is never held."""
        if answer.status_code in DELAYED_REFUSALS and limits.refusal_delay_s > 0:
            await asyncio.sleep(limits.refusal_delay_s)
        return answer

    async def _drained(request: Request, answer: JSONResponse) -> JSONResponse:
        await _drain_body(request)
        return answer

    async def _drain_body(request: Request) -> None:
        """Before an answer given without reading the body: read and drop it, so that a client
        still sending hears the answer instead of a reset."""
        await drain(request, DRAIN_FACTOR * limits.max_body_bytes, asyncio.get_running_loop().time() + limits.read_timeout_s)

    async def _predict(request: Request, reservation: Reservation, served: ServedModel, picture: bool, picture_format: str, filename: str) -> JSONResponse:
        loop = asyncio.get_running_loop()
        limit_text = f"{limits.max_request_mb:g} MB (--max-request-mb)"
        declared = declared_length(request)
        if declared is not None and declared > limits.max_body_bytes:
            await read_body(request, limits.max_body_bytes, limits.read_timeout_s, limit_text)  # drains, then 413
        try:
            await state.budget.grow(reservation, BODY_COPIES * (declared if declared is not None else limits.max_body_bytes))
        except (BudgetBusyError, NeverFitsError):
            await _drain_body(request)
            raise
        body = await read_body(request, limits.max_body_bytes, limits.read_timeout_s, limit_text)
        files = await uploads(request, body, filename)
        del body
        if len(files) > limits.max_queue:  # could never fit, however long the client waited
            raise RequestError(413, f"request has {len(files)} images, more than the queue holds ({limits.max_queue}, --max-queue); send fewer per request")
        # Each image's header, then the room to decode them all, then the decoding.
        headers = await loop.run_in_executor(pool, _headers, files, served, limits)  # one trip to the pool for them all
        await state.budget.grow(reservation, sum(image_cost(h, served.model.layout_, served.metadata["backbone"], picture) for h, _ in headers if h is not None))
        readable = sum(h is not None for h, _ in headers)
        state.batcher.check_room(readable)  # refuse before paying for the decoding
        lane = large_lane if reservation.nbytes > min(state.budget.small_limit, LARGE_LANE_BYTES) else pool
        loaded = await asyncio.gather(*(
            loop.run_in_executor(lane, _decode, name, data, served, picture, limits.max_image_pixels) if header is not None else _as_result(failure)
            for (name, data), (header, failure) in zip(files, headers)
        ))
        files = None
        waiting = iter(state.batcher.submit([(served, item) for item, status in loaded if item.error is None]))  # others may have filled it meanwhile
        results, statuses = [], []
        for item, status in loaded:
            if item.error is not None:
                metrics.images.labels(_REFUSALS[status]).inc()
                results.append({"path": str(item.path), "error": item.error, "status": status})
                statuses.append(status)
                continue
            prediction = await next(waiting)
            item.rgb = item.tensor = None
            # One image's full-size map at a time: the record is built and the map let go.
            results.append(await loop.run_in_executor(lane, _record, prediction, picture, picture_format))
            del prediction
            metrics.images.labels("scored").inc()
            metrics.anomalies.inc(int(results[-1]["is_anomalous"]))
            statuses.append(200)
        status = 200 if 200 in statuses else statuses[0]
        reply = {"model_name": model_name, "model_version": served.sha256[:12], "results": results}
        if status != 200:
            reply["error"] = results[0]["error"]
        return JSONResponse(reply, status_code=status)

    @app.post("/v2/repository/models/{requested}/load", dependencies=[Depends(require_admin)])
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


def _lower_priority() -> None:
    """This thread's CPU share after everything else's (Linux: niceness a thread at a time), so
    that the line's own images are decoded first when both want the cores."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LARGE_LANE_NICENESS)
    except (AttributeError, OSError):  # not Linux: the lane still bounds large work to one thread
        pass


class _CountRequests:
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


# -----------------------------------------------------------------------------------------------
# One image: header, decoding, record


_REFUSALS = {413: "too_large", 415: "not_an_image", 422: "unreadable"}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _status(error: BadInputError) -> int:
    if isinstance(error, ImageTooLargeError):
        return 413
    if isinstance(error, NotAnImageError):
        return 415
    return 422  # damaged, too small, or a size the input mode cannot take


def _headers(files: list[tuple[str, bytes]], served: ServedModel, limits: ServerLimits) -> list[tuple[ImageHeader | None, tuple[LoadedImage, int] | None]]:
    return [_header(name, data, served, limits) for name, data in files]


def _header(name: str, data: bytes, served: ServedModel, limits: ServerLimits) -> tuple[ImageHeader | None, tuple[LoadedImage, int] | None]:
    """One upload's header, or its error and status: refused for its format, pixels or tiles
    before anything is decoded."""
    try:
        header = read_header(data, name, limits.max_image_pixels)
    except BadInputError as error:
        return None, (LoadedImage(Path(name), error=str(error)), _status(error))
    tiles = tile_count(header, served.model.layout_)
    if tiles > limits.max_tiles:
        message = f"'{name}': image is {header.width}x{header.height} px, {tiles} tiles of the model's tile mode, more than the limit of {limits.max_tiles} (--max-tiles)"
        return None, (LoadedImage(Path(name), error=message), 413)
    return header, None


async def _as_result(value: Any) -> Any:
    return value


def _decode(name: str, data: bytes, served: ServedModel, picture: bool, max_pixels: int) -> tuple[LoadedImage, int]:
    """Decode and prepare one upload for ``served``'s model: the image and 200, or its error and
    status. The image is kept only for a picture, and then only at the picture's size."""
    try:
        rgb = read_image_bytes(data, name, max_pixels)
    except BadInputError as error:
        return LoadedImage(Path(name), error=str(error)), _status(error)
    loaded = prepare_image(name, rgb, served.model.layout_, keep_rgb=picture, as_array=_exported(served.model))
    del rgb
    if loaded.rgb is not None:
        loaded.rgb = shrink(loaded.rgb, PICTURE_MAX_SIDE)
    return loaded, 200 if loaded.error is None else 422


def _record(prediction: Prediction, picture: bool, picture_format: str) -> dict[str, Any]:
    """The JSON record (as ``predict`` writes it), with the overlay picture and the map when asked.
    The map at the image's size is made once, for the regions; the picture's once, at its size
    (the same map when the picture is at the image's size)."""
    record = prediction.to_record()
    if picture:
        calibration, rgb = prediction.calibration, prediction.image
        size = rgb.shape[:2]
        at_picture = prediction.anomaly_map if tuple(size) == tuple(prediction.image_size) else prediction.map_at(size)
        overlay = predict_picture(rgb, lambda _: at_picture, calibration, prediction.score, prediction.is_anomalous)
        record["picture"] = _data_url(overlay[..., ::-1], picture_format)
        # the map on the pictures' fixed scale: 0 = typical good, 128 = the pixel threshold, 255 = twice as far
        level = np.clip(calibration.normalize_maps(at_picture) / 2.0, 0.0, 1.0)
        record["anomaly_map"] = _data_url((level * 255).round().astype(np.uint8), "png")
    return record


def _data_url(image: np.ndarray, kind: str) -> str:
    parameters = [cv2.IMWRITE_JPEG_QUALITY, 90] if kind == "jpeg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, encoded = cv2.imencode(".jpg" if kind == "jpeg" else ".png", np.ascontiguousarray(image), parameters)
    if not ok:
        raise RuntimeError(f"could not encode a {kind} picture")
    return f"data:image/{kind};base64,{base64.b64encode(encoded.tobytes()).decode('ascii')}"
