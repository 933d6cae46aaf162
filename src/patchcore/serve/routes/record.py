"""The inspection record over HTTP: the history of decisions (filtered, paged), one decision
with its kept image and reviews, reviewing one, and the drift watch. Reading and reviewing
need an API key where keys are configured; the reviewer is then the key's name.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ...errors import BadInputError
from ...intake import ImageHeader, read_header, read_image_bytes
from ...record.store import parse_time
from ...render import shrink
from ..access import require_api_key
from ..budget import PICTURE_BYTES_PER_PIXEL, PICTURE_MAX_SIDE, BudgetBusyError, NeverFitsError, Reservation, picture_hw
from ..requests import RequestError, read_body
from ..state import RETRY_AFTER_SECONDS, ServerState, error_response, server_state
from ..uploads import data_url

#: most decisions one page of the history holds
MAX_PAGE = 500
#: most bytes of a review's body
MAX_REVIEW_BYTES = 16 * 1024

router = APIRouter()


def record_of(state: ServerState, requested: str) -> JSONResponse | None:
    """404 for another model's name, 404 when the record is off, else None."""
    if (refusal := state.unknown_name(requested)) is not None:
        return refusal
    if state.record is None:
        return error_response(404, "this server keeps no record (started with --record off)")
    if state.record.recorder.store is None:
        return error_response(503, "the record's database does not answer; decisions are spooled until it does", headers={"Retry-After": "5"})
    return None


@router.get("/v2/models/{requested}/decisions", dependencies=[Depends(require_api_key)])
async def list_decisions(
    requested: str, since: str | None = None, until: str | None = None, decision: str | None = None, station: str | None = None,
    part: str | None = None, reviewed: str | None = None, limit: int = 50, offset: int = 0, state: ServerState = Depends(server_state),
) -> JSONResponse:
    """This model's decisions, newest first, filtered and paged."""
    if (refusal := record_of(state, requested)) is not None:
        return refusal
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        return error_response(422, f"limit must be 1 to {MAX_PAGE} and offset at least 0")
    try:
        filters = dict(
            model_name=state.model_name, decision=decision, station=station, part=part, reviewed=reviewed,
            since=parse_time(since, "since") if since else None, until=parse_time(until, "until") if until else None,
        )
        rows, total = await asyncio.get_running_loop().run_in_executor(
            state.pool, lambda: state.record.recorder.store.decisions(limit=limit, offset=offset, **filters)
        )
    except BadInputError as error:
        return error_response(422, str(error))
    return JSONResponse({"decisions": rows, "total": total, "limit": limit, "offset": offset})


@router.get("/v2/models/{requested}/decisions/{decision_id}", dependencies=[Depends(require_api_key)])
async def one_decision(requested: str, decision_id: str, state: ServerState = Depends(server_state)) -> JSONResponse:
    """One decision of this model, its reviews, and its kept image's picture (or null)."""
    if (refusal := record_of(state, requested)) is not None:
        return refusal
    loop = asyncio.get_running_loop()
    found = await loop.run_in_executor(state.pool, decision_and_kept_file, state, decision_id)
    if found is None:
        return error_response(404, f"no decision '{decision_id[:40]}' of model '{state.model_name}'")
    row, kept, header = found
    row["picture"] = None
    if header is not None:
        # Decoding a kept image for its picture is paid from the memory budget, like scoring one:
        # many readers of a large kept image at once wait or are refused, never exhaust memory.
        reservation = Reservation()
        try:
            picture = math.prod(picture_hw((header.height, header.width))) * PICTURE_BYTES_PER_PIXEL
            await state.budget.grow(reservation, kept.stat().st_size + header.decode_bytes + picture)
            row["picture"], row["picture_scale"] = await loop.run_in_executor(state.pool, kept_picture, kept, state.limits.max_image_pixels)
        except BudgetBusyError:
            return error_response(503, "the server is busy with other requests (its memory budget is in use); retry shortly", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        except NeverFitsError:
            row["picture_error"] = "the kept image is too large to show within one request's memory (--max-request-memory-mb)"
        except (BadInputError, OSError) as error:
            row["picture_error"] = str(error)
        finally:
            state.budget.release(reservation)
    return JSONResponse(row)


def decision_and_kept_file(state: ServerState, decision_id: str) -> tuple[dict[str, Any], Path | None, ImageHeader | None] | None:
    """The decision (None if it is not this model's), its kept file and that file's header."""
    recorder = state.record.recorder
    row = recorder.store.decision(decision_id)
    if row is None or row["model_name"] != state.model_name:
        return None
    path = recorder.images.find(row["image_sha256"]) if row["image_kept"] and recorder.images is not None else None
    try:
        header = read_header(path, path.name, state.limits.max_image_pixels) if path is not None else None
    except (BadInputError, OSError):
        path = header = None
    return row, path, header


def kept_picture(path: Path, max_pixels: int) -> tuple[str, float]:
    """A kept file (it came from the network: decoded by the intake, under the pixel limit) as a
    JPEG data URL of at most PICTURE_MAX_SIDE px, and the scale it was shrunk by."""
    rgb = read_image_bytes(path.read_bytes(), path.name, max_pixels)
    return data_url(shrink(rgb, PICTURE_MAX_SIDE), "jpeg"), min(1.0, PICTURE_MAX_SIDE / max(rgb.shape[:2]))


@router.post("/v2/models/{requested}/decisions/{decision_id}/review", status_code=201)
async def review_decision(requested: str, decision_id: str, request: Request, client: str | None = Depends(require_api_key), state: ServerState = Depends(server_state)) -> JSONResponse:
    """Mark a decision a false alarm or a confirmed defect (JSON: verdict, note, reviewer).
    Reviews are appended: a later one supersedes, none is erased."""
    if (refusal := record_of(state, requested)) is not None:
        return refusal
    try:
        body = await read_body(request, MAX_REVIEW_BYTES, state.limits.read_timeout_s, f"{MAX_REVIEW_BYTES // 1024} KB")
    except RequestError as error:
        return error_response(error.status, error.message)
    try:
        values = json.loads(body or b"{}")
        if not isinstance(values, dict):
            raise ValueError
    except ValueError:
        return error_response(422, 'a review is a JSON object: {"verdict": "false_alarm" or "confirmed_defect", "note": "...", "reviewer": "name"}')
    reviewer = client if client is not None else values.get("reviewer", "")
    store = state.record.recorder.store

    def append() -> dict[str, Any] | None:
        row = store.decision(decision_id)
        if row is None or row["model_name"] != state.model_name:
            return None
        return store.add_review(decision_id, values.get("verdict", ""), reviewer, values.get("note", ""))

    try:
        review = await asyncio.get_running_loop().run_in_executor(state.pool, append)
    except BadInputError as error:
        return error_response(422, str(error))
    if review is None:
        return error_response(404, f"no decision '{decision_id[:40]}' of model '{state.model_name}'")
    return JSONResponse(review, status_code=201)


@router.get("/v2/models/{requested}/drift", dependencies=[Depends(require_api_key)])
async def drift(requested: str, state: ServerState = Depends(server_state)) -> JSONResponse:
    """The drift watch of the model being served, per station."""
    if (refusal := state.unknown_name(requested)) is not None:
        return refusal
    if state.record is None:
        return JSONResponse({"alarm": False, "stations": {}, "record": False})
    return JSONResponse({**state.record.drift(), "record": True})
