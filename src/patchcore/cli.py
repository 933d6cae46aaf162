"""The ``patchcore`` command: parse arguments, call the library, write files. Nothing else."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import time

from functools import partial
from pathlib import Path
from typing import Sequence

from . import __version__
from .calibrate import DEFAULT_FALSE_ALARM_RATE
from .contamination import DEFAULT_CONTAMINATION, parse_contamination
from .data import expand_paths, training_images
from .errors import BadInputError, ClusterError, ModelFileError, WeightsError, is_missing_pytorch
from .intake import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_SERVER_MAX_IMAGE_PIXELS, own_the_pixel_limit
from .record.images import DEFAULT_KEEP_MAX_GB, KEEP_POLICIES  # (no database packages: the runtime install has none)
from .render import picture_format


class _BackboneNames:
    """The backbone names for argparse, read from backbones.py (which imports PyTorch) only when
    a command uses them, so that ``predict`` on an exported model runs where PyTorch is absent."""

    def _names(self) -> list[str]:
        from .backbones import BACKBONES

        return sorted(BACKBONES)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


BACKBONE_NAMES = _BackboneNames()


def _add_fit_options(parser: argparse.ArgumentParser, single_backbone: bool = True) -> None:
    group = parser.add_argument_group("model")
    if single_backbone:
        group.add_argument("--backbone", default="wide_resnet50_2", choices=BACKBONE_NAMES, help="pretrained CNN (default: %(default)s, as in the paper)")
        group.add_argument("--layers", nargs="+", metavar="LAYER", help="layers to tap (default: the backbone's two mid-level stages)")
        group.add_argument("--weights", metavar="FILE", help="the backbone's ImageNet weights file (default: torchvision's cache, then download)")
    group.add_argument(
        "--input-mode", choices=["auto", "square", "aspect", "tile"], default="auto",
        help="auto (default): square or aspect, chosen at fit from the training images' sizes and recorded in the model (docs/fitting.md); "
        "square: resize to --image-size squared (the seed's); aspect: keep each image's shape at one scale for all; "
        "tile: keep the shape, cut into overlapping tiles (native resolution unless --scale)",
    )
    group.add_argument("--image-size", type=int, default=256, help="square: the side; aspect: the median training image's shorter side after scaling (default: %(default)s)")
    group.add_argument("--center-crop", type=int, metavar="SIZE", help="square mode: then crop the center to this square (the paper: 256 then 224; default: off)")
    group.add_argument("--scale", type=float, help="aspect and tile modes: one resize factor for every image (aspect default: from --image-size; tile default: 1, native)")
    group.add_argument("--tile-size", type=int, default=256, help="tile mode: tile side in pixels after scaling (default: %(default)s)")
    group.add_argument("--tile-overlap", type=int, default=64, help="tile mode: least overlap of neighbouring tiles in pixels (default: %(default)s)")
    bank = group.add_mutually_exclusive_group()
    bank.add_argument("--coreset-ratio", type=float, help="share of the training patches kept in the memory bank (default: 0.1, as the paper)")
    bank.add_argument(
        "--bank-size", type=int, metavar="ENTRIES",
        help="keep this many patches in the memory bank instead of a share: model size and scoring time stay fixed and the fit time grows "
        "linearly with the number of images (see docs/fitting.md, 'Choosing it')",
    )
    group.add_argument("--neighbors", type=int, default=9, help="bank neighbours in the image-score re-weighting, eq. 7 (default: %(default)s)")
    group.add_argument("--seed", type=int, default=42, help="seed for the projection and the first coreset pick (default: %(default)s)")
    parser.add_argument_group("fitting").add_argument(
        "--temp-dir", metavar="DIR", help="folder for the training features while the fit runs, about 0.5 KB a patch with mobilenet_v2, 3 KB with wide_resnet50_2 (default: $TMPDIR or /tmp)"
    )
    _add_rate_option(group, f"expected share of good images flagged; the threshold is set from the training images scored leave-one-out (default: {DEFAULT_FALSE_ALARM_RATE})")
    group.add_argument(
        "--contamination", type=_contamination, metavar="{auto,off,FRACTION}",
        help="defective images among the good ones: auto (default) sets aside the training images whose leave-one-out scores stand out as a defect's do; "
        "FRACTION (e.g. 0.1) sets aside that share of the highest-scoring; off keeps them all. Set-aside images stay out of the memory bank and the threshold, "
        "and are listed with a picture each beside the model (with --update: the model's own setting unless given)",
    )


def _contamination(text: str) -> str | float:
    try:
        return parse_contamination(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_rate_option(group: argparse._ArgumentGroup, text: str, default: float | None = DEFAULT_FALSE_ALARM_RATE) -> None:
    group.add_argument("--false-alarm-rate", type=float, default=default, metavar="RATE", help=text)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("running")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=8, help="images per backbone batch (default: %(default)s)")
    group.add_argument("--index", choices=["exact", "ivf"], help="nearest-neighbour search: exact (default at fit) or ivf, approximate and faster on large banks; test/predict default: the model's")
    _add_pixel_limit(group, DEFAULT_MAX_IMAGE_PIXELS)
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_pixel_limit(group: argparse._ArgumentGroup, default: int) -> None:
    group.add_argument(
        "--max-image-pixels", type=_pixel_count, default=default, metavar="PIXELS",
        help="refuse images with more pixels, from their headers, before decoding them (default: %(default)s)",
    )


def _pixel_count(text: str) -> int:
    value = int(text)
    if value < 64:
        raise argparse.ArgumentTypeError(f"must be at least 64, got {value}")
    return value


def _add_ray_options(parser: argparse.ArgumentParser, ray_help: str, actors_help: str) -> None:
    cluster = parser.add_argument_group("Ray (pip install 'patchcore[ray]')")
    cluster.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help=ray_help)
    cluster.add_argument("--ray-actors", type=int, metavar="N", help=actors_help)


def _add_record_options(parser: argparse.ArgumentParser, server: bool) -> None:
    record = parser.add_argument_group("the inspection record (docs: the record)")
    if server:
        record.add_argument(
            "--record", metavar="URL", help="where every decision is kept: a SQLite file or URL, or postgresql+psycopg://USER@HOST/DB for several servers; "
            "'off' keeps none (default: $XDG_STATE_HOME/patchcore/record.sqlite, i.e. ~/.local/state/patchcore/record.sqlite)",
        )
        record.add_argument("--station", help="the station (camera, line) decisions are made at; a request's ?station= overrides it (default: this machine's name)")
    else:
        record.add_argument("--record", metavar="URL", help="also keep each decision in this record (a SQLite file or URL, or a PostgreSQL URL)")
        record.add_argument("--station", help="the station the decisions are kept under (default: this machine's name)")
    record.add_argument("--keep-images", choices=KEEP_POLICIES, default="none", help="keep the images themselves too: of flagged decisions, or all (default: %(default)s)")
    record.add_argument("--keep-dir", metavar="DIR", help="folder of kept images (default: beside a SQLite record, RECORD.images; needed for a PostgreSQL record)")
    record.add_argument("--keep-max-gb", type=float, default=DEFAULT_KEEP_MAX_GB, metavar="GB", help="most the kept images may take; the oldest unreviewed go first, a reviewed one never (default: %(default)s)")
    record.add_argument("--keep-days", type=float, metavar="DAYS", help="remove decisions older than this (never reviewed ones, unless --prune-reviewed; default: keep all)")
    record.add_argument("--prune-reviewed", action="store_true", help="let --keep-days remove reviewed decisions and their reviews too")
    record.add_argument("--record-spool", metavar="FILE", help="a PostgreSQL record's local spool, where decisions wait while the database does not answer (default: in $XDG_STATE_HOME/patchcore)")
    record.add_argument("--record-offline-ok", action="store_true", help="start even if the record's database does not answer, spooling decisions until it does (default: stop with an error)")


def _record_options(args: argparse.Namespace):
    """The record's options from the command line; None when there is to be no record."""
    location = args.record
    if location is None and args.command != "serve":
        return None
    if location is not None and location.strip().lower() == "off":
        return None
    from .record.recorder import RecordOptions  # only now: an install that only predicts may lack the record's packages

    return RecordOptions(
        location=location, station=args.station, keep_images=args.keep_images, keep_dir=args.keep_dir, keep_max_gb=args.keep_max_gb,
        keep_days=args.keep_days, prune_reviewed=args.prune_reviewed, spool=args.record_spool, offline_ok=args.record_offline_ok,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchcore", description="Find and outline defects after learning only from good images (PatchCore).")
    parser.add_argument("--version", action="version", version=f"patchcore {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = commands.add_parser("fit", help="fit a model on good images")
    fit.add_argument("data", nargs="?", help="an MVTec-layout category folder (uses train/good) or any folder of good images (optional with --update --from-record)")
    fit.add_argument("--out", required=True, metavar="MODEL", help="model file to write (.safetensors)")
    fit.add_argument(
        "--update", action="store_true",
        help="add DATA's good images to the existing model MODEL (its settings are kept; the model options here are ignored) instead of fitting a new one",
    )
    feedback = fit.add_argument_group("feedback from the inspection record (with --update)")
    feedback.add_argument(
        "--from-record", metavar="URL",
        help="also add the kept images of decisions reviewed as false alarms in this record (a SQLite file or URL, or a PostgreSQL URL): "
        "the latest review counts, an image any decision's latest review calls a confirmed defect never goes in, and an image the model already passes is skipped",
    )
    feedback.add_argument(
        "--model-name", metavar="NAME",
        help="the model's name in the record: its decisions, of every version of the file, are the ones read (default: MODEL's file stem, "
        "the name serve gives without --name and predict --record gives)",
    )
    feedback.add_argument("--keep-dir", metavar="DIR", help="the record's kept images (default: beside a SQLite record, RECORD.images; needed for a PostgreSQL record)")
    _add_fit_options(fit)
    _add_run_options(fit)
    _add_ray_options(
        fit, "extract the features on Ray (the coreset is chosen here, from their 128-d projection): alone (or as --ray=), on a new local Ray instance; "
        "with the address of a cluster's head (HOST:PORT), on that cluster. The model is the local fit's",
        "feature actors (default: as many as the cluster holds, each with this machine's PyTorch threads)",
    )

    test = commands.add_parser("test", help="score an MVTec-layout test set and write metrics, scores and pictures")
    test.add_argument("model", help="model file")
    test.add_argument("data", help="category folder with test/ and ground_truth/")
    test.add_argument("--out", required=True, metavar="RESULTS", help="folder for metrics.json, scores.csv, images/")
    test.add_argument("--no-pictures", action="store_true", help="skip the per-image pictures")
    _add_rate_option(test.add_argument_group("decision"), "cut at this false-alarm rate instead of the model's (from the good scores it stores)", None)
    _add_run_options(test)

    train = commands.add_parser("train", help="fit, then test, and print the metrics")
    train.add_argument("data", help="MVTec-layout category folder")
    train.add_argument("--out", required=True, metavar="DIR", help="folder for model.safetensors and the test results")
    train.add_argument("--no-pictures", action="store_true", help="skip the per-image pictures")
    _add_fit_options(train)
    _add_run_options(train)

    predict = commands.add_parser("predict", help="score images: a JSON line and a heat-map picture each")
    predict.add_argument("model", help="model file")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    predict.add_argument("--out", required=True, metavar="DIR", help="folder for predictions.jsonl and images/")
    decision = predict.add_argument_group("decision")
    decision.add_argument("--threshold", type=float, help="raw-score threshold instead of the calibrated one")
    _add_rate_option(decision, "cut at this false-alarm rate instead of the model's (from the good scores it stores)", None)
    predict.add_argument("--no-pictures", action="store_true", help="skip the heat-map pictures")
    predict.add_argument("--picture-format", type=_picture_format, default="jpg", metavar="{jpg,jpeg,png}", help="format of the pictures: jpg or jpeg (quality 90; default) or png (lossless, about 7x larger and slower to write)")
    _add_run_options(predict)
    _add_record_options(predict, server=False)
    _add_ray_options(
        predict, "score on Ray: alone (after the PATHs, or as --ray=), on a new local Ray instance; with the address of a cluster's head "
        "(HOST:PORT), on that cluster. PATHs may then also be URIs Ray Data reads (s3://..., gs://...)",
        "scoring actors, one model each (default: one per CPU of the cluster)",
    )

    export = commands.add_parser("export", help="export a model to ONNX or OpenVINO: one graph from images to scores and maps")
    export.add_argument("model", help="model file")
    export.add_argument("--format", choices=["onnx", "openvino"], default="onnx", help="(default: %(default)s)")
    export.add_argument("--out", required=True, metavar="PATH", help="file to write: MODEL.onnx, or MODEL.xml (+ .bin and .json) for OpenVINO")

    serve = commands.add_parser("serve", help="serve a model over HTTP: scoring, health, metrics, reload, and an inspection page at /")
    serve.add_argument("model", help="model file")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    serve.add_argument("--name", help="the model's name in the routes /v2/models/NAME/... (default: the file's stem)")
    serve.add_argument("--max-batch", type=int, default=8, help="images per backbone batch, gathered from concurrent requests (default: %(default)s)")
    serve.add_argument("--max-wait-ms", type=float, default=10.0, help="longest wait for a batch to fill once an image waits (default: %(default)s)")
    serve.add_argument("--max-queue", type=int, default=64, help="images waiting at most; more get 503 with Retry-After; keep it at least --max-batch, or batches stay smaller (default: %(default)s)")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    limits = serve.add_argument_group("limits (see docs/serving.md, 'A memory budget, checked before decoding', for how they relate)")
    limits.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body; larger get 413 (default: %(default)s)")
    _add_pixel_limit(limits, DEFAULT_SERVER_MAX_IMAGE_PIXELS)
    limits.add_argument(
        "--max-memory-mb", type=float, metavar="MB",
        help="memory budget of all requests together, reserved from each image's header before decoding; requests that do not fit wait "
        "briefly, then get 503 with Retry-After (default: 1/24 of this machine's memory, at least 512 and at most 4096)",
    )
    limits.add_argument("--max-request-memory-mb", type=float, metavar="MB", help="most memory one request may hold; more get 413 (default: the budget less the quarter kept for small requests)")
    limits.add_argument("--max-tiles", type=int, default=100, help="tile-mode models: most tiles an image may need; more get 413 (default: %(default)s)")
    limits.add_argument("--max-connections", type=int, default=64, help="open connections at most; more get 503 with Retry-After (default: %(default)s)")
    limits.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS", help="a request's body must arrive within this; else 408 (default: %(default)s)")
    limits.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS", help="a request's headers must arrive within this; else 408 (default: %(default)s)")
    limits.add_argument(
        "--refusal-delay", type=float, default=1.0, metavar="SECONDS",
        help="answer a request refused for its content (400, 401, 413, 415, 422, nothing scored) after this, so that a client repeating it "
        "back to back cannot keep the server busy; 0 answers at once (default: %(default)s)",
    )
    _add_record_options(serve, server=True)
    guard = serve.add_argument_group("access")
    guard.add_argument("--admin-token-file", metavar="FILE", help="allow reloading over HTTP with this token (Authorization: Bearer TOKEN); also $PATCHCORE_ADMIN_TOKEN. Default: reload by SIGHUP only")
    guard.add_argument("--api-key-file", metavar="FILE", help="scoring and model metadata need an API key: one 'NAME KEY' pair a line (default: open)")
    guard.add_argument(
        "--allowed-hosts", nargs="+", metavar="HOST",
        help="Host names and addresses the server answers to ('*.example.com' for a domain, '*' for any; default: localhost and the bound address, "
        "with --host 0.0.0.0 this machine's names and addresses, printed at start)",
    )
    guard.add_argument("--ssl-certfile", metavar="FILE", help="serve HTTPS with this certificate (PEM), with --ssl-keyfile")
    guard.add_argument("--ssl-keyfile", metavar="FILE", help="the certificate's private key (PEM)")

    record = commands.add_parser("record", help="read the inspection record: decisions as CSV, JSON lines or Parquet")
    record.add_argument("url", metavar="URL", help="the record: a SQLite file or URL, or a PostgreSQL URL")
    record.add_argument("--model", metavar="NAME", help="decisions of this model only (its served name)")
    record.add_argument("--since", metavar="TIME", help="from this UTC date or time on (ISO-8601, e.g. 2026-12-01 or 2026-12-01T22:00)")
    record.add_argument("--until", metavar="TIME", help="before this UTC date or time")
    record.add_argument("--decision", choices=["anomalous", "good"])
    record.add_argument("--station")
    record.add_argument("--part")
    record.add_argument("--reviewed", choices=["yes", "no", "false_alarm", "confirmed_defect"], help="by review: any, none, or the latest review's verdict")
    record.add_argument("--format", choices=["csv", "jsonl", "parquet"], default="csv", help="(default: %(default)s; CSV cells a spreadsheet would run as formulas are written as text)")
    record.add_argument("--out", metavar="FILE", help="file to write (default: standard output; Parquet needs a file)")

    drift = commands.add_parser("drift", help="the drift watch from the record: flag rate and score shift per model and station (exit status 3 on an alarm)")
    drift.add_argument("url", metavar="URL", help="the record: a SQLite file or URL, or a PostgreSQL URL")
    drift.add_argument("--model", metavar="NAME", help="this model only (default: every model's latest version)")
    drift.add_argument("--station", help="this station only")

    bench = commands.add_parser("benchmark", help="fit and test every category under an MVTec AD root; write the seed's tables")
    bench.add_argument("root", help="MVTec AD root (a folder of category folders)")
    bench.add_argument("--backbone", nargs="+", required=True, choices=BACKBONE_NAMES, metavar="NAME", help="one or more of: %(choices)s")
    bench.add_argument("--weights", nargs="+", default=[], metavar="NAME=FILE", help="weights file per backbone, e.g. resnet18=resnet18-f37072fd.pth")
    bench.add_argument("--out", required=True, metavar="DIR", help="folder for benchmark.md, benchmark.json and each run")
    bench.add_argument("--pictures", action="store_true", help="also write the per-image pictures")
    _add_fit_options(bench, single_backbone=False)
    _add_run_options(bench)
    return parser


def _model_options(args: argparse.Namespace) -> dict:
    return {
        "input_mode": args.input_mode,
        "image_size": args.image_size,
        "center_crop": args.center_crop,
        "scale": args.scale,
        "tile_size": args.tile_size,
        "tile_overlap": args.tile_overlap,
        "coreset_ratio": args.coreset_ratio,
        "bank_size": args.bank_size,
        "num_neighbors": args.neighbors,
        "seed": args.seed,
        "false_alarm_rate": args.false_alarm_rate,
        "contamination": DEFAULT_CONTAMINATION if args.contamination is None else args.contamination,
        "device": args.device,
        "batch_size": args.batch_size,
        "index": args.index or "exact",
        "temp_dir": args.temp_dir,
        "max_image_pixels": args.max_image_pixels,
        "progress": not args.quiet,
    }


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _fit(args: argparse.Namespace, out: Path):
    from .model import PatchCore

    images = training_images(args.data)
    model = PatchCore(args.backbone, layers=args.layers, weights=args.weights, **_model_options(args))
    started = time.perf_counter()
    if getattr(args, "ray", None) is not None:
        from .distributed.fit import fit_on_ray

        if args.ray_actors is not None and args.ray_actors < 1:
            raise ValueError(f"--ray-actors must be at least 1, got {args.ray_actors}")
        fit_on_ray(model, images, args.ray or None, args.ray_actors)
        nodes = model.fit_images_per_node_
        _log(f"features extracted on Ray by {model.fit_workers_} actors on {len(nodes)} nodes (images per node: {', '.join(map(str, sorted(nodes.values())))})")
    elif getattr(args, "ray_actors", None) is not None:
        raise BadInputError("--ray-actors is an option of --ray")
    else:
        model.fit(images)
    elapsed = time.perf_counter() - started
    for message in model.skipped_:
        _log(f"skipped {message}")
    model.save(out)
    report = write_calibration_report(model, out.with_suffix(".calibration.csv"))
    bank = model.memory_bank_.shape
    _log(
        f"fitted {model.num_fit_images_} images in {elapsed:.1f} s; memory bank {bank[0]} x {bank[1]}; input {model.layout_.describe()}; "
        f"temporary features {model.fit_disk_bytes_ / 1e9:.2f} GB on disk (removed); wrote {out}"
    )
    _log_contamination(model, out)
    _log_calibration(model.calibration_, report)
    return model, elapsed


def _log_contamination(model, out: Path) -> None:
    """The check's line, and, when it found any, the report beside the model."""
    check = model.contamination_
    if check is None:
        return
    table, pictures = out.with_suffix(".set_aside.csv"), out.with_suffix(".set_aside")
    if check.suspects:
        write_contamination_report(model, table, pictures)
        _log(f"{check.describe()}: each with its score and reason in {table}, a picture each in {pictures}{os.sep}")
    else:
        # an earlier fit's list must not stand beside a model that set nothing aside
        table.unlink(missing_ok=True)
        shutil.rmtree(pictures, ignore_errors=True)
        _log(check.describe())


def write_contamination_report(model, table: Path, pictures: Path) -> None:
    """The training images the check set aside or listed, highest first, to ``table`` (CSV), and a
    picture of each set-aside image scored by the model, its suspicious region outlined as
    ``predict`` outlines defects, in ``pictures`` (a picture of an earlier update's image whose
    file is gone is left out)."""
    from .render import predict_picture, save_picture

    suspects = sorted(model.contamination_.suspects, key=lambda suspect: -suspect.z)
    paths = [s.path for s in suspects if s.set_aside and Path(s.path).is_file()]
    names = _picture_names([Path(p) for p in paths], [str(Path(p).parent) for p in paths], "jpg")
    pictures.mkdir(parents=True, exist_ok=True)
    for stale in pictures.glob("*.jpg"):  # a refit's pictures replace the last one's
        stale.unlink()
    drawn = {}
    for prediction in model.predict(paths, keep_images=True):
        if prediction.error is None:
            name = names[prediction.source]
            save_picture(pictures / name, predict_picture(prediction.image, prediction.map_at, model.calibration_, prediction.score, prediction.is_anomalous))
            drawn[prediction.source] = name
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "leave_one_out_score", "robust_z", "set_aside", "reason", "picture"])
        for s in suspects:
            writer.writerow([s.path, f"{s.score:.6f}", f"{s.z:.2f}", int(s.set_aside), s.reason, drawn.get(s.path, "")])


