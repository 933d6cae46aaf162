"""``predict --ray`` on a real two-node Ray cluster (and a local Ray instance): the same lines, pictures
and skipped images as local ``predict``, in the same order, scored on both nodes.

Each actor scores with one thread (Ray gives it one CPU), and PyTorch's sums come out in the last
bits differently with another number of threads; so the reference runs of local ``predict`` use
one thread too (``OMP_NUM_THREADS=1``), and the records and pictures must then be identical.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from patchcore.data import expand_paths
from ray_cluster import LocalRayCluster, auth_env
from serving import free_port

#: a run that takes longer has hung (e.g. an actor pool starving its reading tasks): fail, do not block
RUN_TIMEOUT_S = 300
RAY_LINE = re.compile(r"^scored on (.+) by (\d+) actors on (\d+) nodes? \(images per node: (.*)\)$")

#: the command line in a child process in which importing ray fails, as where it is not installed
NO_RAY_COMMAND = '''
import importlib.abc, sys

class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "ray":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoRay())
from patchcore.cli import main

sys.exit(main(sys.argv[1:]))
'''


def patchcore(*arguments: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs the ``patchcore`` command in a child process (a hang fails after RUN_TIMEOUT_S)."""
    return subprocess.run(
        [sys.executable, "-m", "patchcore.cli", *map(str, arguments)], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )


def one_thread() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def records(out: Path) -> list[dict]:
    """The lines of ``predictions.jsonl``, each picture as its path below ``out``."""
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for line in lines:
        if "picture" in line:
            line["picture"] = str(Path(line["picture"]).relative_to(out))
    return lines


def assert_same_pictures(out: Path, reference: Path) -> None:
    names = sorted(p.name for p in (reference / "images").iterdir())
    assert names and sorted(p.name for p in (out / "images").iterdir()) == names
    for name in names:
        assert (out / "images" / name).read_bytes() == (reference / "images" / name).read_bytes(), name


def skipped(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("skipped ")]


@pytest.fixture(scope="module")
def bad_images(data_root, tmp_path_factory) -> Path:
    """A folder of two files that are no readable images: a truncated PNG and an empty file."""
    folder = tmp_path_factory.mktemp("bad")
    (folder / "truncated.png").write_bytes((data_root / "mvtec_ad" / "bottle" / "test" / "good" / "000.png").read_bytes()[:3000])
    (folder / "empty.png").write_bytes(b"")
    return folder


def test_cluster_predict_equals_local_predict(ray_cluster: LocalRayCluster, bottle_model_file, data_root, bad_images, tmp_path) -> None:
    test_set = data_root / "mvtec_ad" / "bottle" / "test"
    inputs = [test_set, bad_images]
    local = patchcore("predict", bottle_model_file, *inputs, "--out", tmp_path / "local", "--quiet", env=one_thread())
    assert local.returncode == 0, local.stderr
    on_ray = patchcore("predict", bottle_model_file, *inputs, "--out", tmp_path / "ray", "--ray", ray_cluster.address, "--quiet", env=ray_cluster.env)
    assert on_ray.returncode == 0, on_ray.stderr

    expected = records(tmp_path / "local")
    got = records(tmp_path / "ray")
    assert len(expected) == 83 + 2
    # In the order of the inputs (folders expanded as local predict does), score for score.
    assert [r["path"] for r in got] == [str(p) for p in expand_paths(inputs)]
    assert [r.get("score") for r in got] == [r.get("score") for r in expected]
    assert [r.get("is_anomalous") for r in got] == [r.get("is_anomalous") for r in expected]
    assert sum(r.get("is_anomalous", False) for r in got) > 40  # a real decision: most of the 63 defective bottles
    assert got == expected  # regions, thresholds, errors and picture names too
    assert_same_pictures(tmp_path / "ray", tmp_path / "local")

    # Bad images are reported one by one and skipped, as locally.
    assert skipped(on_ray.stderr) == skipped(local.stderr) == [
        f"skipped '{bad_images / 'empty.png'}': empty file",
        f"skipped '{bad_images / 'truncated.png'}': not a readable image (image file is truncated)",
    ]
    assert f"scored 83 images, skipped 2; wrote {tmp_path / 'ray' / 'predictions.jsonl'}" in on_ray.stderr.splitlines()

    # The pool held an actor per CPU (2 nodes x 2) and both nodes scored images.
    where, actors, nodes, per_node = RAY_LINE.match(on_ray.stderr.splitlines()[-1]).groups()
    assert (where, actors, nodes) == (f"the Ray cluster at {ray_cluster.address}", "4", "2")
    counts = {node: int(count) for node, count in (item.split(": ") for item in per_node.split(", "))}
    assert sorted(counts) == sorted(node[:8] for node in ray_cluster.node_ids)  # the head and the worker node
    assert sum(counts.values()) == 85 and min(counts.values()) > 0


