"""``patchcore serve``: the app (``app.py``) run by uvicorn with the connection guards, TLS and
the process settings a server needs, set here at start-up and never on import."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Sequence

from ..intake import DECODE_BYTES_PER_PIXEL, ImageHeader, own_the_pixel_limit
from ..layout import InputLayout
from ..record.recorder import Recorder, RecordOptions
from .access import AccessRules
from .app import create_app
from .budget import MB, image_cost, request_cap
from .limits import ServerLimits
from .origin import default_allowed_hosts
from .protocol import guarded_protocol

#: seconds an idle keep-alive connection stays open
KEEP_ALIVE_S = 5


def serve(
    model_path: str | Path, host: str = "127.0.0.1", port: int = 8000, *, name: str | None = None, device: str = "auto",
    limits: ServerLimits | None = None, access: AccessRules | None = None, allowed_hosts: Sequence[str] | None = None,
    ssl_certfile: str | None = None, ssl_keyfile: str | None = None, record: RecordOptions | None = None,
) -> int:
    """Run the server until interrupted (the ``patchcore serve`` command). Returns the exit status:
    2 when the model could not be loaded at start. ``record``: where decisions are kept
    (:class:`RecordOptions`; None: no record)."""
    import uvicorn

    limits = limits or ServerLimits()
    access = access or AccessRules()
    hosts = list(allowed_hosts) if allowed_hosts else default_allowed_hosts(host)
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ValueError("TLS needs both --ssl-certfile and --ssl-keyfile")
    own_the_pixel_limit()  # every image this process reads goes through the intake and its --max-image-pixels
    recorder = Recorder(record) if record is not None else None  # an unusable record stops the start, with one line
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def stop(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    app = create_app(
        model_path, name=name, device=device, limits=limits, access=access, allowed_hosts=hosts, reload_on_sighup=True, on_load_failure=stop,
        recorder=recorder,
    )
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
        http=guarded_protocol(limits.max_connections, limits.header_timeout_s),
        # a last resort behind the protocol's own cap, which answers with Retry-After first
        limit_concurrency=2 * limits.max_connections, timeout_keep_alive=KEEP_ALIVE_S,
        ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
    )
    server = uvicorn.Server(config)
    scheme = "https" if ssl_certfile else "http"
    lines = describe(model_path, scheme, host, port, limits, access, hosts)
    lines.insert(1, recorder.describe() if recorder is not None else "record: off (decisions are not kept)")
    for line in lines:
        print(f"patchcore serve: {line}", file=sys.stderr, flush=True)
    server.run()
    if failure:
        print(f"patchcore: error: {failure[0]}", file=sys.stderr)
        return 2
    return 0


def describe(model_path: str | Path, scheme: str, host: str, port: int, limits: ServerLimits, access: AccessRules, hosts: Sequence[str]) -> list[str]:
    """The lines the server prints at start: where, with which limits, for whom."""
    budget = limits.budget_bytes
    cap = request_cap(budget, limits.per_request_bytes)
    shown = f"[{host}]" if ":" in host else host
    lines = [
        f"{Path(model_path).name} at {scheme}://{shown}:{port}/ (ready at /v2/health/ready; pid {os.getpid()})",
        f"memory budget {budget / MB:.0f} MB (one request at most {cap / MB:.0f} MB), images up to {limits.max_image_pixels:,} px, "
        f"bodies up to {limits.max_request_mb:g} MB, {limits.max_queue} images queued, {limits.max_connections} connections",
        f"answers to hosts: {', '.join(hosts)} (--allowed-hosts)",
        "reload over HTTP: " + ("with the admin token" if access.admin_token else "off (no admin token; SIGHUP reloads)")
        + "; scoring: " + (f"API key needed ({len(access.api_keys)} keys)" if access.api_keys else "open (no API keys)"),
    ]
    # A square image at the pixel limit, in the costliest mode (WebP's decoder, dearer still, aside)
    side = math.isqrt(limits.max_image_pixels)
    costliest = max(DECODE_BYTES_PER_PIXEL, key=DECODE_BYTES_PER_PIXEL.get)
    need = image_cost(ImageHeader("largest", "PNG", costliest, side, side), InputLayout("square"), "", True)
    if need > cap:
        lines.append(
            f"warning: an image of {limits.max_image_pixels:,} px may need up to {need / MB:.0f} MB, more than one request may hold; "
            "such images get 413: raise --max-memory-mb or lower --max-image-pixels"
        )
    return lines
