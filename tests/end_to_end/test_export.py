"""Exported models (ONNX, OpenVINO) give the library's numbers: scores, maps and decisions."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import openvino
import pytest
import torch
from sklearn.metrics import roc_auc_score

from patchcore import PatchCore
from patchcore.cli import main
from patchcore.data import list_test_samples, prepare_image
from patchcore.intake import read_image
from patchcore.export import export_model
from patchcore.formats import EXPORT_FORMAT_VERSION
from patchcore.runtime import OPENVINO_COMPILE_CONFIG

#: every 4th bottle test image: 21 images, 5 good and 16 defective
SUBSET = slice(0, None, 4)


@pytest.fixture(scope="module")
def library(bottle_model_file) -> PatchCore:
    return PatchCore.load(bottle_model_file, device="cpu", progress=False)


@pytest.fixture(scope="module")
def subset(data_root, library):
    samples = list_test_samples(data_root / "mvtec_ad" / "bottle")[SUBSET]
    images = np.stack([prepare_image(s.path, read_image(s.path), library.layout_).array for s in samples])
    predictions = library.predict([s.path for s in samples])
    return samples, images, predictions


@pytest.fixture(scope="module")
def exported(bottle_exports) -> Path:
    """The folder of the session's exports: bottle.onnx and ov/bottle.xml (conftest.py)."""
    return bottle_exports["onnx"].parent


def onnx_run(path, images):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    settings = json.loads(session.get_modelmeta().custom_metadata_map["patchcore"])
    scores, maps = session.run(None, {"images": images})
    return scores, maps, settings


def openvino_run(path, images):
    settings = json.loads(path.with_suffix(".json").read_text())
    compiled = openvino.Core().compile_model(str(path), "CPU", settings["openvino_compile_config"])
    outputs = compiled(images)
    return outputs[0], outputs[1], settings


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_exported_models_give_the_librarys_scores_maps_and_decisions(engine, exported, subset, library):
    samples, images, predictions = subset
    run = onnx_run if engine == "onnxruntime" else openvino_run
    path = exported / "bottle.onnx" if engine == "onnxruntime" else exported / "ov" / "bottle.xml"
    scores, maps, settings = run(path, images)
    expected_scores = np.array([p.score for p in predictions])
    expected_maps = np.stack([p.input_map for p in predictions])
    assert scores.shape == (21,) and maps.shape == (21, 256, 256)
    assert np.max(np.abs(scores - expected_scores) / expected_scores) <= 1e-4
    assert np.abs(maps - expected_maps).max() <= 1e-3 * (expected_maps.max() - expected_maps.min())
    # the thresholds travel as data beside the graph, and cut the same way
    threshold = settings["calibration"]["image_threshold"]
    assert threshold == library.calibration_.image_threshold
    assert [bool(s >= threshold) for s in scores] == [p.is_anomalous for p in predictions]
    labels = [s.label for s in samples]
    assert round(roc_auc_score(labels, scores), 3) == round(roc_auc_score(labels, expected_scores), 3)
    assert settings["export_format_version"] == EXPORT_FORMAT_VERSION and settings["backbone"] == "mobilenet_v2"
    assert settings["input"]["mode"] == "square" and settings["input"]["image_size"] == 256
    if engine == "openvino":
        assert settings["openvino_compile_config"] == OPENVINO_COMPILE_CONFIG


def test_the_batch_size_is_dynamic(exported, subset):
    _, images, predictions = subset
    for rows in (slice(0, 1), slice(1, 4)):
        scores, maps, _ = onnx_run(exported / "bottle.onnx", images[rows])
        expected = np.array([p.score for p in predictions[rows]])
        assert scores.shape == expected.shape and np.max(np.abs(scores - expected) / expected) <= 1e-4


def test_exporting_again_replaces_the_file(library, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_text("an older export")
    assert export_model(library, path) == path
    assert onnxruntime.InferenceSession(str(path)).get_inputs()[0].name == "images"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left


def test_export_errors_are_one_line(library, tmp_path, capsys, bottle_model_file):
    with pytest.raises(ValueError, match=r"^unknown export format 'tflite'; choose one of: onnx, openvino$"):
        export_model(library, tmp_path / "m.tflite", "tflite")
    tiles = PatchCore("mobilenet_v2", input_mode="aspect")
    tiles.layout_ = library.layout_.__class__("aspect", 256, scale=0.5)
    with pytest.raises(ValueError, match=r"^export supports the square input mode only; this model uses 'aspect': score it with its \.safetensors file, or fit with --input-mode square to export$"):
        export_model(tiles, tmp_path / "m.onnx")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\0" * 64)
    assert main(["export", str(damaged), "--out", str(tmp_path / "d.onnx")]) == 2
    assert capsys.readouterr().err.startswith(f"patchcore: error: '{damaged}': ")


def test_weights_over_the_limit_go_to_external_data_beside_the_graph(library, subset, monkeypatch, tmp_path):
    """The >2 GB branch on a small bank: the limit lowered, the same numbers from a .onnx + .data pair,
    and a later export under the limit removes the stale .data."""
    import patchcore.export

    _, images, predictions = subset
    path = tmp_path / "m.onnx"
    monkeypatch.setattr(patchcore.export, "EXTERNAL_DATA_ABOVE_BYTES", 1_000_000)
    export_model(library, path)
    data = tmp_path / "m.onnx.data"
    bank_bytes = library.memory_bank_.numel() * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert path.stat().st_size < 1_000_000 < bank_bytes < data.stat().st_size
    scores, _, settings = onnx_run(path, images[:4])
    expected = np.array([p.score for p in predictions[:4]])
    assert np.max(np.abs(scores - expected) / expected) <= 1e-4 and settings["backbone"] == "mobilenet_v2"

    monkeypatch.undo()
    export_model(library, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"] and path.stat().st_size > bank_bytes


@pytest.mark.parametrize("layout", ["queries", "bank"])
def test_the_graphs_search_finds_the_float64_nearest_entries_even_far_from_the_origin(library, layout):
    """Features far from the origin (|b|^2 ~ 1e7 here) make the ranking form's float32 rounding pick
    wrong entries; the graph centres them on the bank's mean first. Both layouts, blocks included."""
    import copy

    from patchcore.export import ScoringGraph

    generator = torch.Generator().manual_seed(0)
    model = copy.copy(library)
    bank = library.memory_bank_[:6000] + 300.0
    model.memory_bank_ = bank
    graph = ScoringGraph(model, layout)
    graph.block = 1024  # several blocks and a ragged last one
    queries = bank[torch.randint(0, 6000, (2000,), generator=generator)] + 0.05 * torch.randn(2000, bank.shape[1], generator=generator)
    expected = torch.cdist(queries.double(), bank.double()).argmin(dim=1)
    with torch.no_grad():
        found = graph._nearest(queries - graph.centre)
        assert torch.equal(found, expected)
        assert torch.allclose(graph._entries(found) + graph.centre, bank[found], rtol=0, atol=1e-4)
        neighbourhoods = graph._neighbourhoods(graph._entries(found[:5]))
    assert torch.equal(neighbourhoods, torch.cdist(bank[found[:5]].double(), bank.double()).topk(graph.num_neighbors, largest=False).indices)
