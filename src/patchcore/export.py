"""Export a fitted PatchCore to one ONNX graph (and to OpenVINO from it): images in, image scores
and anomaly maps out, computed as the library computes them.

    normalised images (B, 3, H, W)
      -> backbone taps, 3x3 average, upsample, join          (features.py)
      -> nearest bank entry per patch: |q|^2 - 2 q.b + |b|^2, its minimum taken block by block
         over the bank, so that memory is bounded by (patches x block), never patches x bank x D;
         the distance to the entry found is then taken directly as ||q - b||  (search.py)
      -> eq. 7, N_b(m*) found by one more search of the bank for each image's m*  (search.py)
      -> the map: one matrix per axis, upsample and blur together  (maps.py)

The thresholds, the normalisation, the input settings and the versions are not in the graph:
they go in the model's metadata (ONNX ``metadata_props``; a JSON file beside an OpenVINO IR), so
that a cut can change without a new export. Only the batch size is dynamic: the square and
aspect-free inputs have one size, fixed at fit.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .maps import BLUR_SIGMA, map_matrix
from .model import PatchCore
from .runtime import EXPORT_FORMAT_VERSION, METADATA_KEY, OPENVINO_COMPILE_CONFIG

#: distances computed at once per image, per bank block: bounds the graph's working memory
BLOCK_ELEMENTS_PER_IMAGE = 1 << 22
#: a single protobuf holds at most 2 GB; larger graphs keep their weights in a file beside
PROTOBUF_LIMIT_BYTES = 2**31 - 1
EXPORT_FORMATS = ("onnx", "openvino")


class ScoringGraph(nn.Module):
    """What is exported: (B, 3, H, W) normalised images -> (scores (B,), maps (B, H, W))."""

    def __init__(self, model: PatchCore) -> None:
        super().__init__()
        self.features = copy.deepcopy(model.patch_features_).cpu()  # the model itself stays where it is
        self.input_hw = model.layout_.input_hw((model.layout_.image_size, model.layout_.image_size))
        grid = self.features.grid_hw(self.input_hw)
        bank = model.memory_bank_.detach().float().cpu()
        self.register_buffer("bank", bank)
        self.register_buffer("bank_squared_norms", bank.square().sum(dim=1))
        self.num_neighbors = min(model.num_neighbors, bank.shape[0])
        self.register_buffer("map_rows", map_matrix(grid[0], self.input_hw[0], BLUR_SIGMA))
        self.register_buffer("map_cols", map_matrix(grid[1], self.input_hw[1], BLUR_SIGMA))
        self.block = max(256, BLOCK_ELEMENTS_PER_IMAGE // (grid[0] * grid[1]))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features._patches(images)  # (B, h, w, D)
        size, height, width, dims = features.shape
        queries = features.reshape(-1, dims)
        nearest = self._nearest(queries)
        patch_scores = torch.linalg.vector_norm(queries - self.bank[nearest], dim=1).reshape(size, height * width)
        top_scores, worst = patch_scores.max(dim=1)
        scores = top_scores
        if self.num_neighbors > 1:  # eq. 7
            nearest_of_worst = torch.gather(nearest.reshape(size, height * width), 1, worst[:, None])[:, 0]
            worst_features = torch.gather(features.reshape(size, height * width, dims), 1, worst[:, None, None].expand(size, 1, dims))
            neighbours = self.bank[self._neighbourhoods(self.bank[nearest_of_worst])]  # (B, k, D)
            distances = torch.linalg.vector_norm(neighbours - worst_features, dim=2)
            weights = 1.0 - torch.exp(top_scores - torch.logsumexp(distances, dim=1))
            scores = weights * top_scores
        maps = self.map_rows @ patch_scores.reshape(size, height, width) @ self.map_cols.T
        return scores, maps

    def _neighbourhoods(self, centres: torch.Tensor) -> torch.Tensor:
        """N_b(m*): the ``num_neighbors`` bank entries nearest to each of the B entries m* (itself
        included), one search of B rows, so that no table of every entry's neighbours is needed."""
        squared = centres.square().sum(dim=1, keepdim=True) - 2.0 * centres @ self.bank.T + self.bank_squared_norms
        return torch.topk(squared, self.num_neighbors, dim=1, largest=False).indices

    def _nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """Index of each query's nearest bank entry; the bank is scanned in blocks, the running
        minimum kept (an earlier block wins ties, as a full scan would)."""
        query_norms = queries.square().sum(dim=1, keepdim=True)
        best_value = best_index = None
        for start in range(0, self.bank.shape[0], self.block):
            stop = min(start + self.block, self.bank.shape[0])
            squared = query_norms - 2.0 * queries @ self.bank[start:stop].T + self.bank_squared_norms[start:stop]
            value, index = squared.min(dim=1)
            index = index + start
            if best_value is None:
                best_value, best_index = value, index
            else:
                better = value < best_value
                best_value = torch.where(better, value, best_value)
                best_index = torch.where(better, index, best_index)
        return best_index


