"""The model repository: reload the model file (admin token); a bad file leaves the old model serving."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from ..access import require_admin
from ..state import ServerState, error_response, server_state

router = APIRouter()


@router.post("/v2/repository/models/{requested}/load", dependencies=[Depends(require_admin)])
async def load(requested: str, state: ServerState = Depends(server_state)) -> JSONResponse:
    if (refusal := state.unknown_name(requested)) is not None:
        return refusal
    loaded, message = await state.reload()
    if not loaded:
        return error_response(422, f"reload failed: {message}")
    return JSONResponse({"name": state.model_name, "loaded": True, "message": message, "patchcore": state.holder.served.metadata})