def write_calibration_report(model, path: Path) -> Path:
    """The training images' leave-one-out scores, highest first: which good images look least typical."""
    calibration = model.calibration_
    rows = sorted(zip(model.calibration_sources_, calibration.good_scores, calibration.good_map_peaks), key=lambda row: -row[1])
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score", "normalized_score", "map_peak", "flagged"])
        for source, score, peak in rows:
            writer.writerow([source, f"{score:.6f}", f"{float(calibration.normalize_scores(score)):.6f}", f"{peak:.6f}", int(score >= calibration.image_threshold)])
    return path


def _log_calibration(calibration, report: Path | None = None) -> None:
    _log(calibration.describe() + (f"; each training image's score in {report}" if report else ""))
    if calibration.warning:
        _log(f"warning: {calibration.warning}")


def _update(args: argparse.Namespace, out: Path) -> None:
    from .model import PatchCore

    if not out.is_file():
        raise BadInputError(f"'{out}': no model to update (fit one first, without --update)")
    images = training_images(args.data) if args.data is not None else []
    feedback = _reviewed_false_alarms(args, out) if args.from_record is not None else None
    model = PatchCore.load(out, device=args.device, batch_size=args.batch_size, index=args.index, progress=not args.quiet, max_image_pixels=args.max_image_pixels)
    model.temp_dir = args.temp_dir
    if args.contamination is not None:
        model.contamination = args.contamination
    reviewed = [] if feedback is None else _still_flagged(model, feedback, out)
    if feedback is not None and not reviewed and not images:
        # nothing to correct is no failure (a nightly run after the reviews were all taken in)
        _log(f"the model already passes every reviewed false alarm ({len(feedback.images)}): nothing to add; {out} unchanged")
        return
    images = list(images) + reviewed
    before, calibration, fitted_before = model.memory_bank_.shape[0], model.calibration_, model.num_fit_images_
    started = time.perf_counter()
    model.update(images, trusted=reviewed)  # reviewed as good by a person: never set aside
    for message in model.skipped_:
        _log(f"skipped {message}")
    model.save(out)  # written to a temporary file, then renamed: the old model survives any failure
    _log(
        f"added {model.num_fit_images_ - fitted_before} images in {time.perf_counter() - started:.1f} s; memory bank "
        f"{before} -> {model.memory_bank_.shape[0]} entries; {model.num_fit_images_} images in all; wrote {out}"
    )
    _log_contamination(model, out)
    _log_calibration(model.calibration_)
    if feedback is not None:
        new = model.calibration_
        passing = sum(1 for p in model.predict(reviewed) if p.error is None and not p.is_anomalous)
        print(f"threshold {calibration.image_threshold:.6g} -> {new.image_threshold:.6g}")
        print(f"expected false-alarm rate {_expected_rate(calibration)} -> {_expected_rate(new)}")
        print(f"{passing} of {len(reviewed)} reviewed false alarms now pass (score below {new.image_threshold:.6g})")
        print(f"memory bank {before} -> {model.memory_bank_.shape[0]} entries")


