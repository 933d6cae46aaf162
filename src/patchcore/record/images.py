"""Kept images: the uploaded files themselves, in a content-addressed folder
(``FOLDER/ab/abcdef....png``, named by their SHA-256: an image sent twice is kept once), under a
size cap that drops the oldest images no one reviewed first, and never a reviewed one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: what may be kept: the images of every decision, only of flagged ones, or none
KEEP_POLICIES = ("none", "flagged", "all")
#: ``--keep-max-gb``'s default
DEFAULT_KEEP_MAX_GB = 10.0
#: the suffix of each format the intake reads (Pillow's names)
SUFFIXES = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}


class KeptImages:
    """The folder of kept images and its cap (bytes)."""

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)

    def path_of(self, sha256: str, suffix: str) -> Path:
        return self.folder / sha256[:2] / f"{sha256}.{suffix}"

    def find(self, sha256: str) -> Path | None:
        """The kept file of an image, or None."""
        if len(sha256) != 64 or not all(ch in "0123456789abcdef" for ch in sha256):
            return None  # a checksum from a request: never a path of its choosing
        found = sorted((self.folder / sha256[:2]).glob(f"{sha256}.*"))
        return found[0] if found else None

    def keep(self, data: bytes, sha256: str, suffix: str) -> Path:
        """Write the image (once: a file already there is the same bytes), atomically: a crash
        leaves the whole file or none."""
        path = self.path_of(sha256, suffix)
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".keep-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    def drop(self, sha256s: list[str]) -> None:
        for sha256 in sha256s:
            if (path := self.find(sha256)) is not None:
                path.unlink(missing_ok=True)

    def over_cap(self, kept: list[dict], reviewed: set[str]) -> list[str]:
        """Which images to drop to come under the cap: the oldest unreviewed first (``kept``
        is oldest first), never a reviewed one, even if the cap stays exceeded."""
        total = sum(row["nbytes"] for row in kept)
        dropped = []
        for row in kept:
            if total <= self.max_bytes:
                break
            if row["sha256"] in reviewed:
                continue
            dropped.append(row["sha256"])
            total -= row["nbytes"]
        return dropped
