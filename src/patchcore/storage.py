"""The model file: one ``.safetensors`` file, no pickle.

Tensors (the memory bank and the cut-down backbone's weights, so that a model runs with no
weights download) are stored by safetensors; the settings are JSON in the file's metadata under
``"patchcore"``, with a format version and a SHA-256 of the tensors so that damage is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelFileError
from .formats import METADATA_KEY, MODEL_FORMAT_VERSION, check_format_version


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of names, shapes, dtypes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_model(path: str | Path, tensors: dict[str, torch.Tensor], settings: dict[str, Any]) -> Path:
    """Write atomically: a crash mid-way leaves any earlier file at ``path`` untouched."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"'{path}': is a folder; give a file name such as model.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    # Written last, so that no setting can pass for the format version or checksum.
    header = {**settings, "format_version": MODEL_FORMAT_VERSION, "tensors_sha256": tensors_sha256(tensors)}
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={METADATA_KEY: json.dumps(header)})
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; a model file is not
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_model(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and check a model file: (tensors, settings)."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"'{path}': is a folder, not a model file")
    if not path.is_file():
        raise ModelFileError(f"'{path}': no such model file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if METADATA_KEY not in metadata:
                raise ModelFileError(f"'{path}': not a patchcore model (a safetensors file without patchcore settings)")
            settings = json.loads(metadata[METADATA_KEY])
            # Copied out of the file's memory map: a tensor left backed by the file would crash the
            # process (SIGBUS) if the file were later overwritten in place, e.g. by cp, under a server.
            tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}
    except ModelFileError:
        raise
    except json.JSONDecodeError as error:
        raise ModelFileError(f"'{path}': damaged model file (settings are not valid JSON: {error})") from None
    except Exception as error:  # safetensors reports truncation and bad headers as several types
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelFileError(f"'{path}': not a model file, or damaged or truncated ({cause})") from None
    if not isinstance(settings, dict):
        raise ModelFileError(f"'{path}': damaged model file (settings are not a JSON object)")
    check_format_version(path, settings, "format_version", MODEL_FORMAT_VERSION, "model", f"patchcore {settings.get('package_version', '?')}")
    if tensors_sha256(tensors) != settings.get("tensors_sha256"):
        raise ModelFileError(f"'{path}': damaged model file (its tensors do not match the stored checksum)")
    return tensors, settings
