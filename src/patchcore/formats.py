"""The versions of the files patchcore writes, and the one check every reader makes.

A model file (``.safetensors``, ``storage.py``) and an exported model (``.onnx``, OpenVINO's
``.xml`` with its ``.json``, ``export.py``) each carry their settings as JSON with a format
version. A reader takes its own version and older ones, and refuses a newer file with advice to
upgrade, rather than misreading it. Needs no PyTorch: the exported-model runtime checks here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import __version__
from .errors import ModelFileError

#: the model file (.safetensors); 2: input modes, leave-one-out calibration with its good scores (1 still loads)
MODEL_FORMAT_VERSION = 2
#: the settings of an exported model (.onnx, .xml + .json)
EXPORT_FORMAT_VERSION = 1
#: the metadata key holding the settings (JSON), in a .safetensors file and an ONNX model alike
METADATA_KEY = "patchcore"
#: suffixes of exported models (scored by ``runtime.ExportedModel``); any other file is a .safetensors model
EXPORTED_SUFFIXES = (".onnx", ".xml")


def is_exported(path: str | Path) -> bool:
    """Whether a model file is an exported one (by its suffix), rather than a ``.safetensors`` model."""
    return Path(path).suffix.lower() in EXPORTED_SUFFIXES


def check_format_version(path: str | Path, settings: dict[str, Any], key: str, newest: int, kind: str, writer: str) -> int:
    """The file's format version, read from ``settings[key]``; a damaged or newer file raises
    :class:`ModelFileError` naming the file, the version, who wrote it (``writer``) and what to do."""
    version = settings.get(key)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFileError(f"'{path}': damaged {kind} file (no {kind} format version)")
    if version > newest:
        raise ModelFileError(
            f"'{path}': written by {writer} in {kind} format {version}; "
            f"this patchcore ({__version__}) reads {kind} format {newest} and older: upgrade patchcore"
        )
    return version


def files_of(path: str | Path) -> list[Path]:
    """The files a model consists of, those that exist: the model file, and beside it an ONNX
    model's external weights (``NAME.onnx.data``) or an OpenVINO model's ``.bin`` and ``.json``
    (a copy of a model, as to Ray's actors, takes all of them)."""
    path = Path(path)
    files = [path]
    if path.suffix.lower() == ".onnx":
        files.append(path.with_name(path.name + ".data"))
    elif path.suffix.lower() == ".xml":
        files += [path.with_suffix(".bin"), path.with_suffix(".json")]
    return [file for file in files if file.is_file()]


def model_metadata(settings: dict[str, Any], layout: Any, engine: str, device: str, index: str, format_version: int, newest_format_version: int) -> dict[str, Any]:
    """What a server tells clients about a model, the same keys for every engine: how it runs
    (``engine``, ``device``, ``index``), what it was fitted as (from its ``settings``), its input
    layout (an ``InputLayout``) and the format of its file."""
    return {
        "engine": engine,
        "device": device,
        "index": index,
        "backbone": settings["backbone"],
        "layers": list(settings["layers"]),
        "input": {**layout.to_dict(), "description": layout.describe()},
        "memory_bank_shape": list(settings["memory_bank_shape"]),
        "num_fit_images": settings["num_fit_images"],
        "num_neighbors": settings["num_neighbors"],
        "format_version": format_version,
        "newest_format_version": newest_format_version,
    }
