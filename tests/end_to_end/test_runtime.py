"""The exported-model runtime: the library's results from an ONNX or OpenVINO file, without PyTorch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from patchcore import PatchCore
from patchcore.cli import main
from patchcore import __version__
from patchcore.formats import EXPORT_FORMAT_VERSION, METADATA_KEY
from patchcore.runtime import ExportedModel, ExportedModelError

IMAGES = ["broken_large/000.png", "broken_small/003.png", "contamination/001.png", "good/000.png", "good/001.png"]

#: runs in a child process in which importing torch or torchvision fails, as where they are not installed
NO_TORCH = '''
import importlib.abc, json, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
from patchcore.runtime import ExportedModel

model = ExportedModel(sys.argv[1])
records = [p.to_record() for p in model.predict(sys.argv[2:])]
assert not any(name.split(".")[0] in ("torch", "torchvision") for name in sys.modules)
print(json.dumps(records))
'''


#: the command line in a child process in which importing torch or torchvision fails
NO_TORCH_COMMAND = NO_TORCH.split("from patchcore.runtime")[0] + '''
from patchcore.cli import main

code = main(sys.argv[1:])
assert not any(name.split(".")[0] in ("torch", "torchvision") for name in sys.modules)
sys.exit(code)
'''


@pytest.fixture(scope="module")
def exported(bottle_exports) -> dict[str, Path]:
    return bottle_exports  # the session's ONNX and OpenVINO exports of the bottle model (conftest.py)


@pytest.fixture(scope="module")
def images(data_root) -> list[Path]:
    return [data_root / "mvtec_ad" / "bottle" / "test" / name for name in IMAGES]


@pytest.fixture(scope="module")
def expected(bottle_model_file, images) -> list[dict]:
    return [p.to_record() for p in PatchCore.load(bottle_model_file, device="cpu", progress=False).predict(images)]


def assert_same_records(records: list[dict], expected: list[dict]) -> None:
    """The records of two engines: the same decisions and regions, numbers to float32 rounding.
    A region's pixels can differ only where the map is within rounding of the pixel threshold
    (``test_regions_and_maps_equal_the_librarys_on_every_bottle_test_image``): at most a pixel."""
    assert len(records) == len(expected)
    for record, reference in zip(records, expected):
        assert record["path"] == reference["path"]
        assert abs(record["score"] - reference["score"]) <= 1e-5 * reference["score"]
        assert record["is_anomalous"] == reference["is_anomalous"] and record["threshold"] == reference["threshold"]
        assert record["image_size"] == reference["image_size"]
        assert len(record["regions"]) == len(reference["regions"])
        for region, other in zip(record["regions"], reference["regions"]):
            assert region["box"] == other["box"] and abs(region["area"] - other["area"]) <= 1
            assert region["peak_normalized_score"] == pytest.approx(other["peak_normalized_score"], rel=1e-5, abs=2e-6)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_the_runtime_gives_the_librarys_records_where_torch_cannot_be_imported(fmt, exported, images, expected):
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(exported[fmt]), *map(str, images)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert_same_records(records, expected)
    assert [r["is_anomalous"] for r in records] == [True, True, True, False, False]


def test_predict_on_an_exported_file_writes_the_same_lines(exported, images, expected, tmp_path):
    assert main(["predict", str(exported["onnx"]), *map(str, images), str(tmp_path / "missing.png"), "--out", str(tmp_path), "--quiet"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert lines[-1] == {"path": str(tmp_path / "missing.png"), "error": f"'{tmp_path / 'missing.png'}': no such file"}
    assert_same_records(lines[:-1], expected)
    assert all(Path(line["picture"]).is_file() for line in lines[:-1])


def test_bad_exported_files_get_one_line_errors(exported, tmp_path):
    foreign = tmp_path / "foreign.onnx"
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), foreign)
    with pytest.raises(ExportedModelError, match=rf"^'{foreign}': an ONNX model without patchcore settings \(not written by patchcore export\)$"):
        ExportedModel(foreign)

    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(exported["onnx"].read_bytes()[:100_000])
    with pytest.raises(ExportedModelError, match=rf"^'{truncated}': not an ONNX model, or damaged or truncated \("):
        ExportedModel(truncated)

    newer = tmp_path / "newer.onnx"
    proto = onnx.load_model(exported["onnx"])
    settings = json.loads(proto.metadata_props[0].value)
    settings.update(export_format_version=EXPORT_FORMAT_VERSION + 1, exported_by="patchcore 9.0.0")
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(settings)})
    onnx.save_model(proto, newer)
    with pytest.raises(ExportedModelError, match=rf"^'{newer}': written by patchcore 9.0.0 in export format {EXPORT_FORMAT_VERSION + 1}; this patchcore \({__version__}\) reads export format {EXPORT_FORMAT_VERSION} and older: upgrade patchcore$"):
        ExportedModel(newer)

    lonely = tmp_path / "lonely.xml"
    lonely.write_text(exported["openvino"].read_text())
    with pytest.raises(ExportedModelError, match=rf"^'{lonely}': no settings file 'lonely.json' beside it "):
        ExportedModel(lonely)
    with pytest.raises(ExportedModelError, match=rf"^'{tmp_path / 'm.pt'}': no such model file$"):
        ExportedModel(tmp_path / "m.pt")


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_the_server_serves_an_exported_model(fmt, exported, images, expected, start_server):
    import httpx

    running = start_server(exported[fmt])
    meta = httpx.get(f"{running.url}/v2/models/bottle").json()
    assert meta["platform"] == {"onnx": "patchcore-onnxruntime", "openvino": "patchcore-openvino"}[fmt]
    assert meta["patchcore"]["memory_bank_shape"] == [21238, 128] and meta["patchcore"]["backbone"] == "mobilenet_v2"
    # the fit's contamination check travels with the export
    assert [s["name"] for s in meta["patchcore"]["contamination"]["suspects"]] == ["132.png"]
    files = [("file", (str(path), path.read_bytes(), "image/png")) for path in images]
    reply = httpx.post(f"{running.url}/v2/models/bottle/predict", files=files, timeout=120)
    assert reply.status_code == 200
    assert_same_records(reply.json()["results"], expected)


def test_predict_on_an_exported_model_needs_no_torch_and_fit_says_it_does(exported, images, expected, tmp_path):
    command = [sys.executable, "-c", NO_TORCH_COMMAND, "predict", str(exported["onnx"]), *map(str, images), "--out", str(tmp_path), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_records([json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()], expected)
    refused = subprocess.run([sys.executable, "-c", NO_TORCH_COMMAND, "fit", str(images[0].parent), "--out", str(tmp_path / "m.safetensors")], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "patchcore: error: fit needs PyTorch (No module named 'torch'): pip install 'patchcore[full]'; "
        "this install can predict with and serve exported models (.onnx, .xml)"
    ]


def test_a_model_exported_by_another_package_version_is_accepted(exported, images, expected, tmp_path):
    """The export format, not the package version, decides: same format, same numbers."""
    other = tmp_path / "other.onnx"
    proto = onnx.load_model(exported["onnx"])
    settings = json.loads(proto.metadata_props[0].value)
    settings.update(exported_by="patchcore 0.0.1")
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(settings)})
    onnx.save_model(proto, other)
    assert_same_records([p.to_record() for p in ExportedModel(other).predict(images)], expected)


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh venv with only ``pip install patchcore[runtime]`` (from a copy of this source, not
    editable), so that no PyTorch, faiss or scikit-learn is there and a stray import would fail."""
    folder = tmp_path_factory.mktemp("runtime_install")
    source = folder / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    done = subprocess.run([*pip, f"{source}[runtime]"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return venv


def test_an_install_of_patchcore_runtime_has_no_torch_and_predicts_the_librarys_records(runtime_venv, exported, images, expected, tmp_path):
    python, patchcore = runtime_venv / "bin" / "python", runtime_venv / "bin" / "patchcore"
    for absent in ("torch", "torchvision", "faiss", "sklearn", "openvino"):
        probe = subprocess.run([str(python), "-c", f"import {absent}"], capture_output=True, text=True)
        assert probe.returncode == 1 and f"No module named '{absent}'" in probe.stderr
    done = subprocess.run([str(patchcore), "predict", str(exported["onnx"]), *map(str, images), "--out", str(tmp_path), "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert_same_records(lines, expected)
    assert all(Path(line["picture"]).is_file() for line in lines)

    # What this install cannot do, it says in one line, with the install that can.
    refused = subprocess.run([str(patchcore), "predict", str(exported["openvino"]), str(images[0]), "--out", str(tmp_path / "ov")], capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [f"patchcore: error: '{exported['openvino']}': scoring an OpenVINO model needs openvino: pip install 'patchcore[openvino]'"]
    refused = subprocess.run([str(patchcore), "fit", str(images[0].parent), "--out", str(tmp_path / "m.safetensors")], capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "patchcore: error: fit needs PyTorch (No module named 'torch'): pip install 'patchcore[full]'; "
        "this install can predict with and serve exported models (.onnx, .xml)"
    ]


def test_the_runtime_install_with_the_server_serves_an_exported_model(runtime_venv, exported, bottle_model_file, images, expected, start_server, tmp_path):
    import httpx

    done = subprocess.run([str(runtime_venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install", "fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9", "prometheus-client>=0.20", "sqlalchemy>=2.0", "alembic>=1.13"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    running = start_server(exported["onnx"], python=runtime_venv / "bin" / "python")
    files = [("file", (str(path), path.read_bytes(), "image/png")) for path in images]
    reply = httpx.post(f"{running.url}/v2/models/bottle/predict", files=files, timeout=120)
    assert reply.status_code == 200
    assert_same_records(reply.json()["results"], expected)
    # A .safetensors model cannot load there: the server exits with one line that says why.
    refused = start_server(bottle_model_file, python=runtime_venv / "bin" / "python", wait=False)
    assert refused.process.wait(timeout=60) == 2
    assert refused.log.read_text().splitlines()[-1] == (
        f"patchcore: error: '{bottle_model_file}': a .safetensors model needs PyTorch (No module named 'torch'): "
        "pip install 'patchcore[full]', or use a model exported with patchcore export (.onnx, .xml)"
    )


def test_a_large_onnx_model_is_scored_without_constant_folding_and_gives_the_same_records(exported, images, expected, monkeypatch):
    """Past FOLD_CONSTANTS_UP_TO_BYTES the runtime turns ONNX Runtime's constant folding off (its
    load time grows with bank x blocks); the slices it would have folded are then taken per batch."""
    import patchcore.runtime

    monkeypatch.setattr(patchcore.runtime, "FOLD_CONSTANTS_UP_TO_BYTES", 0)
    assert_same_records([p.to_record() for p in ExportedModel(exported["onnx"]).predict(images)], expected)


#: how far (relative) from the pixel threshold a pixel may be where the two engines' maps put it
#: on different sides: float32 rounding (measured: at most 1.4e-7, two units in the last place)
THRESHOLD_ROUNDING = 5e-7


def test_regions_and_maps_equal_the_librarys_on_every_bottle_test_image(bottle_model_file, exported, data_root):
    """One path from the grid to the image (``InputLayout.map_to_image``) for both engines: the
    maps agree to float32 rounding and the regions are the same pixels, except a pixel whose map
    value lies within rounding of the threshold itself (no function of two roundings can agree
    there). Measured at this commit: 77 of 83 images have identical regions; on 6, one pixel each."""
    from patchcore.regions import find_regions

    images = sorted((data_root / "mvtec_ad" / "bottle" / "test").rglob("*.png"))
    assert len(images) == 83
    library = PatchCore.load(bottle_model_file, device="cpu", progress=False)
    runtime = ExportedModel(exported["onnx"])
    identical = 0
    for ours, theirs in zip(library.iter_predictions(images), runtime.iter_predictions(images)):
        threshold = ours.calibration.pixel_threshold
        assert np.abs(ours.input_map - theirs.input_map).max() <= 1e-5 * np.abs(ours.input_map).max()
        assert np.abs(ours.anomaly_map - theirs.anomaly_map).max() <= 1e-5 * np.abs(ours.anomaly_map).max()
        flipped = (ours.anomaly_map >= threshold) != (theirs.anomaly_map >= threshold)
        assert (np.abs(ours.anomaly_map[flipped] - threshold) <= THRESHOLD_ROUNDING * threshold).all(), ours.source
        if not flipped.any():
            # the same pixels above the threshold: the same regions, outlines and boxes
            strip = lambda regions: [(r.polygon, r.box, r.area) for r in regions]  # noqa: E731
            assert strip(find_regions(ours.anomaly_map, ours.calibration)) == strip(find_regions(theirs.anomaly_map, theirs.calibration))
            identical += 1
    assert identical >= 75  # measured 77: a regression that moves regions shows here first


# ---------------------------------------------------------------------------------------------
# One contract for every engine (scoring.ScoringModel)


@pytest.fixture(scope="module")
def engines(bottle_model_file, exported) -> dict:
    from patchcore.scoring import load_model

    return {
        "pytorch": load_model(bottle_model_file, device="cpu"),
        "onnxruntime": load_model(exported["onnx"]),
        "openvino": load_model(exported["openvino"]),
    }


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, data_root) -> list[Path]:
    """One of each way an image can be refused, the same for every engine."""
    folder = tmp_path_factory.mktemp("bad")
    good = data_root / "mvtec_ad" / "bottle" / "test" / "good" / "000.png"
    (folder / "notes.png").write_text("not an image")
    (folder / "cut.png").write_bytes(good.read_bytes()[:2000])
    (folder / "page.pdf").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n")
    import cv2

    cv2.imwrite(str(folder / "tiny.png"), np.zeros((4, 4, 3), np.uint8))
    cv2.imwrite(str(folder / "huge.png"), np.zeros((3000, 3000, 3), np.uint8))  # 9 MP: over the limit set below
    return [folder / name for name in ("notes.png", "cut.png", "page.pdf", "tiny.png", "huge.png", "missing.png")] + [good]


def test_every_engine_is_a_scoring_model_with_the_same_metadata_and_settings_keys(engines):
    from patchcore.scoring import ScoringModel

    assert all(isinstance(model, ScoringModel) for model in engines.values())
    metadata = {name: model.metadata() for name, model in engines.items()}
    assert {name: set(values) for name, values in metadata.items()} == {name: set(metadata["pytorch"]) for name in engines}
    assert [m["engine"] for m in metadata.values()] == ["pytorch", "onnxruntime", "openvino"]
    for key in ("backbone", "layers", "input", "memory_bank_shape", "num_fit_images", "num_neighbors"):
        assert len({json.dumps(m[key], sort_keys=True) for m in metadata.values()}) == 1, key
    # an export's settings are the model's, and the export's own (OpenVINO: how it is compiled)
    exported_own = {"export_format_version", "exported_by"}
    assert set(engines["onnxruntime"].settings()) == set(engines["pytorch"].settings()) | exported_own
    assert set(engines["openvino"].settings()) == set(engines["pytorch"].settings()) | exported_own | {"openvino_compile_config"}


def test_every_engine_gives_the_same_records_and_errors_for_the_same_inputs(engines, bad_inputs):
    answers = {}
    for name, model in engines.items():
        model.max_image_pixels = 4_000_000
        try:
            answers[name] = [p.to_record() for p in model.predict(bad_inputs, threshold=1e9)]
        finally:
            model.max_image_pixels = 89_478_485
    reference = answers["pytorch"]
    assert [sorted(r) for r in reference] == [["error", "path"]] * 6 + [sorted(["path", "score", "normalized_score", "is_anomalous", "threshold", "image_size", "regions"])]
    assert "not an accepted image format" in reference[0]["error"] and "no such file" in reference[5]["error"]
    assert "more than the limit" in reference[4]["error"] or "pixels" in reference[4]["error"]
    for name in ("onnxruntime", "openvino"):
        assert answers[name][:6] == reference[:6], name  # the same errors, word for word
        assert answers[name][6]["is_anomalous"] is False and answers[name][6]["threshold"] == 1e9
        assert_same_records(answers[name][6:], reference[6:])


def test_every_engine_refuses_a_missing_or_foreign_model_file_alike(tmp_path):
    from patchcore.errors import ModelFileError
    from patchcore.scoring import load_model

    for suffix in (".safetensors", ".onnx", ".xml"):
        with pytest.raises(ModelFileError, match=rf"^'{tmp_path}/m{suffix}': no such model file$"):
            load_model(tmp_path / f"m{suffix}")
