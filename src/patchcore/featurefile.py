"""The training images' patch features on disk while a fit runs, so that its memory does not grow
with the number of images.

A fit needs every patch feature twice: the coreset selection reads all of them (through their
128-d projection, which stays in memory), and afterwards only the chosen rows (the memory bank)
and the rows of the images scored leave-one-out are read back. So the full-width features go to
one temporary file as they are extracted, in float16 when wide (as the coreset has always held
them) and float32 when no wider than the projection (so that the bank is the features
themselves), and are read back row by row with ``pread``: the file is never mapped, so it adds
nothing to the process's resident memory (the operating system caches what it can).

The file has no name (``O_TMPFILE`` on Linux): it vanishes when it is closed, when the fit fails
or is interrupted, and even when the process is killed. The space it needs is checked before the
first row is written.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import BadInputError

#: disk space left free beyond the file's own size, for the model file and everything else
SPARE_BYTES = 1 << 30


class DiskSpaceError(BadInputError):
    """The fit's temporary features would not fit on the disk; the message names the folder."""


def temporary_folder(folder: str | Path | None = None) -> Path:
    """The folder temporary features go to: ``folder``, else ``$TMPDIR`` or the system's default."""
    path = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    if not path.is_dir():
        raise BadInputError(f"'{path}': the folder for temporary features does not exist")
    return path


def check_space(folder: Path, needed: int) -> None:
    """Refuse, before writing, a file of ``needed`` bytes that would leave less than
    :data:`SPARE_BYTES` free in ``folder``."""
    free = shutil.disk_usage(folder).free
    if needed + SPARE_BYTES > free:
        raise DiskSpaceError(
            f"'{folder}': not enough disk space for the fit's temporary features: {needed / 1e9:.2f} GB needed, "
            f"{free / 1e9:.2f} GB free ({SPARE_BYTES / 1e9:.2f} GB kept spare); free some, or choose another folder with --temp-dir"
        )


class FeatureFile:
    """Rows of ``dims`` values of one dtype, appended in order and read back by row number."""

    def __init__(self, dims: int, dtype: np.dtype | type, expected_rows: int, folder: str | Path | None = None) -> None:
        self.folder = temporary_folder(folder)
        self.dims = dims
        self.dtype = np.dtype(dtype)
        self.row_bytes = dims * self.dtype.itemsize
        check_space(self.folder, expected_rows * self.row_bytes)
        self._file = tempfile.TemporaryFile(dir=self.folder)
        self.rows = 0

    @property
    def nbytes(self) -> int:
        """Bytes written so far: the disk space the file takes."""
        return self.rows * self.row_bytes

    def append(self, rows: np.ndarray) -> None:
        """Write (n, dims) rows after the ones written so far."""
        if rows.ndim != 2 or rows.shape[1] != self.dims:
            raise ValueError(f"expected rows of {self.dims} values, got shape {rows.shape}")
        try:
            self._file.write(np.ascontiguousarray(rows, dtype=self.dtype).data)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise DiskSpaceError(
                f"'{self.folder}': the disk filled up while writing the fit's temporary features ({self.nbytes / 1e9:.2f} GB written); "
                "free some, or choose another folder with --temp-dir"
            ) from None
        self.rows += len(rows)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop - 1`` as a new (stop - start, dims) array."""
        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"rows {start}:{stop} outside the {self.rows} written")
        self._file.flush()
        data = os.pread(self._file.fileno(), (stop - start) * self.row_bytes, start * self.row_bytes)
        return np.frombuffer(bytearray(data), dtype=self.dtype).reshape(stop - start, self.dims)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The rows at the given increasing row numbers, one read per run of consecutive rows."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= self.rows):
            raise IndexError(f"row numbers must increase and lie within the {self.rows} written")
        out = np.empty((len(rows), self.dims), dtype=self.dtype)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for first, last in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            out[first:last] = self.read(int(rows[first]), int(rows[last - 1]) + 1)
        return out

    def close(self) -> None:
        """Remove the file (closing it is enough: it has no name)."""
        self._file.close()

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
