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
    driver:   cut the thresholds; the actors drop their files

The model is the local fit's, bit for bit, where the nodes compute the backbone as the driver's
machine does (the same CPU kind and libraries; tested on a two-node cluster on one machine).
The images are read on the driver and their bytes shipped to the actors, so the nodes need no
shared file system.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .data import LoadedImage, prepare_image
from .intake import image_size_hw, own_the_pixel_limit, read_file_bytes, read_image_bytes
from .errors import BadInputError
from .model import PatchCore, _calibration_inputs, own_runs
from .search import NearestNeighbourIndex

#: backbone batches per chunk of images sent to an actor: enough work to hide the round trip,
#: few enough images (with two chunks in flight per actor) to keep Ray's object store small
BATCHES_PER_CHUNK = 8
#: chunks waiting at each actor while it works on one
CHUNKS_IN_FLIGHT = 2


class FeatureWorker:
    """One actor of a fit on Ray: extracts the features of the chunks of images it is sent,
    keeps them in temporary files on its node, and hands back chosen rows and left-out scores."""

    def __init__(self, recipe: dict[str, Any], extractor: dict[str, np.ndarray]) -> None:
        from .backbones import build_feature_extractor, get_spec
        from .features import PatchFeatures
        from .layout import InputLayout

        # The driver's thread count: a convolution's sums, and so the features, depend on it.
        torch.set_num_threads(recipe["threads"])
        own_the_pixel_limit()  # this process reads images through the intake only: its limit is the driver's
        self.model = PatchCore(
            recipe["backbone"], layers=recipe["layers"], seed=recipe["seed"], num_neighbors=recipe["num_neighbors"],
            device=recipe["device"], batch_size=recipe["batch_size"], index=recipe["index"], temp_dir=recipe["temp_dir"],
            max_image_pixels=recipe["max_image_pixels"], progress=False,
        )
        module = build_feature_extractor(get_spec(self.model.backbone), self.model.layers)
        module.load_state_dict({name: torch.from_numpy(value) for name, value in extractor.items()})
        self.model.patch_features_ = PatchFeatures(module, self.model.layers).to(self.model.device)
        self.model.layout_ = InputLayout.from_dict(recipe["layout"])
        self.chunks: dict[int, Any] = {}
        import ray

        self.node = ray.get_runtime_context().get_node_id()

    def extract(self, chunk: int, files: list[tuple[str, bytes | str]], sizes: list[tuple[int, int]]) -> dict[str, Any]:
        """Features of one chunk of images, given as (name, file bytes, or the read error):
        the projection and each image's layout come back, the features stay here."""
        size = self.model.batch_size
        batches = [[self._decode(name, data) for name, data in files[start : start + size]] for start in range(0, len(files), size)]
        self.model.skipped_ = []
        try:
            patches = self.model._extract_patches([name for name, _ in files], "features", sizes, batches)
        except ValueError:  # no readable image in the chunk
            return {"points": None, "skipped": self.model.skipped_, "node": self.node}
        self.chunks[chunk] = patches
        return {
            "points": patches.points.cpu().numpy(), "starts": patches.starts, "grids": patches.grids, "input_sizes": patches.input_sizes,
            "sources": patches.sources, "skipped": self.model.skipped_, "disk_bytes": patches.file.nbytes, "node": self.node,
        }

    def _decode(self, name: str, data: bytes | str) -> LoadedImage:
        if isinstance(data, str):  # the driver could not read the file
            return LoadedImage(Path(name), error=data)
        try:
            return prepare_image(name, read_image_bytes(data, name, self.model.max_image_pixels), self.model.layout_)
        except BadInputError as error:
            return LoadedImage(Path(name), error=str(error))

    def gather(self, chunk: int, rows: np.ndarray) -> np.ndarray:
        """The chunk's rows at increasing row numbers (counted within the chunk), as stored."""
        return self.chunks[chunk].file.gather(rows)

    def use_bank(self, bank: np.ndarray) -> None:
        """Search ``bank`` from now on (the memory bank the driver chose)."""
        self.model.memory_bank_ = torch.from_numpy(bank).to(self.model.device)
        self.model.index_ = NearestNeighbourIndex(self.model.memory_bank_, self.model.index)

    def left_out(self, chunk: int, images: list[int], owns: list[tuple[int, int]]) -> list[tuple[float, float, float, int]]:
        """The chunk's images (numbered within it) scored without their own bank entries ``owns``."""
        return [self.model._left_out(self.chunks[chunk], image, own) for image, own in zip(images, owns)]

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
    from .distributed import connect, import_ray

    ray = import_ray()
    clock_start = time.perf_counter()
    paths = [Path(p) for p in images]
    sizes = model._begin_fit(paths)
    load_seconds = time.perf_counter() - clock_start
    recipe = {
        "backbone": model.backbone, "layers": list(model.layers), "seed": model.seed, "num_neighbors": model.num_neighbors,
        "device": "cuda" if model.device.type == "cuda" else "cpu", "batch_size": model.batch_size, "index": model.index,
        "temp_dir": None if model.temp_dir is None else str(model.temp_dir), "layout": model.layout_.to_dict(), "threads": torch.get_num_threads(),
        "max_image_pixels": model.max_image_pixels,
    }
    extractor = {name: value.detach().cpu().numpy() for name, value in model.patch_features_.extractor.state_dict().items()}
    connect(ray, address, object_store_bytes=256 * 2**20 + 2 * sum(v.nbytes for v in extractor.values()))
    try:
        gpus = 1 if model.device.type == "cuda" else 0
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
            _fit_with(ray, model, pool, paths, sizes)
        finally:
            ray.get([worker.close.remote() for worker in pool])
    finally:
        ray.shutdown()
    model.fit_seconds_ = {"load_backbone": load_seconds, **model.fit_seconds_}
    return model


