"""The inference server: a thin HTTP shell (FastAPI) over a scoring model (``scoring.load_model``)
and its ``predict_loaded``. :func:`create_app` builds the app from its parts.

Routes follow the KServe v2 protocol's conventions where it has one:

    GET  /                                  the inspection page (served from the package, works offline)
    GET  /v2/health/live                    the process is up
    GET  /v2/health/ready                   the model is loaded and warmed up
    GET  /v2/models/<name>                  what the model is: backbone, input, bank, thresholds, checksum   [API key]
    POST /v2/models/<name>/predict          images (multipart files, or one image as the raw body) -> results [API key]
    POST /v2/repository/models/<name>/load  reload the model file; a bad file leaves the old model serving  [admin token]
    GET  /v2/models/<name>/decisions        the record: decisions, filtered and paged                  [API key]
    GET  /v2/models/<name>/decisions/<id>   one decision, its reviews and kept image                     [API key]
    POST /v2/models/<name>/decisions/<id>/review  false alarm or confirmed defect                         [API key]
    GET  /v2/models/<name>/drift            the drift watch, per station                                 [API key]
    GET  /metrics                           Prometheus text

The parts: ``routes/`` (health and metrics, the model and scoring, the model repository),
``holder.py`` (the model: load, warm-up, reload, what clients are told), ``uploads.py`` (one
image: header, decoding, record), ``recording.py`` (the inspection record: decisions, kept
images, drift), ``state.py`` (what the routes share), ``metrics.py``.
The guards live in modules of their own, in the order a request meets them: ``protocol.py``
(connections, slow headers), ``origin.py`` (Host and Origin), ``access.py`` (API keys, admin
token), ``requests.py`` (the body's size and time), ``budget.py`` (memory, before decoding).
Images are decoded by the intake (``intake.py``) on a small pool of threads, scored in
micro-batches on one scoring thread (``batching.py``), and turned into records (map at the
image's size, regions, pictures) on the pool again, one image at a time.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable, Sequence

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from .access import AccessRules
from .limits import ServerLimits
from .metrics import CountRequests
from .origin import LOOPBACK_HOSTS, HostAndOriginGuard
from ..record.recorder import Recorder
from .routes import admin, health, models, record
from .state import ServerState, error_response

PAGE = Path(__file__).parent / "page"


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
    recorder: Recorder | None = None,
) -> FastAPI:
    """The ASGI app serving the model at ``model_path`` under ``name`` (default: the file's stem).

    The model loads in the background once the app starts, so that liveness answers at once and
    readiness once the model is warm. If that first load fails, ``on_load_failure(message)`` is
    called (the command line uses it to stop with the message). ``reload_on_sighup`` makes
    SIGHUP reload the file, like the reload route; only where the app runs on the main thread.
    ``limits`` (:class:`ServerLimits`), ``access`` (:class:`AccessRules`: keys and admin token)
    and ``allowed_hosts`` (the Host names answered; ``"*"`` for any) guard it. ``recorder``
    (:class:`patchcore.record.recorder.Recorder`, opened by the caller; None: no record) keeps
    every decision; the app closes it when it stops.
    """
    model_path = Path(model_path)
    access = access or AccessRules()
    state = ServerState(model_path, name or model_path.stem, device, limits or ServerLimits(), access, recorder)

    async def first_load() -> None:
        loaded, message = await state.reload()
        if not loaded and on_load_failure is not None:
            on_load_failure(message)

    async def reload_and_log() -> None:
        loaded, message = await state.reload()
        print(f"patchcore serve: SIGHUP: {message}" if loaded else f"patchcore serve: SIGHUP: reload failed: {message}", file=sys.stderr, flush=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        loop = asyncio.get_running_loop()
        loading = loop.create_task(first_load())
        hooked = reload_on_sighup and threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP")
        if hooked:
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload_and_log()))
        yield
        if hooked:
            loop.remove_signal_handler(signal.SIGHUP)
        loading.cancel()
        await state.stop()

    # /docs would load Swagger UI from a CDN, which a plant's network does not reach: off.
    # The schema stays at /openapi.json.
    app = FastAPI(title="patchcore", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.patchcore = state
    app.state.access = access
    app.add_middleware(HostAndOriginGuard, allowed_hosts=allowed_hosts)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        answer = error_response(error.status_code, str(error.detail), headers=error.headers)
        return await state.slowed(answer) if error.status_code == 401 else answer  # slows the guessing of keys too

    app.add_middleware(CountRequests, counter=state.metrics.requests)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/page", StaticFiles(directory=PAGE), name="page")
    for router in (health.router, models.router, record.router, admin.router):
        app.include_router(router)
    return app