def test_exported_model_and_uris_on_a_local_ray_instance(bottle_exports, data_root, bad_images, tmp_path) -> None:
    """``--ray`` alone starts a local instance; an ONNX model scores there as locally, and a
    ``file://`` URI is read by Ray Data, each record named by its URI."""
    onnx = bottle_exports["onnx"]  # the session's export (conftest.py)
    folder = tmp_path / "few"
    folder.mkdir()
    for name in ["broken_large/000.png", "contamination/001.png", "good/000.png", "good/001.png"]:
        shutil.copy(data_root / "mvtec_ad" / "bottle" / "test" / name, folder / name.replace("/", "_"))
    shutil.copy(bad_images / "truncated.png", folder / "truncated.png")

    local = patchcore("predict", onnx, folder, "--out", tmp_path / "local", "--quiet", env=one_thread())
    assert local.returncode == 0, local.stderr
    on_ray = patchcore("predict", onnx, f"file://{folder}", "--out", tmp_path / "ray", "--ray", "--ray-actors", "2", "--quiet", env=auth_env())
    assert on_ray.returncode == 0, on_ray.stderr

    expected = records(tmp_path / "local")
    for record in expected:
        if "error" in record:
            record["error"] = record["error"].replace(f"'{record['path']}'", f"'file://{record['path']}'")
        record["path"] = f"file://{record['path']}"
    assert len(expected) == 5 and records(tmp_path / "ray") == expected
    assert_same_pictures(tmp_path / "ray", tmp_path / "local")
    assert skipped(on_ray.stderr) == [f"skipped 'file://{folder / 'truncated.png'}': not a readable image (image file is truncated)"]
    where, actors, nodes, _ = RAY_LINE.match(on_ray.stderr.splitlines()[-1]).groups()
    assert (where, actors, nodes) == ("a local Ray instance", "2", "1")


def test_ray_missing_is_one_line_naming_the_extra(tmp_path) -> None:
    # The check comes before anything is read: the model file need not exist.
    command = [sys.executable, "-c", NO_RAY_COMMAND, "predict", str(tmp_path / "model.safetensors"), str(tmp_path), "--out", str(tmp_path / "out"), "--ray"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 2
    assert result.stderr == "patchcore: error: --ray needs Ray (No module named 'ray'): pip install 'patchcore[ray]'\n"


def test_no_cluster_at_the_address_is_one_line(bottle_model_file, data_root, tmp_path) -> None:
    port = free_port()  # nothing listens there
    image = data_root / "mvtec_ad" / "bottle" / "test" / "good" / "000.png"
    result = patchcore("predict", bottle_model_file, image, "--out", tmp_path / "out", "--ray", f"127.0.0.1:{port}", "--quiet", env=auth_env())
    assert result.returncode == 2
    assert result.stderr == f"patchcore: error: --ray: no Ray cluster answers at 127.0.0.1:{port} (Connection refused)\n"
