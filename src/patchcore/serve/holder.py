"""The model the server holds: loaded (``scoring.load_model``, whichever engine the file needs),
warmed up, described for clients, and reloaded in place, the old model serving on if the new
file fails.

The server treats every model alike through :class:`patchcore.scoring.ScoringModel`: no code
here or in the routes asks which engine runs it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import numpy as np

from .. import __version__
from ..contamination import ContaminationCheck
from ..data import LoadedImage, file_sha256 as digest_of_file, prepare_image
from ..errors import BadInputError, ModelFileError, WeightsError
from ..scoring import ScoringModel, load_model

if TYPE_CHECKING:
    from ..prediction import Prediction

#: the errors a load or reload reports to its caller (and the old model keeps serving)
LOAD_ERRORS = (ModelFileError, WeightsError, BadInputError, OSError, ValueError, RuntimeError)


@dataclass
class ServedModel:
    """A loaded, warmed-up model and what clients are told about it."""

    model: ScoringModel
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


def warm_up(model: ScoringModel) -> None:
    """Score one blank image, so that the first request is not slow."""
    side = model.layout_.image_size
    blank = prepare_image("warm-up", np.full((side, side, 3), 128, dtype=np.uint8), model.layout_)
    for prediction in model.predict_loaded([blank]):
        prediction.to_record()


def describe(model: ScoringModel, path: Path, sha256: str, loaded_at: str) -> dict[str, Any]:
    """What clients are told about a served model: the server's own fields, the model's
    metadata (the same keys for every engine) and its thresholds."""
    calibration = model.calibration_
    return {
        "package_version": __version__,
        "model_file": path.name,  # its name, not where it lies: clients need not know the server's folders
        "file_sha256": sha256,
        "loaded_at": loaded_at,
        **model.metadata(),
        "image_threshold": calibration.image_threshold,
        "pixel_threshold": calibration.pixel_threshold,
        "image_good_mean": calibration.image_good_mean,
        "false_alarm_rate": calibration.false_alarm_rate,
        "decision_rule": calibration.describe(),
        "calibration_warning": calibration.warning,
        # the page re-cuts at any threshold and shows the rate that cut would give on good images
        "good_scores": [round(float(score), 6) for score in calibration.good_scores],
        "contamination": _set_aside(model.settings().get("contamination")),
    }


def _set_aside(check: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fit's contamination check for clients: its line and each suspect by file name (like
    the model file's, the server's folders are not theirs to know); None for a model without one."""
    if check is None:
        return None
    parsed = ContaminationCheck.from_dict(check)
    suspects = [{"name": Path(s.path).name, "score": s.score, "z": round(s.z, 2), "set_aside": s.set_aside, "reason": s.reason} for s in parsed.suspects]
    return {"setting": parsed.setting, "description": parsed.describe(), "num_set_aside": len(parsed.set_aside), "suspects": suspects}


def load_served_model(
    path: str | Path, device: str = "auto", batch_size: int = 8, sha256: str | None = None, max_image_pixels: int | None = None
) -> ServedModel:
    """Load a model file (``.safetensors``, or an exported ``.onnx`` / OpenVINO ``.xml``) and warm it up.

    Building a PyTorch model traces the backbone with torch.fx, which patches torch globally for
    a moment: the server runs this on its scoring thread, never beside a batch being scored.
    """
    path = Path(path)
    sha256 = sha256 or file_sha256(path)
    model = load_model(path, device=device, batch_size=batch_size, progress=False, max_image_pixels=max_image_pixels)
    warm_up(model)
    loaded_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return ServedModel(model, path, sha256, loaded_at, describe(model, path, sha256, loaded_at))


def score(items: list[tuple[ServedModel, LoadedImage]]) -> list[Prediction]:
    """Score decoded images, each by the model it was decoded for, so that a reload between
    upload and scoring cannot mismatch an image and a model (runs on the scoring thread)."""
    results: list[Prediction | None] = [None] * len(items)
    for served in {id(s): s for s, _ in items}.values():
        positions = [i for i, (s, _) in enumerate(items) if s is served]
        for position, prediction in zip(positions, served.model.predict_loaded([items[i][1] for i in positions])):
            results[position] = prediction
    return results


#: runs a load where no batch is being scored: ``MicroBatcher.run_exclusive``
RunExclusive = Callable[..., Awaitable[ServedModel]]


class ModelHolder:
    """The model being served, or why there is none yet; reloads one at a time."""

    def __init__(self, path: str | Path, device: str = "auto", batch_size: int = 8, max_image_pixels: int | None = None) -> None:
        self.path = Path(path)
        self.device, self.batch_size, self.max_image_pixels = device, batch_size, max_image_pixels
        self.served: ServedModel | None = None
        self.load_error: str | None = None
        self._lock = asyncio.Lock()

    def public(self, message: str) -> str:
        """A load error as clients see it: the model file by name, not by its place on disk."""
        return message.replace(str(self.path), self.path.name)

    def not_ready_reason(self) -> str:
        return f"model failed to load: {self.public(self.load_error)}" if self.load_error else "model is loading"

    async def reload(self, run_exclusive: RunExclusive, pool: Executor) -> tuple[bool, str]:
        """Load the file again: ``(True, message)``, or ``(False, why)`` with the model there is
        (if any) still serving. ``run_exclusive`` runs the load away from any scoring; ``pool``
        reads the file's checksum first, so that a missing file fails with scoring undisturbed."""
        async with self._lock:
            try:
                sha256 = await asyncio.get_running_loop().run_in_executor(pool, file_sha256, self.path)
                served = await run_exclusive(load_served_model, self.path, self.device, self.batch_size, sha256, self.max_image_pixels)
            except LOAD_ERRORS as error:
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                if self.served is None:
                    self.load_error = message
                    return False, message
                return False, f"{message}; still serving the model loaded at {self.served.loaded_at} (sha256 {self.served.sha256[:12]})"
            self.served, self.load_error = served, None
            return True, f"loaded {self.path.name} (sha256 {served.sha256[:12]})"
