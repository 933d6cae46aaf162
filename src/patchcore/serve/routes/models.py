"""The model: what it is, whether it is ready, and scoring images with it.

A predict request meets, in order: the name and readiness check, the body's size and time
(``requests.py``), the memory budget for the body, each image's header (``uploads.py``), the
budget for decoding, scoring and answering them (``budget.py``), the queue's room, the decoding,
the scoring thread (``batching.py``), and the records, one image at a time.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ...errors import BadInputError
from ...intake import accepted_formats_text
from ...record.writer import RecordUnavailableError
from ...render import picture_format as canonical_picture_format
from ..access import require_api_key
from ..batching import QueueFullError
from ..budget import PICTURE_MAX_SIDE, BudgetBusyError, NeverFitsError, Reservation, image_cost
from ..holder import ServedModel
from ..requests import RequestError, declared_length, read_body, uploads
from ..state import LARGE_LANE_BYTES, RETRY_AFTER_SECONDS, ServerState, error_response, server_state
from ..recording import digests
from ..uploads import REFUSAL_OUTCOMES, check_headers, decode_upload, record as record_of

#: a body's reservation: the body, and the copies of its files that parsing makes
BODY_COPIES = 2

router = APIRouter()


@router.get("/v2/models/{requested}", dependencies=[Depends(require_api_key)])
async def model_metadata(requested: str, state: ServerState = Depends(server_state)) -> JSONResponse:
    """What the model is: backbone, input, bank, thresholds, checksum; and the server's limits."""
    if (refusal := state.not_serving(requested)) is not None:
        return refusal
    served = state.holder.served
    return JSONResponse({
        "name": state.model_name,
        "versions": [served.sha256[:12]],
        "platform": f"patchcore-{served.metadata['engine']}",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1], "parameters": {"content": f"encoded image files ({accepted_formats_text()})"}}],
        "outputs": [
            {"name": "score", "datatype": "FP32", "shape": [-1]},
            {"name": "is_anomalous", "datatype": "BOOL", "shape": [-1]},
            {"name": "regions", "datatype": "JSON", "shape": [-1]},
        ],
        "patchcore": served.metadata,
        "server": {**state.limits.to_dict(), "model_format_version": served.metadata["newest_format_version"], "picture_max_side": PICTURE_MAX_SIDE},
    })


@router.get("/v2/models/{requested}/ready")
async def model_ready(requested: str, state: ServerState = Depends(server_state)) -> JSONResponse:
    if (refusal := state.not_serving(requested)) is not None:
        return refusal
    return JSONResponse({"name": state.model_name, "ready": True})