def _reviewed_false_alarms(args: argparse.Namespace, out: Path):
    """``--from-record``: the kept images reviewed as false alarms of the model (one-line errors
    for a record that cannot be read or holds none)."""
    from .record.feedback import reviewed_false_alarms
    from .record.store import RecordStore, default_keep_dir

    store = RecordStore.open(args.from_record, create=False)
    name = args.model_name or out.stem
    try:
        keep_dir = args.keep_dir or default_keep_dir(store.url)
        if keep_dir is None:
            raise BadInputError(f"'{store.where}': --from-record with a database server's record needs --keep-dir (the folder its servers keep images in)")
        feedback = reviewed_false_alarms(store, name, keep_dir)
        names = sorted({model["name"] for model in store.models()})
    finally:
        store.close()
    missing, defects = len(feedback.missing_decision_ids), len(feedback.defect_sha256s)
    unkept = f"{missing} reviewed false alarms have no kept image in {keep_dir}; serve with --keep-images flagged (or give --keep-dir)"
    left_out = f"left out {defects} images reviewed as false alarms that another decision's latest review calls a confirmed defect"
    if not feedback.images:
        if missing or defects:
            reasons = [unkept] * bool(missing) + [left_out] * bool(defects)
            raise BadInputError(f"'{store.where}': no reviewed false alarm of model '{name}' to add: {'; '.join(reasons)}")
        raise BadInputError(
            f"'{store.where}': no decision of model '{name}' reviewed as a false alarm (models in the record: {', '.join(names) or 'none'}; --model-name picks one)"
        )
    if missing:
        _log(f"warning: {unkept}")
    if defects:
        _log(left_out)
    _log(f"from {store.where}: {len(feedback.images)} images reviewed as false alarms of model '{name}' ({feedback.num_decisions} decisions)")
    return feedback


