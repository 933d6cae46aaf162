"""Tests for patchcore.storage: the one-file safetensors model format, its atomic write and every
way a file can be refused on reading."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from patchcore import formats
from patchcore import __version__
from patchcore.formats import MODEL_FORMAT_VERSION as FORMAT_VERSION
from patchcore.storage import ModelFileError, read_model, tensors_sha256, write_model


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def sample_tensors() -> dict[str, torch.Tensor]:
    return {
        "memory_bank": torch.arange(24, dtype=torch.float32).reshape(6, 4) / 7,
        "backbone.conv1.weight": torch.linspace(-1, 1, 27).reshape(1, 3, 3, 3),
        "backbone.bn1.num_batches_tracked": torch.tensor(5, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
    }


SETTINGS = {
    "package_version": "0.1.0",
    "backbone": "resnet18",
    "layers": ["layer2", "layer3"],
    "image_size": 256,
    "center_crop": None,
    "calibration": {"image_threshold": 1.25, "pixel_threshold": 0.5},
}


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


# ---------------------------------------------------------------------------
# Round trip and the write itself
# ---------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    tensors = sample_tensors()
    written = write_model(tmp_path / "model.safetensors", tensors, SETTINGS)
    assert written == tmp_path / "model.safetensors"
    got_tensors, got_settings = read_model(written)
    assert_same_tensors(got_tensors, tensors)
    assert got_settings["format_version"] == FORMAT_VERSION == 2
    assert got_settings["tensors_sha256"] == tensors_sha256(tensors)
    assert {k: v for k, v in got_settings.items() if k not in ("format_version", "tensors_sha256")} == SETTINGS


def test_round_trip_non_contiguous_and_string_path(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"t": base.T}  # not contiguous
    path = str(tmp_path / "nested" / "dir" / "m.safetensors")  # parents are created
    write_model(path, tensors, {})
    got, settings = read_model(path)
    assert torch.equal(got["t"], base.T)
    assert set(settings) == {"format_version", "tensors_sha256"}


def test_tensors_sha256_depends_on_names_shapes_dtypes_and_values() -> None:
    a = torch.arange(6, dtype=torch.float32)
    reference = tensors_sha256({"a": a})
    assert re.fullmatch(r"[0-9a-f]{64}", reference)
    assert tensors_sha256({"a": a.clone()}) == reference
    assert tensors_sha256({"b": a}) != reference
    assert tensors_sha256({"a": a.reshape(2, 3)}) != reference
    assert tensors_sha256({"a": a.to(torch.int32)}) != reference
    changed = a.clone()
    changed[5] = 5.5
    assert tensors_sha256({"a": changed}) != reference
    # Order of the dict does not matter: names are sorted.
    assert tensors_sha256({"x": a, "y": a * 2}) == tensors_sha256({"y": a * 2, "x": a})


def test_metadata_layout(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = write_model(tmp_path / "m.safetensors", sample_tensors(), {"seed": 42})
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert list(metadata) == ["patchcore"]
    header = json.loads(metadata["patchcore"])
    assert header == {"format_version": 2, "seed": 42, "tensors_sha256": tensors_sha256(sample_tensors())}


def test_atomic_write_overwrites_and_leaves_no_partial_files(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_model(path, {"old": torch.zeros(3)}, {"generation": 1})
    write_model(path, {"new": torch.ones(2, 2)}, {"generation": 2})
    tensors, settings = read_model(path)
    assert list(tensors) == ["new"]
    assert torch.equal(tensors["new"], torch.ones(2, 2))
    assert settings["generation"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert list(tmp_path.glob("*.partial")) == []
    assert list(tmp_path.glob(".*")) == []


def test_overwrite_replaces_the_file_instead_of_writing_into_it(tmp_path: Path) -> None:
    # A reader that opened the old file keeps seeing it whole: the new file is renamed over it.
    path = write_model(tmp_path / "m.safetensors", {"old": torch.zeros(100)}, {"generation": 1})
    before = path.read_bytes()
    with open(path, "rb") as reader:
        write_model(path, {"new": torch.ones(50)}, {"generation": 2})
        assert reader.read() == before
    assert read_model(path)[1]["generation"] == 2


def test_failed_write_keeps_old_file_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_model(path, {"old": torch.zeros(3)}, {"generation": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError, match=exact("Object of type set is not JSON serializable")):
        write_model(path, {"new": torch.ones(2)}, {"bad": {1, 2}})  # settings that are not JSON
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_file_mode_follows_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        path = write_model(tmp_path / "m.safetensors", {"a": torch.zeros(1)}, {})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    if umask == 0o022:
        assert path.stat().st_mode & stat.S_IRGRP and path.stat().st_mode & stat.S_IROTH


def test_write_to_folder_refused(tmp_path: Path) -> None:
    message = f"'{tmp_path}': is a folder; give a file name such as model.safetensors"
    with pytest.raises(ModelFileError, match=exact(message)):
        write_model(tmp_path, {"a": torch.zeros(1)}, {})


# ---------------------------------------------------------------------------
# Files refused on reading
# ---------------------------------------------------------------------------


def test_read_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "none.safetensors"
    with pytest.raises(ModelFileError, match=exact(f"'{path}': no such model file")):
        read_model(path)


def test_read_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=exact(f"'{tmp_path}': is a folder, not a model file")):
        read_model(tmp_path)


def test_read_truncated_file(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.safetensors", sample_tensors(), SETTINGS)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    prefix = f"'{path}': not a model file, or damaged or truncated ("
    with pytest.raises(ModelFileError, match="^" + re.escape(prefix) + r".+\)$"):
        read_model(path)


def test_read_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "random.safetensors"
    path.write_bytes(np.random.default_rng(7).integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    prefix = f"'{path}': not a model file, or damaged or truncated ("
    with pytest.raises(ModelFileError, match="^" + re.escape(prefix) + r".+\)$"):
        read_model(path)


def test_read_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ModelFileError, match="^" + re.escape(f"'{path}': not a model file, or damaged or truncated (")):
        read_model(path)


def test_read_plain_safetensors_is_not_a_patchcore_model(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    message = f"'{path}': not a patchcore model (a safetensors file without patchcore settings)"
    with pytest.raises(ModelFileError, match=exact(message)):
        read_model(path)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.ones(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=exact(message.replace(str(path), str(other)))):
        read_model(other)


def test_read_newer_format_asks_for_upgrade(tmp_path: Path) -> None:
    tensors = {"memory_bank": torch.ones(3, 2)}
    header = {"format_version": 999, "package_version": "9.9", "tensors_sha256": tensors_sha256(tensors)}
    path = tmp_path / "future.safetensors"
    save_file(tensors, str(path), metadata={"patchcore": json.dumps(header)})
    message = (
        f"'{path}': written by patchcore 9.9 in model format 999; "
        f"this patchcore ({__version__}) reads model format {FORMAT_VERSION} and older: upgrade patchcore"
    )
    with pytest.raises(ModelFileError, match=exact(message)):
        read_model(path)


def test_read_older_format_version_is_accepted(tmp_path: Path) -> None:
    tensors = {"memory_bank": torch.ones(3, 2)}
    header = {"format_version": 0, "tensors_sha256": tensors_sha256(tensors)}
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path), metadata={"patchcore": json.dumps(header)})
    got, settings = read_model(path)
    assert torch.equal(got["memory_bank"], torch.ones(3, 2))
    assert settings["format_version"] == 0


def test_read_missing_format_version(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(1)}
    path = tmp_path / "nover.safetensors"
    save_file(tensors, str(path), metadata={"patchcore": json.dumps({"tensors_sha256": tensors_sha256(tensors)})})
    with pytest.raises(ModelFileError, match=exact(f"'{path}': damaged model file (no model format version)")):
        read_model(path)


def test_read_altered_tensor_bytes(tmp_path: Path) -> None:
    tensors = {"memory_bank": torch.arange(64, dtype=torch.float32).reshape(16, 4)}
    path = write_model(tmp_path / "m.safetensors", tensors, SETTINGS)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last float of the tensor data (the data section ends the file)
    path.write_bytes(bytes(data))
    message = f"'{path}': damaged model file (its tensors do not match the stored checksum)"
    with pytest.raises(ModelFileError, match=exact(message)):
        read_model(path)


def test_read_missing_checksum(tmp_path: Path) -> None:
    path = tmp_path / "nosum.safetensors"
    save_file({"a": torch.ones(2)}, str(path), metadata={"patchcore": json.dumps({"format_version": 1})})
    message = f"'{path}': damaged model file (its tensors do not match the stored checksum)"
    with pytest.raises(ModelFileError, match=exact(message)):
        read_model(path)


def test_read_settings_not_json(tmp_path: Path) -> None:
    path = tmp_path / "badjson.safetensors"
    save_file({"a": torch.ones(2)}, str(path), metadata={"patchcore": "{not json"})
    prefix = f"'{path}': damaged model file (settings are not valid JSON: Expecting property name enclosed in double quotes"
    with pytest.raises(ModelFileError, match="^" + re.escape(prefix) + r".*\)$"):
        read_model(path)


def test_read_settings_json_but_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.safetensors"
    save_file({"a": torch.ones(2)}, str(path), metadata={"patchcore": "[1, 2]"})
    with pytest.raises(ModelFileError, match="^" + re.escape(f"'{path}': damaged model file (settings are not a JSON object)") + "$"):
        read_model(path)


def test_model_file_error_is_value_error() -> None:
    assert issubclass(ModelFileError, ValueError)
    assert formats.METADATA_KEY == "patchcore"


def test_a_setting_cannot_replace_the_format_version(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.safetensors", {"a": torch.ones(2)}, {"format_version": 7, "tensors_sha256": "x"})
    _, settings = read_model(path)
    assert settings["format_version"] == FORMAT_VERSION


def test_loaded_tensors_survive_the_file_being_overwritten_in_place(tmp_path: Path) -> None:
    """A server keeps its model while the file is replaced by ``cp`` (same inode, truncated first).
    Run in a child process: tensors still backed by the file's memory map die there of SIGBUS."""
    import subprocess
    import sys

    path = write_model(tmp_path / "m.safetensors", {"memory_bank": torch.arange(300_000, dtype=torch.float32)}, {"backbone": "x"})
    script = (
        "import sys; from patchcore.storage import read_model\n"
        "tensors, _ = read_model(sys.argv[1])\n"
        "open(sys.argv[1], 'wb').write(b'overwritten')\n"
        "print(float(tensors['memory_bank'].double().sum()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    assert float(done.stdout) == float(torch.arange(300_000, dtype=torch.float64).sum())
