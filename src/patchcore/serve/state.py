"""What the routes share in one app: the model holder, the scoring thread, the memory budget, the
intake's threads, the metrics and the limits (``request.app.state.patchcore``, or the
:func:`server_state` dependency), and the answers every route gives alike.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

from ..record.recorder import Recorder
from ..record.writer import RecordUnavailableError

from .access import AccessRules
from .batching import MicroBatcher
from .budget import MemoryBudget
from .holder import ModelHolder, score
from .limits import ServerLimits
from .metrics import ServerMetrics
from .recording import ServerRecord
from .requests import DRAIN_FACTOR, drain

#: seconds a client is asked to wait when the server is busy
RETRY_AFTER_SECONDS = 1
#: a request that reserves more than this (or than the small requests' share of the budget, if
#: less) is decoded on the large requests' thread: about 20 MP of images, whatever the budget
LARGE_LANE_BYTES = 256 * 2**20
#: how much lower the large requests' thread runs (Unix niceness, 0 to 19)
LARGE_LANE_NICENESS = 10
#: refusals for a request's content, answered after --refusal-delay (a 401 too)
DELAYED_REFUSALS = frozenset({400, 401, 413, 415, 422})


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error as every route answers one: ``{"error": message}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class ServerState:
    """One app's shared parts. The scoring thread and the budget exist between :meth:`start` and
    :meth:`stop` (the app's lifespan)."""

    def __init__(
        self, model_path: str | Path, model_name: str, device: str, limits: ServerLimits, access: AccessRules, recorder: Recorder | None = None
    ) -> None:
        self.model_name = model_name
        self.limits, self.access = limits, access
        self.holder = ModelHolder(model_path, device, limits.max_batch, limits.max_image_pixels)
        self.metrics = ServerMetrics(limits.max_batch)
        # Headers, decoding and records on threads of their own: a pool for ordinary requests (a
        # line's images), and one thread for large ones (LARGE_LANE_BYTES), so that huge images take
        # at most one core, at a lower priority, and never hold up a line's ordinary images.
        self.pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="patchcore-intake")
        self.large_lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchcore-large", initializer=lower_priority)
        self.batcher: MicroBatcher | None = None
        self.budget: MemoryBudget | None = None
        # the inspection record (None: --record off)
        self.record = ServerRecord(recorder, model_name, self.metrics) if recorder is not None else None
        if recorder is not None:
            self.metrics.record_spooling.set_function(lambda: float(recorder.writer.spooling))

    def start(self) -> None:
        """Start the scoring thread and the budget (on the app's event loop)."""
        limits, metrics = self.limits, self.metrics
        self.batcher = MicroBatcher(score, limits.max_batch, limits.max_wait_ms / 1000.0, limits.max_queue, on_batch=metrics.batch_size.observe)
        self.batcher.start()
        self.budget = MemoryBudget(limits.budget_bytes, limits.per_request_bytes)
        metrics.queue_depth.set_function(lambda: self.batcher.depth)
        metrics.memory_reserved.set_function(lambda: self.budget.in_use)
        metrics.memory_budget.set(self.budget.capacity)

    async def stop(self) -> None:
        await self.batcher.stop()
        self.pool.shutdown(wait=True)
        self.large_lane.shutdown(wait=True)
        if self.record is not None:  # what is queued is written before the process ends
            await asyncio.get_running_loop().run_in_executor(None, self.record.recorder.close)

    async def reload(self) -> tuple[bool, str]:
        """Load the model file again (see :meth:`ModelHolder.reload`), counted in the metrics."""
        loaded, message = await self.holder.reload(self.batcher.run_exclusive, self.pool)
        if loaded and self.record is not None:
            try:
                await self.record.on_model(self.holder.served, self.pool)
            except RecordUnavailableError as error:  # its decisions will be refused (503) until the record writes again
                print(f"patchcore serve: {error}", file=sys.stderr, flush=True)
        self.metrics.count_reload(loaded, self.holder.served)
        return loaded, message

    def unknown_name(self, requested: str) -> JSONResponse | None:
        """404 for a name this server does not serve, else None."""
        if requested != self.model_name:
            return error_response(404, f"no model named '{requested}' here; this server serves '{self.model_name}'")
        return None

    def not_serving(self, requested: str) -> JSONResponse | None:
        """404 for another name, 503 (Retry-After) while there is no model yet, else None."""
        if (refusal := self.unknown_name(requested)) is not None:
            return refusal
        if self.holder.served is None:
            return error_response(503, self.holder.not_ready_reason(), headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        return None

    async def slowed(self, answer: JSONResponse) -> JSONResponse:
        """A request refused for what it holds (nothing in it could be scored) is answered after
        the refusal delay, its memory already given back: a client that repeats it back to back
        is held to one request a delay on each connection, so it cannot keep the server busy. A
        request with anything scored, a busy answer (503) or a timeout (408) is never held."""
        if answer.status_code in DELAYED_REFUSALS and self.limits.refusal_delay_s > 0:
            await asyncio.sleep(self.limits.refusal_delay_s)
        return answer

    async def drain_body(self, request: Request) -> None:
        """Before an answer given without reading the body: read and drop it, so that a client
        still sending hears the answer instead of a reset."""
        await drain(request, DRAIN_FACTOR * self.limits.max_body_bytes, asyncio.get_running_loop().time() + self.limits.read_timeout_s)

    async def drained(self, request: Request, answer: JSONResponse) -> JSONResponse:
        """``answer``, once the body is drained."""
        await self.drain_body(request)
        return answer


async def server_state(request: Request) -> ServerState:
    """The app's :class:`ServerState` (a route dependency)."""
    return request.app.state.patchcore


def lower_priority() -> None:
    """This thread's CPU share after everything else's (Linux: niceness a thread at a time), so
    that the line's own images are decoded first when both want the cores."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LARGE_LANE_NICENESS)
    except (AttributeError, OSError):  # not Linux: the lane still bounds large work to one thread
        pass