def _fit_with(ray: Any, model: PatchCore, pool: list, paths: list[Path], sizes: list[tuple[int, int]]) -> None:
    started = time.perf_counter()
    chunks, results = _extract_everywhere(ray, model, pool, paths)
    readable = [(chunk, result) for chunk, result in zip(chunks, results) if result["points"] is not None]
    model.skipped_ = [message for result in results for message in result["skipped"]]
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
    model.num_fit_images_ = len(sources)
    model.fit_images_per_node_ = dict(Counter(result["node"] for _, result in readable for _ in result["sources"]))
    model.fit_disk_bytes_ = sum(result["disk_bytes"] for _, result in readable)
    features_seconds = time.perf_counter() - started

    size = model._bank_entries(len(points))
    model.coreset_ratio_ = model.coreset_ratio if model.bank_size is None else size / len(points)
    picks = model._select_coreset(points.to(model.device), size).numpy()
    del points
    bank_parts = []
    for chunk in layout:
        mine = picks[(picks >= chunk.first_row) & (picks < chunk.first_row + chunk.rows)] - chunk.first_row
        bank_parts.append(chunk.worker.gather.remote(chunk.number, mine))
    model.memory_bank_ = torch.from_numpy(np.concatenate(ray.get(bank_parts))).float().to(model.device)
    model.index_ = NearestNeighbourIndex(model.memory_bank_, model.index)
    coreset_seconds = time.perf_counter() - started - features_seconds

    bank = ray.put(model.memory_bank_.cpu().numpy())
    ray.get([worker.use_bank.remote(bank) for worker in {chunk.worker for chunk in layout}])
    chosen = model._calibration_images(len(sources))
    bank_starts = own_runs(picks, starts)
    asked = []
    for chunk in layout:
        mine = chosen[(chosen >= chunk.first_image) & (chosen < chunk.first_image + chunk.images)]
        owns = [(int(bank_starts[i]), int(bank_starts[i + 1])) for i in mine]
        asked.append(chunk.worker.left_out.remote(chunk.number, (mine - chunk.first_image).tolist(), owns))
    left_out = [result for part in ray.get(asked) for result in part]  # chunk by chunk: the chosen images in order
    scores, peaks, map_mean = _calibration_inputs(left_out)
    model.calibration_sources_ = [sources[i] for i in chosen]
    from .calibrate import calibrate

    model.calibration_ = calibrate(scores, peaks, map_mean, model.false_alarm_rate)
    model.fit_seconds_ = {"features": features_seconds, "coreset": coreset_seconds, "calibration": time.perf_counter() - started - features_seconds - coreset_seconds}


def _extract_everywhere(ray: Any, model: PatchCore, pool: list, paths: list[Path]) -> tuple[list[tuple[Any, int]], list[dict]]:
    """Send chunks of images to the actors, each to whichever is free, and collect each chunk's
    result: ([(actor, chunk number)], [result]) in image order."""
    per_chunk = BATCHES_PER_CHUNK * model.batch_size
    starts = list(range(0, len(paths), per_chunk))
    owners: list[tuple[Any, int]] = [None] * len(starts)  # type: ignore[list-item]
    results: list[dict] = [None] * len(starts)  # type: ignore[list-item]
    waiting: dict[Any, tuple[int, Any]] = {}  # result reference -> (chunk number, actor)
    idle = deque(worker for worker in pool for _ in range(CHUNKS_IN_FLIGHT))
    from tqdm import tqdm

    with tqdm(total=len(paths), desc="   features", unit="img", disable=not model.progress, leave=False, dynamic_ncols=True) as bar:
        next_chunk = 0
        while next_chunk < len(starts) or waiting:
            while idle and next_chunk < len(starts):
                worker = idle.popleft()
                chunk_paths = paths[starts[next_chunk] : starts[next_chunk] + per_chunk]
                files = [(str(path), _file_bytes(path)) for path in chunk_paths]
                sizes = [size for size in (image_size_hw(path, model.max_image_pixels) for path in chunk_paths) if size is not None]
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