@router.post("/v2/models/{requested}/predict", dependencies=[Depends(require_api_key)])
async def predict(
    requested: str, request: Request, picture: bool = False, picture_format: str = "jpeg", filename: str = "image",
    station: str | None = None, part: str | None = None, state: ServerState = Depends(server_state),
) -> JSONResponse:
    """Images (multipart files, or one image as the raw body) -> one result each. With the
    record on, each result carries its ``decision_id``; ``station`` (default: the server's
    --station) and ``part`` (a serial number, a tray position) are kept with it."""
    started = time.perf_counter()
    reservation = Reservation()
    try:
        if (refusal := state.not_serving(requested)) is not None:
            return await state.drained(request, refusal)
        try:
            format_name = canonical_picture_format(picture_format)
            where = (state.record.station_of(station), state.record.part_of(part)) if state.record is not None else None
        except BadInputError as error:  # a ValueError too: first
            answer = await state.drained(request, error_response(422, str(error)))
        except ValueError:
            answer = await state.drained(request, error_response(422, f"picture_format must be jpeg (or jpg) or png, got {picture_format!r}"))
        else:
            answer = await _predict(state, request, reservation, state.holder.served, picture, format_name, filename, where, started)
    except RequestError as error:
        # after a 408 the rest of the body may still be on its way: the connection is not reused
        answer = error_response(error.status, error.message, headers={"Connection": "close"} if error.status == 408 else None)
    except NeverFitsError as error:
        state.metrics.refusals.labels("never_fits").inc()
        answer = error_response(413, (
            f"request needs {error.args[0] / 2**20:.0f} MB of memory to decode, score and answer, more than one request may hold "
            f"({state.budget.per_request / 2**20:.0f} MB, --max-request-memory-mb); send fewer or smaller images per request"
        ))
    except RecordUnavailableError as error:
        answer = error_response(503, f"scored, but the decision could not be recorded: {error}", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    except (BudgetBusyError, QueueFullError) as error:
        state.metrics.refusals.labels("busy").inc()
        text = str(error) if isinstance(error, QueueFullError) else "the server is busy with other requests (its memory budget is in use); retry shortly"
        answer = error_response(503, text, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    finally:
        state.budget.release(reservation)
        state.metrics.latency.observe(time.perf_counter() - started)
    return await state.slowed(answer)


async def _predict(
    state: ServerState, request: Request, reservation: Reservation, served: ServedModel, picture: bool, format_name: str, filename: str,
    where: tuple[str, str | None] | None, started: float,
) -> JSONResponse:
    loop = asyncio.get_running_loop()
    limits, budget, batcher, metrics = state.limits, state.budget, state.batcher, state.metrics
    limit_text = f"{limits.max_request_mb:g} MB (--max-request-mb)"
    declared = declared_length(request)
    if declared is not None and declared > limits.max_body_bytes:
        await read_body(request, limits.max_body_bytes, limits.read_timeout_s, limit_text)  # drains, then 413
    try:
        await budget.grow(reservation, BODY_COPIES * (declared if declared is not None else limits.max_body_bytes))
    except (BudgetBusyError, NeverFitsError):
        await state.drain_body(request)
        raise
    body = await read_body(request, limits.max_body_bytes, limits.read_timeout_s, limit_text)
    files = await uploads(request, body, filename)
    del body
    if len(files) > limits.max_queue:  # could never fit, however long the client waited
        raise RequestError(413, f"request has {len(files)} images, more than the queue holds ({limits.max_queue}, --max-queue); send fewer per request")
    # Each image's header, then the room to decode them all, then the decoding.
    record = state.record

    def headers_and_checksums() -> tuple[list, list[str] | None]:
        return check_headers(files, served, limits), (digests(files) if record is not None else None)

    headers, fingerprints = await loop.run_in_executor(state.pool, headers_and_checksums)  # one trip to the pool for them all
    await budget.grow(reservation, sum(image_cost(h, served.model.layout_, served.metadata["backbone"], picture) for h, _ in headers if h is not None))
    readable = sum(h is not None for h, _ in headers)
    batcher.check_room(readable)  # refuse before paying for the decoding
    lane = state.large_lane if reservation.nbytes > min(budget.small_limit, LARGE_LANE_BYTES) else state.pool
    loaded = await asyncio.gather(*(
        loop.run_in_executor(lane, decode_upload, name, data, served, picture, limits.max_image_pixels) if header is not None else _as_result(refusal)
        for (name, data), (header, refusal) in zip(files, headers)
    ))
    # the bytes stay only while an image may be kept (their memory is reserved for the whole request)
    kept_files = files if record is not None and record.recorder.images is not None else None
    files = None
    rows: list[dict] = []
    kept_rows: list[dict] = []
    waiting = iter(batcher.submit([(served, item) for item, status in loaded if item.error is None]))  # others may have filled it meanwhile
    results, statuses = [], []
    for item, status in loaded:
        if item.error is not None:
            metrics.images.labels(REFUSAL_OUTCOMES[status]).inc()
            results.append({"path": str(item.path), "error": item.error, "status": status})
            statuses.append(status)
            continue
        prediction = await next(waiting)
        item.rgb = item.array = None
        position = len(results)
        kept = kept_files is not None and record.recorder.wants_image(prediction.is_anomalous)
        keep = partial(record.recorder.keep_image, kept_files[position][1], fingerprints[position], headers[position][0].format) if kept else None
        # One image's full-size map at a time: the record is built and the map let go (and the
        # image kept, where it is to be, in the same trip to the thread).
        result, kept_row = await loop.run_in_executor(lane, answer_and_keep, prediction, picture, format_name, keep)
        results.append(result)
        del prediction
        if kept_row is not None:
            kept_rows.append(kept_row)
        if record is not None:
            row = record.row(result, served, where[0], where[1], fingerprints[position], str(item.path), 1000 * (time.perf_counter() - started), kept)
            results[-1]["decision_id"] = row["id"]
            rows.append(row)
        metrics.images.labels("scored").inc()
        metrics.anomalies.inc(int(results[-1]["is_anomalous"]))
        statuses.append(200)
    if record is not None:
        await record.commit(rows, kept_rows, served)  # the answer goes out once its decisions are on disk
        metrics.recorded.inc(len(rows))
    status = 200 if 200 in statuses else statuses[0]
    reply = {"model_name": state.model_name, "model_version": served.sha256[:12], "results": results}
    if status != 200:
        reply["error"] = results[0]["error"]
    return JSONResponse(reply, status_code=status)


def answer_and_keep(prediction, picture: bool, format_name: str, keep: Callable[[], dict] | None) -> tuple[dict, dict | None]:
    """A prediction's JSON record and, when its image is to be kept, the kept image's row."""
    return record_of(prediction, picture, format_name), (keep() if keep is not None else None)


async def _as_result(value: object) -> object:
    return value
