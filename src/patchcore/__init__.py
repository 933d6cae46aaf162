"""patchcore: find and outline defects in product images after learning only from good ones.

An implementation of PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly
Detection", CVPR 2022). The public face::

    from patchcore import PatchCore, load_model
    model = PatchCore("mobilenet_v2").fit(good_image_paths)
    predictions = model.predict(new_image_paths)
    model = load_model("bottle.onnx")   # a .safetensors model, or an exported one: the same interface

The names that need PyTorch are imported on first use, so that ``patchcore.runtime`` (scoring
an exported model) works where PyTorch is not installed.
"""

from typing import Any

__version__ = "0.1.0"

from .errors import BadInputError, ModelFileError, WeightsError  # noqa: E402

_LAZY = {
    "PatchCore": ("model", "PatchCore"),
    "ExportedModel": ("runtime", "ExportedModel"),
    "Prediction": ("prediction", "Prediction"),
    "ScoringModel": ("scoring", "ScoringModel"),
    "load_model": ("scoring", "load_model"),
    "load": ("model", "PatchCore"),
    "BACKBONES": ("backbones", "BACKBONES"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'patchcore' has no attribute {name!r}")
    from importlib import import_module

    module, attribute = _LAZY[name]
    value = getattr(import_module(f".{module}", __name__), attribute)
    return value.load if name == "load" else value


__all__ = ["PatchCore", "ExportedModel", "Prediction", "ScoringModel", "load_model", "load", "BACKBONES", "BadInputError", "ModelFileError", "WeightsError", "__version__"]
