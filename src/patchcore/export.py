"""Export a fitted PatchCore to one ONNX graph (and to OpenVINO from it): images in, image scores
and anomaly maps out, computed as the library computes them.

    normalised images (B, 3, H, W)
      -> backbone taps, 3x3 average, upsample, join          (features.py)
      -> nearest bank entry per patch: [q, 1] . [-2 b, |b|^2] (= |q - b|^2 - |q|^2, one matrix
         product; q and b centred on the bank's mean, to keep float32 rounding small), its minimum taken block by block over the bank, so that memory is bounded by
         (patches x block), never patches x bank x D; the distance to the entry found is then
         taken directly as ||q - b||  (search.py)
      -> eq. 7, N_b(m*) found by one more search of the bank for each image's m*  (search.py)
      -> the map: one matrix per axis, upsample and blur together  (maps.py)

The thresholds, the normalisation, the input settings and the versions are not in the graph:
they go in the model's metadata (ONNX ``metadata_props``; a JSON file beside an OpenVINO IR), so
that a cut can change without a new export. Only the batch size is dynamic: the square input
has one size, fixed at fit.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .maps import BLUR_SIGMA, map_matrix
from .model import PatchCore
from .formats import EXPORT_FORMAT_VERSION, METADATA_KEY
from .runtime import OPENVINO_COMPILE_CONFIG

#: distances computed at once per image, per bank block: bounds the graph's working memory
BLOCK_ELEMENTS_PER_IMAGE = 1 << 22
#: the most bank blocks in a graph (each is a few nodes, unrolled)
MAX_BLOCKS = 256
#: a protobuf holds at most 2 GB: weights above this (torch.onnx's own limit, leaving room for the
#: graph) go to a file beside the .onnx (ONNX external data)
EXTERNAL_DATA_ABOVE_BYTES = 1536 * 2**20
EXPORT_FORMATS = ("onnx", "openvino")
#: the order of the search's matrix product, per engine (see ScoringGraph)
SEARCH_LAYOUTS = ("queries", "bank")


class ScoringGraph(nn.Module):
    """What is exported: (B, 3, H, W) normalised images -> (scores (B,), maps (B, H, W)).

    The bank is held once, centred on its mean, as its ranking terms R = [-2 b, |b|^2] per entry: a query q extended
    to [q, 1] gives [q, 1] . R = |q - b|^2 - |q|^2, which ranks the entries as the distance does,
    in one matrix product with no pass over the (patches x block) result to add norms. The entries
    themselves are R's first D columns times -1/2 (exact in float32).

    ``layout`` orders that product for the engine: ``"queries"`` (patches x bank, the minimum
    along the last axis) runs fastest in ONNX Runtime; ``"bank"`` (bank x patches, the minimum
    along the first axis) in OpenVINO, whose minimum along a last axis of thousands is a slow
    TopK. The numbers are the same either way.
    """

    def __init__(self, model: PatchCore, layout: str = "queries") -> None:
        super().__init__()
        if layout not in SEARCH_LAYOUTS:
            raise ValueError(f"unknown search layout {layout!r}; choose one of: {', '.join(SEARCH_LAYOUTS)}")
        self.layout = layout
        self.features = copy.deepcopy(model.patch_features_).cpu()  # the model itself stays where it is
        self.input_hw = model.layout_.input_hw((model.layout_.image_size, model.layout_.image_size))
        grid = self.features.grid_hw(self.input_hw)
        bank = model.memory_bank_.detach().float().cpu()
        self.bank_size, self.dims = bank.shape
        # Work in coordinates centred on the bank's mean: the same nearest entries and distances,
        # but |b|^2 and q.b stay small, and so does their float32 rounding. Uncentred features
        # (all positive after ReLU) can have |b|^2 ~ 1e5, where that rounding picked another
        # nearest entry than the library's.
        self.register_buffer("centre", bank.double().mean(dim=0).float())
        bank = bank - self.centre
        ranking = torch.cat([-2.0 * bank, bank.square().sum(dim=1, keepdim=True)], dim=1)  # (M, D + 1)
        self.register_buffer("ranking", ranking.T.contiguous() if layout == "queries" else ranking)
        self.num_neighbors = min(model.num_neighbors, self.bank_size)
        self.register_buffer("map_rows", map_matrix(grid[0], self.input_hw[0], BLUR_SIGMA))
        self.register_buffer("map_cols", map_matrix(grid[1], self.input_hw[1], BLUR_SIGMA))
        # Blocks of 4M distances per image; a bank of millions of entries gets larger blocks instead
        # of an unrolled graph of thousands of them.
        self.block = max(256, BLOCK_ELEMENTS_PER_IMAGE // (grid[0] * grid[1]), math.ceil(self.bank_size / MAX_BLOCKS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features.of_whole_images(images) - self.centre  # (B, h, w, D), centred
        size, height, width, dims = features.shape
        queries = features.reshape(-1, dims)
        nearest = self._nearest(queries)
        patch_scores = torch.linalg.vector_norm(queries - self._entries(nearest), dim=1).reshape(size, height * width)
        top_scores, worst = patch_scores.max(dim=1)
        scores = top_scores
        if self.num_neighbors > 1:  # eq. 7
            nearest_of_worst = torch.gather(nearest.reshape(size, height * width), 1, worst[:, None])[:, 0]
            worst_features = torch.gather(features.reshape(size, height * width, dims), 1, worst[:, None, None].expand(size, 1, dims))
            neighbours = self._entries(self._neighbourhoods(self._entries(nearest_of_worst)).reshape(-1)).reshape(size, self.num_neighbors, dims)
            distances = torch.linalg.vector_norm(neighbours - worst_features, dim=2)
            weights = 1.0 - torch.exp(top_scores - torch.logsumexp(distances, dim=1))
            scores = weights * top_scores
        maps = self.map_rows @ patch_scores.reshape(size, height, width) @ self.map_cols.T
        return scores, maps

    def _entries(self, indices: torch.Tensor) -> torch.Tensor:
        """The bank entries at ``indices`` (N,) as (N, D), read back from the ranking terms."""
        rows = self.ranking.index_select(1, indices).T if self.layout == "queries" else self.ranking.index_select(0, indices)
        return rows[:, : self.dims] * -0.5

    def _extended(self, queries: torch.Tensor) -> torch.Tensor:
        """[q, 1] per query, laid out for :meth:`_ranking`: (N, D + 1), or (D + 1, N) for ``"bank"``."""
        extended = torch.cat([queries, torch.ones_like(queries[:, :1])], dim=1)
        return extended if self.layout == "queries" else extended.T

    def _ranking(self, extended: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """|q - b|^2 - |q|^2 for the bank entries start:stop, as (queries, entries) or (entries, queries)."""
        if self.layout == "queries":
            return extended @ self.ranking[:, start:stop]
        return self.ranking[start:stop] @ extended

    def _neighbourhoods(self, centres: torch.Tensor) -> torch.Tensor:
        """N_b(m*): the ``num_neighbors`` bank entries nearest to each of the B entries m* (itself
        included), (B, k), by one search of B rows, so that no table of every entry's neighbours is needed."""
        ranking = self._ranking(self._extended(centres), 0, self.bank_size)
        if self.layout == "queries":
            return torch.topk(ranking, self.num_neighbors, dim=1, largest=False).indices
        return torch.topk(ranking, self.num_neighbors, dim=0, largest=False).indices.T

    def _nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """Index of each query's nearest bank entry; the bank is scanned in blocks, the running
        minimum kept (an earlier block wins ties, as a full scan would)."""
        axis = 1 if self.layout == "queries" else 0
        extended = self._extended(queries)  # once, not per block
        best_value = best_index = None
        for start in range(0, self.bank_size, self.block):
            ranking = self._ranking(extended, start, min(start + self.block, self.bank_size))
            index = ranking.argmin(dim=axis, keepdim=True)
            value = torch.gather(ranking, axis, index).reshape(-1)
            index = index.reshape(-1) + start
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