def _still_flagged(model, feedback, out: Path) -> list[Path]:
    """The reviewed false alarms the model still flags: one it passes needs no correcting, and one
    added by an earlier ``--from-record`` must not go in twice (a twin in the bank scores its
    copy near 0, which would pull the threshold down)."""
    paths = [image.path for image in feedback.images]
    flagged, passing = [], 0
    for prediction in model.predict(paths):
        if prediction.error is not None:
            _log(f"skipped {prediction.error}")
        elif prediction.is_anomalous:
            flagged.append(Path(prediction.source))
        else:
            passing += 1
    if passing:
        _log(f"{passing} of the {len(paths)} reviewed false alarms already pass {out.name} (score below {model.calibration_.image_threshold:.6g}): not added again")
    return flagged


def _expected_rate(calibration) -> str:
    """The calibration's expected false-alarm rate and its interval, as its description states them."""
    from .calibrate import INTERVAL_CONFIDENCE

    if calibration.expected_false_alarm_rate is None:
        return "unknown (model format 1)"
    low, high = calibration.false_alarm_interval
    return f"{calibration.expected_false_alarm_rate:.1%} ({INTERVAL_CONFIDENCE:.0%} interval {low:.1%} to {high:.1%})"


def _test(model, args: argparse.Namespace, out: Path) -> dict:
    from .evaluate import evaluate, explain_decision, metrics_table

    metrics = evaluate(model, args.data, out, pictures=not args.no_pictures, report=_log)
    print(metrics_table(metrics))
    print("\n".join(explain_decision(metrics)))
    _log(f"scored {metrics['num_test_images']} images at {metrics['images_per_second']:.1f} images/s; wrote {out / 'metrics.json'}, {out / 'scores.csv'}")
    return metrics


