"""The fit's temporary feature file: rows back exactly, no name on disk, space checked first."""

import os
import shutil

import numpy as np
import pytest

from patchcore.featurefile import SPARE_BYTES, DiskSpaceError, FeatureFile, check_space


def test_rows_come_back_exactly_in_both_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    for dtype in (np.float16, np.float32):
        rows = rng.normal(size=(1000, 24)).astype(dtype)
        with FeatureFile(24, dtype, 1000, tmp_path) as file:
            for block in np.array_split(rows, 7):
                file.append(block)
            assert file.rows == 1000 and file.nbytes == rows.nbytes
            assert np.array_equal(file.read(0, 1000), rows)
            assert np.array_equal(file.read(333, 334), rows[333:334])
            assert file.read(5, 5).shape == (0, 24)
            picked = np.array([0, 1, 2, 4, 10, 11, 500, 998, 999])  # runs, and gaps of 2 and more
            gathered = file.gather(picked)
            assert gathered.dtype == dtype and np.array_equal(gathered, rows[picked])


def _open_files_in(folder) -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the listing's own descriptor, closed by now
            pass
    return [link for link in links if link.startswith(str(folder))]


def test_the_file_has_no_name_and_its_space_is_freed_on_close(tmp_path):
    file = FeatureFile(128, np.float32, 10_000, tmp_path)
    file.append(np.ones((10_000, 128), np.float32))
    assert list(tmp_path.iterdir()) == []  # nothing to leave behind, whatever ends the process
    assert len(_open_files_in(tmp_path)) == 1  # but it is there, in the folder asked for
    assert os.fstat(file._file.fileno()).st_size == 10_000 * 128 * 4
    file.close()
    assert _open_files_in(tmp_path) == []


def test_bad_rows_and_row_numbers_are_refused(tmp_path):
    with FeatureFile(4, np.float32, 10, tmp_path) as file:
        file.append(np.zeros((10, 4), np.float32))
        with pytest.raises(ValueError, match=r"expected rows of 4 values, got shape \(2, 3\)"):
            file.append(np.zeros((2, 3), np.float32))
        with pytest.raises(IndexError, match="rows 5:11 outside the 10 written"):
            file.read(5, 11)
        with pytest.raises(IndexError, match="row numbers must increase and lie within the 10 written"):
            file.gather(np.array([3, 3]))
        with pytest.raises(IndexError, match="row numbers must increase"):
            file.gather(np.array([2, 10]))


def test_space_is_checked_before_anything_is_written(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    check_space(tmp_path, free - SPARE_BYTES - (1 << 20))  # fits, with the spare kept
    needed = free - SPARE_BYTES + (1 << 30)
    with pytest.raises(DiskSpaceError) as raised:
        FeatureFile(1024, np.float32, needed // 4096 + 1, tmp_path)
    message = str(raised.value)
    assert message.startswith(f"'{tmp_path}': not enough disk space for the fit's temporary features: ")
    assert message.endswith("free some, or choose another folder with --temp-dir") and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"'{tmp_path / 'nope'}': the folder for temporary features does not exist"):
        FeatureFile(4, np.float32, 1, tmp_path / "nope")
