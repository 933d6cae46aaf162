"""Small helpers the unit tests share: image files written on the spot, exact error patterns."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image


def exact(message: str) -> str:
    """A pattern that matches exactly ``message`` (pytest.raises uses re.search)."""
    return "^" + re.escape(message) + "$"


def save_gray(path: Path, value: int, size_hw: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size_hw, value, dtype=np.uint8)).save(path)
    return path


def save_rgb(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path