def export_settings(model: PatchCore) -> dict[str, Any]:
    """What the graph does not hold: the model's settings and calibration, and the versions."""
    return {**model.settings(), "export_format_version": EXPORT_FORMAT_VERSION, "exported_by": f"patchcore {__version__}"}


def export_onnx(model: PatchCore, path: str | Path) -> Path:
    """Write ``model`` as one ONNX graph with its settings in ``metadata_props``, replacing any file
    at ``path`` atomically. A graph over 2 GB keeps its weights in ``path`` + ``.data`` beside it."""
    import onnx

    if model.layout_.mode != "square":
        raise ValueError(f"export supports the square input mode only for now; this model uses {model.layout_.mode!r}")
    path = Path(path)
    graph = ScoringGraph(model).eval()
    example = torch.zeros(2, 3, *graph.input_hw)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        program = torch.onnx.export(
            graph, (example,), dynamo=True, input_names=["images"], output_names=["scores", "maps"],
            dynamic_shapes={"images": {0: batch}}, external_data=False, optimize=True, verbose=False,
        )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(export_settings(model))})
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        large = proto.ByteSize() > PROTOBUF_LIMIT_BYTES
        if large:
            onnx.save_model(proto, temporary, save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
        else:
            onnx.save_model(proto, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def export_openvino(model: PatchCore, path: str | Path) -> Path:
    """Write ``model`` as an OpenVINO IR (``path`` .xml and its .bin), converted from the ONNX graph,
    with the settings in a JSON file beside it (``path`` with .json); each file replaced atomically."""
    import openvino

    path = Path(path).with_suffix(".xml")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.", dir=path.parent) as scratch:
        onnx_path = export_onnx(model, Path(scratch) / "graph.onnx")
        converted = openvino.convert_model(str(onnx_path))
        staged = Path(scratch) / path.name
        openvino.save_model(converted, str(staged), compress_to_fp16=False)  # full float32: the same numbers
        # OpenVINO's CPU plugin computes in bf16 where the processor can, which moved scores by
        # about 1% and maps by 0.3 here: compile with this configuration to get the library's numbers.
        settings = {**export_settings(model), "openvino_compile_config": OPENVINO_COMPILE_CONFIG}
        staged.with_suffix(".json").write_text(json.dumps(settings, indent=2) + "\n")
        # The weights first and the settings last: a reader that finds the new .json finds the new graph.
        for suffix in (".bin", ".xml", ".json"):
            os.replace(staged.with_suffix(suffix), path.with_suffix(suffix))
    return path


def export_model(model: PatchCore, path: str | Path, format: str = "onnx") -> Path:
    """Export to ``format`` (``onnx`` or ``openvino``); returns the file written (the .xml for OpenVINO)."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    return export_onnx(model, path) if format == "onnx" else export_openvino(model, path)