def run(args: argparse.Namespace) -> int:
    if args.command == "fit" and args.update and args.ray is not None:
        raise BadInputError("--update runs on this machine only: drop --ray")
    if args.command == "fit" and args.from_record is not None and not args.update:
        raise BadInputError("--from-record is an option of --update (it adds reviewed false alarms to an existing model)")
    if args.command == "fit" and args.data is None and args.from_record is None:
        raise BadInputError("fit needs DATA, the folder of good images (only fit --update --from-record URL may leave it out)")
    if args.command == "fit" and args.update:
        _update(args, Path(args.out))
    elif args.command == "fit":
        _fit(args, Path(args.out))
    elif args.command == "test":
        model = _load(args)
        _test(model, args, Path(args.out))
    elif args.command == "train":
        out = Path(args.out)
        model, fit_seconds = _fit(args, out / "model.safetensors")
        metrics = _test(model, args, out)
        metrics["fit_seconds"] = fit_seconds
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    elif args.command == "predict":
        return _predict(args)
    elif args.command == "serve":
        return _serve(args)
    elif args.command == "export":
        return _export(args)
    elif args.command == "record":
        return _read_record(args)
    elif args.command == "drift":
        return _drift(args)
    elif args.command == "benchmark":
        from .benchmark import run_benchmark

        weights = dict(_split_weights(item) for item in args.weights)
        summary = run_benchmark(args.root, args.backbone, args.out, _model_options(args), weights, pictures=args.pictures, report=_log)
        print((Path(args.out) / "benchmark.md").read_text())
        if all("error" in cell for per in summary["results"].values() for cell in per.values()):
            return 2
    return 0


