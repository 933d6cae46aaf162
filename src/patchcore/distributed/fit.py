"""Fitting on Ray: ``patchcore fit DATA --out MODEL --ray [ADDRESS]``.

The costly part of a fit that spreads well is the backbone: every training image's features.
The coreset selection needs all patches at once, so it runs on the driver, which receives only
their float16 128-d projection (256 bytes a patch) and never the wide features:

    driver:   list the images, read their headers, load the backbone, fit the input layout
              -> chunks of images (a whole number of backbone batches, so that every batch is
                 the local fit's) go, as file bytes, to a pool of actors, at most two per actor
                 in flight, to whichever actor is free
    actors:   decode, extract features; keep the full features in a temporary file on their
              node; send back the projection, the grid of each image and the errors
    driver:   greedy k-center selection on the projection (exact, as locally)
    actors:   send back only the chosen rows (the memory bank)
    driver:   the bank to every actor, once
    actors:   score their images leave-one-out against it (the calibration)
    driver:   set aside the images that score like defects (contamination.py); if any, their
              patches out of the coreset and its cover repaired, the bank again, the others
              scored again
    driver:   cut the thresholds; the actors drop their files

The model is the local fit's, bit for bit, where the nodes compute the backbone as the driver's
machine does (the same CPU kind and libraries; tested on a two-node cluster on one machine).
The images are read on the driver and their bytes shipped to the actors, so the nodes need no
shared file system.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..backbones import build_feature_extractor, get_spec
from ..calibrate import calibrate
from ..contamination import check_training_images
from ..data import LoadedImage, load_bytes
from ..errors import BadInputError
from ..features import PatchFeatures
from ..fitting import CalibrationInputs, FitOptions, FitPipeline, FittedState, LeftOut, bank_entries, fitted_share, own_runs, set_aside_images
from ..intake import image_size_hw, own_the_pixel_limit, read_file_bytes
from ..layout import InputLayout
from ..model import PatchCore
from ..search import NearestNeighbourIndex
from .cluster import connect, import_ray

#: backbone batches per chunk of images sent to an actor: enough work to hide the round trip,
#: few enough images (with two chunks in flight per actor) to keep Ray's object store small
BATCHES_PER_CHUNK = 8
#: chunks waiting at each actor while it works on one
CHUNKS_IN_FLIGHT = 2


class FeatureWorker:
    """One actor of a fit on Ray: runs the fitting pipeline's feature and leave-one-out steps on
    the chunks of images it is sent, keeping their features in temporary files on its node."""

    def __init__(self, recipe: dict[str, Any], extractor: dict[str, np.ndarray]) -> None:
        # The driver's thread count: a convolution's sums, and so the features, depend on it.
        torch.set_num_threads(recipe["threads"])
        own_the_pixel_limit()  # this process reads images through the intake only: its limit is the driver's
        options = FitOptions(**recipe["options"])
        module = build_feature_extractor(get_spec(recipe["backbone"]), tuple(recipe["layers"]))
        module.load_state_dict({name: torch.from_numpy(value) for name, value in extractor.items()})
        patch_features = PatchFeatures(module, tuple(recipe["layers"])).to(torch.device(options.device))
        self.pipeline = FitPipeline(patch_features, InputLayout.from_dict(recipe["layout"]), options)
        self.index_kind, self.num_neighbors = recipe["index"], recipe["num_neighbors"]
        self.index: NearestNeighbourIndex | None = None
        self.chunks: dict[int, Any] = {}
        import ray

        self.node = ray.get_runtime_context().get_node_id()

    def extract(self, chunk: int, files: list[tuple[str, bytes | str]], sizes: list[tuple[int, int]]) -> dict[str, Any]:
        """Features of one chunk of images, given as (name, file bytes, or the read error):
        the projection and each image's layout come back, the features stay here."""
        size = self.pipeline.options.batch_size
        batches = [[self._decode(name, data) for name, data in files[start : start + size]] for start in range(0, len(files), size)]
        skipped = [item.error for batch in batches for item in batch if item.error]
        try:
            patches = self.pipeline.extract([name for name, _ in files], sizes, batches)
        except ValueError:  # no readable image in the chunk
            return {"points": None, "skipped": skipped, "node": self.node}
        self.chunks[chunk] = patches
        return {
            "points": patches.points.cpu().numpy(), "starts": patches.starts, "grids": patches.grids, "input_sizes": patches.input_sizes,
            "sources": patches.sources, "skipped": patches.skipped, "disk_bytes": patches.file.nbytes, "node": self.node,
        }

    def _decode(self, name: str, data: bytes | str) -> LoadedImage:
        if isinstance(data, str):  # the driver could not read the file
            return LoadedImage(Path(name), error=data)
        return load_bytes(name, data, self.pipeline.layout, max_pixels=self.pipeline.options.max_image_pixels)

    def gather(self, chunk: int, rows: np.ndarray) -> np.ndarray:
        """The chunk's rows at increasing row numbers (counted within the chunk), as stored."""
        return self.chunks[chunk].file.gather(rows)

    def use_bank(self, bank: np.ndarray) -> None:
        """Search ``bank`` from now on (the memory bank the driver chose)."""
        self.index = NearestNeighbourIndex(torch.from_numpy(bank).to(self.pipeline.device), self.index_kind)

    def left_out(self, chunk: int, images: list[int], owns: list[tuple[int, int]]) -> list[LeftOut]:
        """The chunk's images (numbered within it) scored without their own bank entries ``owns``."""
        return [self.pipeline.left_out(self.index, self.num_neighbors, self.chunks[chunk], image, own) for image, own in zip(images, owns)]

    def close(self) -> None:
        """Remove this actor's temporary files."""
        for patches in self.chunks.values():
            patches.close()
        self.chunks.clear()


