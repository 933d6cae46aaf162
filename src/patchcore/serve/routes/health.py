"""Liveness, readiness, what the server is, and its metrics: open to any client it answers."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from ... import __version__
from ..metrics import METRICS_MEDIA_TYPE
from ..state import ServerState, server_state

router = APIRouter()


@router.get("/v2/health/live")
async def live() -> dict:
    """The process is up."""
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(state: ServerState = Depends(server_state)) -> JSONResponse:
    """The model is loaded and warmed up."""
    if state.holder.served is None:
        return JSONResponse({"ready": False, "reason": state.holder.not_ready_reason()}, status_code=503)
    return JSONResponse({"ready": True})


@router.get("/v2")
async def server_metadata(state: ServerState = Depends(server_state)) -> dict:
    return {
        "name": "patchcore", "version": __version__, "extensions": ["model_repository"], "models": [state.model_name],
        "api_key_required": bool(state.access.api_keys), "record": state.record is not None,
    }


@router.get("/metrics", include_in_schema=False)
async def prometheus(state: ServerState = Depends(server_state)) -> Response:
    return Response(state.metrics.text(), media_type=METRICS_MEDIA_TYPE)