def _load(args: argparse.Namespace):
    """The model of ``test`` and ``predict``, its cut moved to ``--false-alarm-rate`` when given.
    An exported file (.onnx, or OpenVINO's .xml) is scored with the runtime."""
    from .scoring import load_model

    model = load_model(
        args.model, device=args.device, batch_size=args.batch_size,
        index=args.index, false_alarm_rate=args.false_alarm_rate, progress=not args.quiet, max_image_pixels=args.max_image_pixels,
    )
    if args.false_alarm_rate is not None:
        _log_calibration(model.calibration_)
    return model


def _picture_format(name: str) -> str:
    try:
        return picture_format(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _split_weights(item: str) -> tuple[str, str]:
    name, separator, file = item.partition("=")
    if not separator or name not in BACKBONE_NAMES:
        raise ValueError(f"--weights takes NAME=FILE with NAME one of {', '.join(BACKBONE_NAMES)}, got {item!r}")
    return name, file


def _export(args: argparse.Namespace) -> int:
    from .model import PatchCore

    try:
        from .export import export_model
    except ImportError as error:
        raise BadInputError(f"export needs the exporters' packages ({error.name} is missing): pip install 'patchcore[export]'") from None
    model = PatchCore.load(args.model, device="cpu", progress=False)
    started = time.perf_counter()
    path = export_model(model, args.out, args.format)
    written = [path] + ([path.with_suffix(".bin"), path.with_suffix(".json")] if args.format == "openvino" else [])
    written += [p for p in [path.with_name(path.name + ".data")] if args.format == "onnx" and p.exists()]
    size = sum(p.stat().st_size for p in written)
    _log(f"exported {args.model} to {args.format} in {time.perf_counter() - started:.1f} s: {', '.join(map(str, written))} ({size / 1e6:.1f} MB)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from .serve import serve
    except ImportError as error:
        raise BadInputError(f"serve needs the server's packages ({error.name} is missing): pip install 'patchcore[serve]'") from None
    from .serve import AccessRules, ServerLimits

    limits = ServerLimits(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_request_mb=args.max_request_mb,
        max_image_pixels=args.max_image_pixels, max_memory_mb=args.max_memory_mb, max_request_memory_mb=args.max_request_memory_mb,
        max_tiles=args.max_tiles, max_connections=args.max_connections, read_timeout_s=args.read_timeout,
        header_timeout_s=args.header_timeout, refusal_delay_s=args.refusal_delay,
    )
    access = AccessRules.from_files(args.admin_token_file, args.api_key_file)
    return serve(
        args.model, host=args.host, port=args.port, name=args.name, device=args.device, limits=limits, access=access,
        allowed_hosts=args.allowed_hosts, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, record=_record_options(args),
    )


def _read_record(args: argparse.Namespace) -> int:
    from .record.export import write_decisions
    from .record.store import RecordStore, parse_time

    store = RecordStore.open(args.url, create=False)
    filters = dict(
        model_name=args.model, decision=args.decision, station=args.station, part=args.part, reviewed=args.reviewed,
        since=parse_time(args.since, "--since") if args.since else None, until=parse_time(args.until, "--until") if args.until else None,
    )
    count = write_decisions(store.iter_decisions(**filters), args.format, args.out)
    _log(f"{count} decisions" + (f"; wrote {args.out}" if args.out else ""))
    return 0


def _drift(args: argparse.Namespace) -> int:
    from .record.monitor import drift_report
    from .record.store import RecordStore

    store = RecordStore.open(args.url, create=False)
    report = drift_report(store, model_name=args.model, station=args.station)
    if not report:
        _log(f"no decisions in {store.where}" + (f" of model '{args.model}'" if args.model else "") + (f" at station '{args.station}'" if args.station else ""))
        return 0
    for entry in report:
        status = entry["status"]
        state = "ALARM" if status["alarm"] else "ok"
        print(f"{entry['model_name']} ({entry['model_sha256'][:12]}) at {entry['station']}: {state}: {status['reason']}")
    return 3 if any(entry["status"]["alarm"] for entry in report) else 0


def _predict(args: argparse.Namespace) -> int:
    if args.ray is not None:
        return _predict_on_ray(args)
    if args.ray_actors is not None:
        raise BadInputError("--ray-actors is an option of --ray")
    from .render import PictureWriter, predict_picture

    model = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = expand_paths(args.paths)
    if not paths:
        raise BadInputError(f"no files found in {', '.join(args.paths)}")
    names = _picture_names(paths, args.paths, args.picture_format)
    options = _record_options(args)
    recording = _PredictRecord(model, options, args) if options is not None else None
    with PictureWriter() as pictures:
        results = (
            (
                prediction.to_record() if recording is None else recording.kept(prediction),
                names.get(prediction.source),
                None if args.no_pictures or prediction.error is not None else partial(
                    pictures.submit,
                    render=partial(predict_picture, prediction.image, prediction.map_at, model.calibration_, prediction.score, prediction.is_anomalous),
                ),
            )
            for prediction in model.iter_predictions(paths, keep_images=not args.no_pictures, threshold=args.threshold)
        )
        scored, failed = _write_predictions(out, results)
    if recording is not None:
        _log(recording.close())
    _log(f"scored {scored} images, skipped {failed}; wrote {out / 'predictions.jsonl'}")
    return 0 if scored else 2


class _PredictRecord:
    """``predict --record``: each decision kept in the record (and its image, as --keep-images
    says), under the model file's stem as the model's name."""

    def __init__(self, model, options, args: argparse.Namespace) -> None:
        from .data import file_sha256
        from .record.recorder import Recorder

        self.recorder = Recorder(options)
        self.model, self.name = model, Path(args.model).stem
        self.sha256 = file_sha256(args.model)
        self.rule = model.calibration_.describe() if args.threshold is None else f"raw-score threshold {args.threshold:g} (--threshold)"
        self.engine = model.metadata()["engine"]
        self.recorder.register(model, self.sha256, self.name).result()
        self.pending = []

    def kept(self, prediction) -> dict:
        """The prediction's JSON record, with the id of its decision in the record."""
        from .data import file_sha256
        from .record.recorder import decision_row, new_decision_id

        result = prediction.to_record()
        if prediction.error is not None:
            return result
        source = Path(prediction.source)
        images = []
        if self.recorder.wants_image(prediction.is_anomalous):
            from .intake import read_header

            data = source.read_bytes()  # read once: its checksum and the kept copy
            digest = hashlib.sha256(data).hexdigest()
            images.append(self.recorder.keep_image(data, digest, read_header(data, str(source)).format))
        else:
            digest = file_sha256(source)
        row = decision_row(
            result, decision_id=new_decision_id(), station=self.recorder.options.station, part=None, model_name=self.name,
            model_sha256=self.sha256, engine=self.engine, decision_rule=self.rule, image_sha256=digest, file_name=str(source),
            latency_ms=None, image_kept=bool(images),
        )
        self.pending.append(self.recorder.submit([row], images))
        result["decision_id"] = row["id"]
        return result

    def close(self) -> str:
        for future in self.pending:
            future.result()
        self.recorder.close()
        return f"kept {len(self.pending)} decisions in {self.recorder.where}"


def _write_predictions(out: Path, results) -> tuple[int, int]:
    """Writes ``predictions.jsonl`` from (record, picture name, save) per image, in order, where
    ``save(path)`` writes the image's picture (None: no picture); reports each image skipped.
    Local and Ray ``predict`` both write through here. Returns (images scored, images skipped)."""
    scored = failed = 0
    with open(out / "predictions.jsonl", "w") as lines:
        for record, name, save in results:
            if "error" in record:
                failed += 1
                _log(f"skipped {record['error']}")
            else:
                scored += 1
                if save is not None:
                    picture = out / "images" / name
                    save(picture)
                    record["picture"] = str(picture)
            lines.write(json.dumps(record) + "\n")
    return scored, failed


def _predict_on_ray(args: argparse.Namespace) -> int:
    """``predict --ray``: the same lines and pictures as :func:`_predict`, scored by a Ray actor pool."""
    from .distributed import RayScoring, import_ray, is_uri

    import_ray()  # before anything slow: without Ray, one line naming the extra
    _load(args)  # checks the model file and the options here, with their one-line errors, before Ray starts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    uris = [p for p in args.paths if is_uri(p)]
    if uris and len(uris) < len(args.paths):
        raise BadInputError(f"--ray: give either local files and folders or URIs, not both (URIs: {', '.join(uris)})")
    paths = [] if uris else expand_paths(args.paths)
    if not uris and not paths:
        raise BadInputError(f"no files found in {', '.join(args.paths)}")
    names = _PictureNames(args.paths, args.picture_format)
    with RayScoring(
        args.model, args.ray or None, actors=args.ray_actors, pictures=None if args.no_pictures else args.picture_format, threshold=args.threshold,
        false_alarm_rate=args.false_alarm_rate, device=args.device, batch_size=args.batch_size, index=args.index, progress=not args.quiet,
        max_image_pixels=args.max_image_pixels,
    ) as ray_scoring:
        results = (
            (result.record, names(result.record["path"]), None if result.picture is None else partial(_write_picture, data=result.picture))
            for result in (ray_scoring.score_uris(uris) if uris else ray_scoring.score_files(paths))
        )
        scored, failed = _write_predictions(out, results)
        _log(f"scored {scored} images, skipped {failed}; wrote {out / 'predictions.jsonl'}")
        _log(ray_scoring.describe())
    return 0 if scored else 2


def _write_picture(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class _PictureNames:
    """A unique picture name per input, given in order: its path below the argument folder it was
    found in, '/' as '__' (a file given, or a URI: its name), then .jpg or .png; a name taken
    gets _2, _3, ..."""

    def __init__(self, arguments: Sequence[str], picture_format: str) -> None:
        self.roots = [Path(a) for a in arguments if Path(a).is_dir()]
        self.suffix = f".{picture_format}"
        self.taken: set[str] = set()

    def __call__(self, source: str | Path) -> str:
        path = Path(source)
        root = next((r for r in self.roots if path.is_relative_to(r)), path.parent)
        stem = "__".join(path.relative_to(root).with_suffix("").parts)
        candidate, number = stem + self.suffix, 1
        while candidate in self.taken:
            number += 1
            candidate = f"{stem}_{number}{self.suffix}"
        self.taken.add(candidate)
        return candidate


def _picture_names(paths: list[Path], arguments: Sequence[str], picture_format: str) -> dict[str, str]:
    """A unique picture name per input path (see :class:`_PictureNames`)."""
    name = _PictureNames(arguments, picture_format)
    return {str(path): name(path) for path in paths}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # OpenMP threads (torch's and numba's) spin while they wait for work. Beside the threads that
    # decode images and write pictures, on as many cores, the spinning takes the cores the work
    # needs: waiting passively made predict a few percent faster here. Set before torch loads
    # OpenMP (nothing above imports it); a value the user set is kept. Here, not on import, so
    # that a program importing the package keeps its own settings.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    own_the_pixel_limit()  # every image this process reads goes through the intake and its --max-image-pixels
    try:
        return run(args)
    except (BadInputError, ClusterError, ModelFileError, WeightsError, ValueError) as error:
        print(f"patchcore: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("patchcore: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as error:
        if not is_missing_pytorch(error):
            raise
        print(
            f"patchcore: error: {args.command} needs PyTorch ({error}): pip install 'patchcore[full]'; "
            "this install can predict with and serve exported models (.onnx, .xml)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