@dataclass
class _Chunk:
    worker: Any  # the actor holding its features
    number: int  # its number, as the actor knows it
    first_image: int  # its first readable image among all readable images
    first_row: int  # its first row among all patches
    images: int  # readable images
    rows: int


def fit_on_ray(model: PatchCore, images: Sequence[str | Path], address: str | None = None, workers: int | None = None) -> PatchCore:
    """Fit ``model`` on ``images`` with the backbone work spread over a Ray cluster (see the module's
    docstring); ``address`` None starts a local Ray instance. The model is the local fit's; it also
    gets ``fit_images_per_node_`` ({Ray node id: images whose features it extracted}) and
    ``fit_workers_`` (the actors)."""
    ray = import_ray()
    clock_start = time.perf_counter()
    paths = [Path(p) for p in images]
    pipeline, sizes, weights_sha256 = FitPipeline.begin(model.backbone, model.layers, model.weights, model.layout, paths, model.fit_options())
    load_seconds = time.perf_counter() - clock_start
    # The actors' pipelines: the driver's options, on "cuda" whichever GPU each has, without bars.
    options = replace(pipeline.options, device="cuda" if pipeline.device.type == "cuda" else "cpu", progress=False)
    recipe = {
        "backbone": model.backbone, "layers": list(model.layers), "num_neighbors": model.num_neighbors, "index": model.index,
        "layout": pipeline.layout.to_dict(), "options": options.to_dict(), "threads": torch.get_num_threads(),
    }
    extractor = {name: value.detach().cpu().numpy() for name, value in pipeline.patch_features.extractor.state_dict().items()}
    connect(ray, address, object_store_bytes=256 * 2**20 + 2 * sum(v.nbytes for v in extractor.values()))
    try:
        gpus = 1 if pipeline.device.type == "cuda" else 0
        # Each actor runs the driver's thread count, and on the CPU holds as many CPUs (at most a node's).
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        cpus = 0 if gpus else min(recipe["threads"], max(int(node.get("CPU", 0)) for node in nodes))
        fits = max(1, sum(int(node.get("GPU", 0)) if gpus else int(node.get("CPU", 0)) // max(cpus, 1) for node in nodes))
        count = model.fit_workers_ = workers or fits
        if count > fits:  # more actors than fit whole: each holds a share, so that none waits forever to start
            cpus, gpus = (cpus * fits / count, 0) if not gpus else (0, fits / count)
        actor = ray.remote(num_cpus=cpus, num_gpus=gpus)(FeatureWorker)
        shared = ray.put(extractor)
        pool = [actor.remote(recipe, shared) for _ in range(count)]
        try:
            state = _fit_with(ray, model, pipeline, weights_sha256, pool, paths)
        finally:
            ray.get([worker.close.remote() for worker in pool])
    finally:
        ray.shutdown()
    state.fit_seconds = {"load_backbone": load_seconds, **state.fit_seconds}
    return model.set_fitted(state)


def _fit_with(ray: Any, model: PatchCore, pipeline: FitPipeline, weights_sha256: str, pool: list, paths: list[Path]) -> FittedState:
    started = time.perf_counter()
    chunks, results = _extract_everywhere(ray, pipeline, pool, paths)
    readable = [(chunk, result) for chunk, result in zip(chunks, results) if result["points"] is not None]
    sources = [source for _, result in readable for source in result["sources"]]
    if len(sources) < 2:
        raise ValueError(f"need at least 2 readable good images to fit (each is scored against the others to set the threshold), got {len(sources)}")
    # The chunks' rows, end to end, in image order: the local fit's rows.
    layout, first_image, first_row = [], 0, 0
    for (worker, number), result in readable:
        rows, count = len(result["points"]), len(result["sources"])
        layout.append(_Chunk(worker, number, first_image, first_row, count, rows))
        first_image, first_row = first_image + count, first_row + rows
    points = torch.from_numpy(np.concatenate([result["points"] for _, result in readable]))
    starts = np.concatenate([[0]] + [chunk.first_row + result["starts"][1:] for chunk, (_, result) in zip(layout, readable)])
    model.fit_images_per_node_ = dict(Counter(result["node"] for _, result in readable for _ in result["sources"]))
    features_seconds = time.perf_counter() - started

    points = points.to(pipeline.device)
    picks, radius = pipeline.select_covering_coreset(points, bank_entries(len(points), model.coreset_ratio, model.bank_size))
    coreset_seconds = time.perf_counter() - started - features_seconds
    memory_bank, inputs = _bank_and_scores(ray, pipeline, layout, starts, sources, picks.numpy(), pipeline.calibration_images(len(sources)))
    calibration_seconds = time.perf_counter() - started - features_seconds - coreset_seconds
    # The same check as a local fit's, on the same scores: the same images set aside.
    check = check_training_images(inputs.scores, inputs.sources, model.contamination)
    aside = set_aside_images(check, inputs)
    if len(aside):
        picks = pipeline.coreset_without(points, starts, aside, picks, radius)
    del points  # the coreset is final: scoring reads the actors' features (a local fit's drop_projection)
    if len(aside):
        memory_bank, inputs = _bank_and_scores(ray, pipeline, layout, starts, sources, picks.numpy(), np.setdiff1d(inputs.images, aside))
    calibration = calibrate(*inputs.for_calibrate(), model.false_alarm_rate)
    return FittedState(
        pipeline.patch_features, pipeline.layout, weights_sha256, memory_bank,
        coreset_ratio=fitted_share(len(memory_bank), starts, aside, None if model.bank_size is not None else model.coreset_ratio),
        num_fit_images=len(sources) - len(aside), calibration=calibration, calibration_sources=inputs.sources, contamination=check,
        skipped=[message for result in results for message in result["skipped"]],
        fit_seconds={
            "features": features_seconds, "coreset": coreset_seconds, "calibration": calibration_seconds,
            "contamination": time.perf_counter() - started - features_seconds - coreset_seconds - calibration_seconds,
        },
        fit_disk_bytes=sum(result["disk_bytes"] for _, result in readable),
    )


def _bank_and_scores(
    ray: Any, pipeline: FitPipeline, layout: list[_Chunk], starts: np.ndarray, sources: list[str], picks: np.ndarray, chosen: np.ndarray
) -> tuple[torch.Tensor, CalibrationInputs]:
    """The memory bank of the picked rows, gathered from the actors holding them, and the
    ``chosen`` images scored leave-one-out against it by those actors."""
    bank_parts = []
    for chunk in layout:
        mine = picks[(picks >= chunk.first_row) & (picks < chunk.first_row + chunk.rows)] - chunk.first_row
        bank_parts.append(chunk.worker.gather.remote(chunk.number, mine))
    memory_bank = torch.from_numpy(np.concatenate(ray.get(bank_parts))).float().to(pipeline.device)
    bank = ray.put(memory_bank.cpu().numpy())
    ray.get([worker.use_bank.remote(bank) for worker in {chunk.worker for chunk in layout}])
    bank_starts = own_runs(picks, starts)
    asked = []
    for chunk in layout:
        mine = chosen[(chosen >= chunk.first_image) & (chosen < chunk.first_image + chunk.images)]
        owns = [(int(bank_starts[i]), int(bank_starts[i + 1])) for i in mine]
        asked.append(chunk.worker.left_out.remote(chunk.number, (mine - chunk.first_image).tolist(), owns))
    left_out = [result for part in ray.get(asked) for result in part]  # chunk by chunk: the chosen images in order
    return memory_bank, CalibrationInputs.of(left_out, [sources[i] for i in chosen], chosen)


def _extract_everywhere(ray: Any, pipeline: FitPipeline, pool: list, paths: list[Path]) -> tuple[list[tuple[Any, int]], list[dict]]:
    """Send chunks of images to the actors, each to whichever is free, and collect each chunk's
    result: ([(actor, chunk number)], [result]) in image order."""
    per_chunk = BATCHES_PER_CHUNK * pipeline.options.batch_size
    starts = list(range(0, len(paths), per_chunk))
    owners: list[tuple[Any, int]] = [None] * len(starts)  # type: ignore[list-item]
    results: list[dict] = [None] * len(starts)  # type: ignore[list-item]
    waiting: dict[Any, tuple[int, Any]] = {}  # result reference -> (chunk number, actor)
    idle = deque(worker for worker in pool for _ in range(CHUNKS_IN_FLIGHT))
    with pipeline.bar(len(paths), "features") as bar:
        next_chunk = 0
        while next_chunk < len(starts) or waiting:
            while idle and next_chunk < len(starts):
                worker = idle.popleft()
                chunk_paths = paths[starts[next_chunk] : starts[next_chunk] + per_chunk]
                files = [(str(path), _file_bytes(path)) for path in chunk_paths]
                sizes = [size for size in (image_size_hw(path, pipeline.options.max_image_pixels) for path in chunk_paths) if size is not None]
                reference = worker.extract.remote(next_chunk, files, sizes)
                waiting[reference] = (next_chunk, worker)
                next_chunk += 1
            done, _ = ray.wait(list(waiting), num_returns=1)
            number, worker = waiting.pop(done[0])
            results[number] = ray.get(done[0])
            owners[number] = (worker, number)
            bar.update(min(per_chunk, len(paths) - starts[number]))
            idle.append(worker)
    return owners, results


def _file_bytes(path: Path) -> bytes | str:
    try:
        return read_file_bytes(path)
    except BadInputError as error:
        return str(error)
