"""Scoring on Ray: ``patchcore predict MODEL SOURCE... --out DIR --ray [ADDRESS]``.

Ray is optional (``pip install 'patchcore[ray]'``) and imported only here, when asked for.

Design, one Ray Data pipeline per run:

* **The model crosses the network once per node.** The driver puts the model's file bytes in
  Ray's object store (``ray.put``, once); each scoring actor fetches them once, writes them to a
  temporary folder and loads them with the library's own loader (checksums, settings, the
  ``--false-alarm-rate`` cut), so an actor scores exactly what local ``predict`` would load.
* **Reading.** Local files and folders are expanded on the driver as local ``predict`` does
  (``data.expand_paths``); their bytes are read by tasks pinned to the driver's node (the files
  are on its disk, not necessarily on the workers'). Those tasks ask for no CPU, so an actor pool
  that holds every CPU cannot starve them (Ray Data then hangs with no error). URIs
  (``s3://``, ``gs://``, ``file://``, ...) are read by ``ray.data.read_binary_files`` on any node.
* **Scoring.** An actor pool (``map_batches`` with a callable class) decodes and prepares each
  image (``data.load_bytes``: the intake, then the input layout) and scores the batch through
  the library's one scoring path, ``predict_loaded`` of "a model" (``scoring.ScoringModel``:
  ``PatchCore`` or ``runtime.ExportedModel``, loaded by ``scoring.load_model``).
  A bad image becomes a record with its error, as locally. The actor renders the picture too and
  sends it back encoded, JPEG or PNG (encoding is much of a picture's cost).
* **Results.** The driver receives one JSON record (and PNG) per image, in input order (Ray
  Data's ``preserve_order``), and writes ``predictions.jsonl`` and the pictures as local
  ``predict`` does.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import BadInputError, ClusterError
from ..formats import files_of
from .cluster import LOCAL_OBJECT_STORE_BYTES, connect, first_line, import_ray

#: file-reading tasks on the driver's node at a time: enough to keep the actors fed, few enough
#: that reading does not run far ahead of scoring and fill the object store
READ_TASKS = 4
#: how long the actor pool may take to start (each actor fetches and loads the model) before the run fails
ACTOR_START_TIMEOUT_S = 600
#: the Ray label every node carries with its id (pins the reading tasks to the driver's node)
NODE_ID_LABEL = "ray.io/node-id"


def is_uri(source: str) -> bool:
    """Whether a SOURCE is a URI for Ray Data (``s3://bucket/dir``) rather than a local path."""
    return "://" in source


def model_files(path: str | Path) -> dict[str, bytes]:
    """The bytes of a model file and of the files beside it that loading it reads: an ONNX file's
    external weights (``NAME.onnx.data``), an OpenVINO model's ``.bin`` and ``.json``."""
    return {file.name: file.read_bytes() for file in files_of(path)}


@dataclass
class RayResult:
    """One image's result from the actor pool: its JSON record, its picture as JPEG or PNG bytes
    (None when no pictures were asked for or the image was skipped) and the Ray node that scored it."""

    record: dict[str, Any]
    picture: bytes | None
    node: str


class Scorer:
    """A scoring actor's work (``map_batches`` callable class): loads the model once, then turns
    batches of (path, bytes, error) into (record, picture, node) through ``predict_loaded``."""

    def __init__(self, model_ref: list, name: str, pictures: str | None, threshold: float | None, load_options: dict[str, Any]) -> None:
        import ray

        from ..intake import own_the_pixel_limit
        from ..scoring import load_model

        own_the_pixel_limit()  # this process reads images through the intake only: its limit is the driver's
        # The reference arrives inside a list so that Ray hands it over unresolved: fetched here,
        # once per actor, from the object store (which holds one copy per node).
        files: dict[str, bytes] = ray.get(model_ref[0])
        with tempfile.TemporaryDirectory(prefix="patchcore-ray-") as folder:
            for file_name, data in files.items():
                Path(folder, file_name).write_bytes(data)
            # Every engine reads its files while loading, so the folder can go right after.
            self.model = load_model(Path(folder, name), progress=False, **load_options)
        self.pictures = pictures
        self.threshold = threshold
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..data import LoadedImage, load_bytes
        from ..render import encode_picture, predict_picture

        loaded = []
        names = [str(name) for name in batch["path"]]
        errors = batch["error"] if "error" in batch else [""] * len(names)
        for name, data, error in zip(names, batch["bytes"], errors):
            if error:
                loaded.append(LoadedImage(Path(name), error=str(error)))
            else:
                loaded.append(load_bytes(name, bytes(data), self.model.layout_, self.pictures is not None, self.model.max_image_pixels))
        records, pictures = [], []
        for name, prediction in zip(names, self.model.predict_loaded(loaded, self.threshold)):
            # The path as given: a URI's "s3://" would not survive the Path the image was named by.
            records.append(json.dumps({**prediction.to_record(), "path": name}))
            if self.pictures is not None and prediction.error is None:
                picture = predict_picture(prediction.image, prediction.map_at, self.model.calibration_, prediction.score, prediction.is_anomalous)
                pictures.append(encode_picture(picture, self.pictures))
            else:
                pictures.append(b"")
        return {"record": np.array(records, dtype=object), "picture": np.array(pictures, dtype=object), "node": np.array([self.node] * len(records), dtype=object)}


def read_files(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A reading task's work on the driver's node: each local file's bytes, or the error that
    local ``predict`` reports for it (missing, unreadable)."""
    from ..intake import read_file_bytes

    contents, errors = [], []
    for path in batch["path"]:
        try:
            contents.append(read_file_bytes(str(path)))
            errors.append("")
        except BadInputError as error:
            contents.append(b"")
            errors.append(str(error))
    return {"path": batch["path"], "bytes": np.array(contents, dtype=object), "error": np.array(errors, dtype=object)}


class RayScoring:
    """Scores images on Ray: ``with RayScoring(model, address) as scoring: for r in scoring.score_files(paths): ...``.

    ``address`` None starts a local Ray instance (stopped again on exit); a cluster's address
    (``HOST:PORT`` of its head) joins that cluster. ``actors`` is the size of the scoring pool
    (default: one per CPU of the cluster, or per GPU with ``device="cuda"``); ``pictures`` is the
    pictures' format ("jpg" or "png"; None: no pictures); the other options are local ``predict``'s.
    """

    def __init__(
        self, model: str | Path, address: str | None = None, actors: int | None = None, pictures: str | None = "jpg",
        threshold: float | None = None, false_alarm_rate: float | None = None, device: str = "auto",
        batch_size: int = 8, index: str | None = None, progress: bool = True, max_image_pixels: int | None = None,
    ) -> None:
        if actors is not None and actors < 1:
            raise ValueError(f"--ray-actors must be at least 1, got {actors}")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.model = Path(model)
        self.address = address
        self.actors = actors
        self.pictures = pictures
        self.threshold = threshold
        self.load_options = {
            "device": device, "batch_size": batch_size, "index": index, "false_alarm_rate": false_alarm_rate,
            **({} if max_image_pixels is None else {"max_image_pixels": max_image_pixels}),
        }
        self.batch_size = batch_size
        self.gpus = 1 if device.startswith("cuda") else 0
        self.progress = progress
        self.images_per_node: Counter[str] = Counter()

    def __enter__(self) -> "RayScoring":
        self.ray = import_ray()
        files = model_files(self.model)
        self._connect(sum(len(data) for data in files.values()))
        try:
            self._prepare(files)
        except BaseException:
            self.ray.shutdown()
            raise
        return self

    def _prepare(self, files: dict[str, bytes]) -> None:
        self._model_ref = self.ray.put(files)
        resources = self.ray.cluster_resources()
        available = resources.get("GPU" if self.gpus else "CPU", 0)
        if self.gpus and not available:
            raise ClusterError("--ray: --device cuda, but the Ray cluster has no GPUs (score on CPUs with --device cpu)")
        if self.actors is None:
            self.actors = max(1, int(available))
        # Each actor asks for one CPU (or GPU), less when asked for more actors than there are.
        share = min(1.0, available / self.actors) if available else 1.0
        self.actor_resources = {"num_gpus": share, "num_cpus": 0} if self.gpus else {"num_cpus": share}
        context = self.ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # results in input order, as local predict
        # Work starts once every actor has loaded the model, so that the first actors up do not
        # take a short job's every batch; a pool the cluster cannot place fails after this long
        # with Ray's "Timed out while starting actors" instead of waiting for ever.
        context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        context.enable_progress_bars = self.progress
        if not self.progress:
            logging.getLogger("ray.data").setLevel(logging.ERROR)

    def _connect(self, model_bytes: int) -> None:
        self.node = connect(self.ray, self.address, LOCAL_OBJECT_STORE_BYTES + 2 * model_bytes)

    def __exit__(self, *exc_info: object) -> None:
        self.ray.shutdown()

    def score_files(self, paths: Sequence[str | Path]) -> Iterator[RayResult]:
        """Score local image files (on the driver's disk), one result each, in order."""
        rows = [{"path": str(path)} for path in paths]
        blocks = max(1, math.ceil(len(rows) / self.batch_size))  # a reading task reads about one batch
        dataset = self.ray.data.from_items(rows, override_num_blocks=blocks)
        dataset = dataset.map_batches(
            read_files, batch_size=None, batch_format="numpy", num_cpus=0, label_selector={NODE_ID_LABEL: self.node},
            compute=self.ray.data.TaskPoolStrategy(size=min(READ_TASKS, blocks)),
        )
        return self._score(dataset)

    def score_uris(self, uris: Sequence[str]) -> Iterator[RayResult]:
        """Score the files at URIs Ray Data reads (files or folders: ``s3://bucket/dir``), one
        result each, in Ray Data's order (a folder's files sorted by path); a record's path is the
        file's URI."""
        schemes = sorted({uri.split("://", 1)[0] for uri in uris})
        if len(schemes) > 1:
            raise BadInputError(f"--ray: give URIs of one file system at a time, got {', '.join(s + '://' for s in schemes)}")
        dataset = self.ray.data.read_binary_files(list(uris), include_paths=True, num_cpus=0)  # never starved by the actors
        prefix = f"{schemes[0]}://"
        dataset = dataset.map_batches(
            lambda batch: {"path": np.array([prefix + str(p) if "://" not in str(p) else str(p) for p in batch["path"]], dtype=object), "bytes": batch["bytes"]},
            batch_size=None, batch_format="numpy",
        )
        return self._score(dataset)

    def _score(self, dataset: Any) -> Iterator[RayResult]:
        scored = dataset.map_batches(
            Scorer, batch_size=self.batch_size, batch_format="numpy", compute=self.ray.data.ActorPoolStrategy(size=self.actors),
            fn_constructor_kwargs={
                "model_ref": [self._model_ref], "name": self.model.name, "pictures": self.pictures,
                "threshold": self.threshold, "load_options": self.load_options,
            },
            **self.actor_resources,
        )
        try:
            for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
                for record, picture, node in zip(batch["record"], batch["picture"], batch["node"]):
                    self.images_per_node[str(node)] += 1
                    yield RayResult(json.loads(record), bytes(picture) or None, str(node))
        except self.ray.exceptions.RayError as error:
            raise ClusterError(f"--ray: scoring failed on the cluster ({first_line(error)})") from None

    def describe(self) -> str:
        """One line: where the images were scored (actors, nodes, images per node)."""
        where = "a local Ray instance" if self.address is None else f"the Ray cluster at {self.address}"
        per_node = ", ".join(f"{node[:8]}: {count}" for node, count in sorted(self.images_per_node.items()))
        nodes = len(self.images_per_node)
        return f"scored on {where} by {self.actors} actors on {nodes} node{'s' * (nodes != 1)} (images per node: {per_node})"