def export_onnx(model: PatchCore, path: str | Path, layout: str = "queries") -> Path:
    """Write ``model`` as one ONNX graph with its settings in ``metadata_props``, replacing any file
    at ``path`` atomically. Weights over ``EXTERNAL_DATA_ABOVE_BYTES`` (a protobuf holds 2 GB at
    most) go to ``path`` + ``.data`` beside it, which is replaced first. ``layout``: see
    :class:`ScoringGraph` (``"bank"`` is what OpenVINO runs fastest)."""
    import onnx  # noqa: F401  (torch.onnx needs it; a missing one is reported by the caller)

    if model.layout_.mode != "square":
        raise ValueError(
            f"export supports the square input mode only; this model uses {model.layout_.mode!r}: "
            "score it with its .safetensors file, or fit with --input-mode square to export"
        )
    path = Path(path)
    graph = ScoringGraph(model, layout).eval()
    example = torch.zeros(2, 3, *graph.input_hw)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        program = torch.onnx.export(
            graph, (example,), dynamo=True, input_names=["images"], output_names=["scores", "maps"],
            dynamic_shapes={"images": {0: batch}}, optimize=True, verbose=False,
        )
    program.model.metadata_props[METADATA_KEY] = json.dumps(export_settings(model))
    weights = sum(t.numel() * t.element_size() for t in [*graph.parameters(), *graph.buffers()])
    path.parent.mkdir(parents=True, exist_ok=True)
    external = path.with_name(path.name + ".data")
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as scratch:
        staged = Path(scratch) / path.name  # the final name: an external data file is found by it
        program.save(staged, external_data=weights > EXTERNAL_DATA_ABOVE_BYTES)
        staged_external = staged.with_name(staged.name + ".data")
        if staged_external.exists():
            os.replace(staged_external, external)
        elif external.exists():
            external.unlink()  # an earlier, larger export's weights
        os.replace(staged, path)
    return path


def export_openvino(model: PatchCore, path: str | Path) -> Path:
    """Write ``model`` as an OpenVINO IR (``path`` .xml and its .bin), converted from the ONNX graph,
    with the settings in a JSON file beside it (``path`` with .json); each file replaced atomically."""
    import openvino

    path = Path(path).with_suffix(".xml")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.", dir=path.parent) as scratch:
        onnx_path = export_onnx(model, Path(scratch) / "graph.onnx", layout="bank")
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
