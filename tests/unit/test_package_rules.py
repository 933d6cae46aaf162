"""Rules of the package's shape, checked on its source and on a fresh interpreter:

- one intake: only ``intake.py`` imports Pillow or asks OpenCV to decode a file, so a limit or a
  format rule set there holds for every face;
- no side effects on import: importing the package changes no warnings filter, no environment
  variable, no thread count and no Pillow limit of the program that imports it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "patchcore"
INTAKE = PACKAGE / "intake.py"
#: OpenCV's functions that read image files or bytes
CV2_DECODERS = frozenset({"imdecode", "imread", "imreadmulti", "imdecodemulti", "imcount", "imreadanimation", "imdecodeanimation"})


def decoding_calls(source: str) -> list[str]:
    """Where ``source`` imports Pillow or calls OpenCV's decoders, as "line: what"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {alias.name}" for alias in node.names if alias.name.split(".")[0] == "PIL"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "PIL":
            found.append(f"{node.lineno}: from {node.module} import {', '.join(alias.name for alias in node.names)}")
        elif isinstance(node, ast.ImportFrom) and node.module == "cv2" and any(alias.name in CV2_DECODERS for alias in node.names):
            found.append(f"{node.lineno}: from cv2 import a decoder")
        elif isinstance(node, ast.Attribute) and node.attr in CV2_DECODERS and isinstance(node.value, ast.Name) and node.value.id == "cv2":
            found.append(f"{node.lineno}: cv2.{node.attr}")
    return sorted(found, key=lambda where: int(where.split(":")[0]))


def test_the_rule_finds_every_way_to_decode():
    source = "import PIL\nfrom PIL import Image\nimport PIL.Image as P\nfrom PIL.ImageOps import exif_transpose\nimport cv2\nx = cv2.imdecode(b, 1)\ny = cv2.imread('a')\nfrom cv2 import imread\n"
    assert decoding_calls(source) == [
        "1: import PIL", "2: from PIL import Image", "3: import PIL.Image", "4: from PIL.ImageOps import exif_transpose",
        "6: cv2.imdecode", "7: cv2.imread", "8: from cv2 import a decoder",
    ]
    assert decoding_calls("import cv2\nok, data = cv2.imencode('.png', a)\nb = cv2.resize(a, (2, 2))\n") == []


def test_only_the_intake_decodes_images():
    offenders = {
        str(path.relative_to(PACKAGE)): found
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != INTAKE and (found := decoding_calls(path.read_text()))
    }
    assert offenders == {}, f"decode images through patchcore.intake, not here: {offenders}"
    assert decoding_calls(INTAKE.read_text())  # the intake itself does (the rule looks at the right files)


PROBE = """
import json, os, sys, warnings
import torch, cv2
from PIL import Image
{preload}
def snapshot():
    return {{
        "filters": [repr(f) for f in warnings.filters],
        "environ": dict(os.environ),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cv2_threads": cv2.getNumThreads(),
        "pillow_max_pixels": Image.MAX_IMAGE_PIXELS,
    }}
before = snapshot()
{imports}
after = snapshot()
print(json.dumps({{key: [before[key], after[key]] for key in before if before[key] != after[key]}}))
"""


def changes_on_import(imports: str, preload: str = "") -> dict:
    """What importing ``imports`` changes in a fresh interpreter (its settings before and after)."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports, preload=preload)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_package_changes_no_process_setting():
    assert changes_on_import("import patchcore, patchcore.distributed") == {}


def test_importing_every_module_changes_no_process_setting():
    # The third-party libraries the modules use are loaded first: what they do on import is theirs.
    preload = (
        "import torchvision, torchvision.models.feature_extraction, torch.onnx, numba, faiss, scipy.ndimage, sklearn, tqdm, safetensors, "
        "fastapi, uvicorn, prometheus_client, onnx, onnxscript, onnxruntime, openvino, ray, sqlalchemy, alembic"
    )
    modules = sorted(
        "patchcore." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" and path.name != "__main__.py"
        and "migrations" not in path.relative_to(PACKAGE).parts  # run by Alembic from their files, never imported
    )
    assert "patchcore.cli" in modules and "patchcore.serve.app" in modules
    assert changes_on_import("\n".join(f"import {module}" for module in modules), preload) == {}


@pytest.mark.parametrize("setting", ["OMP_WAIT_POLICY", "MAX_IMAGE_PIXELS"])
def test_the_command_line_sets_its_settings_in_main_only(setting):
    """The command line's own settings are made when it runs, not when it is imported."""
    probe = (
        "import os, PIL.Image\nimport patchcore.cli as cli\n"
        "before = (os.environ.get('OMP_WAIT_POLICY'), PIL.Image.MAX_IMAGE_PIXELS)\n"
        "cli.main(['predict', 'no-model.safetensors', 'x.png', '--out', '/nonexistent/out'])\n"
        "print(before, (os.environ.get('OMP_WAIT_POLICY'), PIL.Image.MAX_IMAGE_PIXELS))"
    )
    env = {key: value for key, value in __import__("os").environ.items() if key != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    before, after = done.stdout.strip().splitlines()[-1].split(") (")
    if setting == "OMP_WAIT_POLICY":
        assert before.startswith("(None,") and after.startswith("'PASSIVE',")
    else:
        assert before.endswith("89478485") and after.startswith("'PASSIVE', None")


# ---------------------------------------------------------------------------------------------
# Layers that point one way (import-linter's contracts in pyproject.toml), and no private names
# taken from another module.

ROOT = PACKAGE.parents[1]


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """import-linter on the package found under ``package_parent``, with the repository's contracts."""
    env = {**__import__("os").environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        capture_output=True, text=True, timeout=300, env=env, cwd=package_parent,
    )


def test_the_layer_contracts_hold():
    done = lint_imports(PACKAGE.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    "module, line, edge",
    [
        # the two circles of patchcore 0.1: a library module on the command line (inside a
        # function, as it was), and search on coreset's kernels while coreset uses search
        ("distributed/predict.py", "def _circle():\n    from ..cli import main\n", "patchcore.distributed.predict -> patchcore.cli"),
        ("search.py", "from .coreset import greedy_coreset\n", "patchcore.search -> patchcore.coreset"),
        # a face on another face, a foundation on torch, the server on torch
        ("export.py", "def _face():\n    from .serve import serve\n", "patchcore.export -> patchcore.serve"),
        ("layout.py", "import torch\n", "patchcore.layout -> torch"),
        ("serve/limits.py", "import torch\n", "patchcore.serve.limits -> torch"),
    ],
)
def test_the_contracts_fail_on_a_wrong_way_import(tmp_path, module, line, edge):
    """Each contract can fail: the package copied with one wrong-way import added."""
    import shutil

    copy = tmp_path / "patchcore"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + "\n" + line)
    done = lint_imports(tmp_path)
    assert done.returncode != 0 and "2 kept, 1 broken" in done.stdout, done.stdout + done.stderr
    assert edge in done.stdout.split("Broken contracts", 1)[1]


def private_reaches(source: str) -> list[str]:
    """Where ``source`` takes a private name (one leading underscore) from another of patchcore's
    modules: ``from .x import _name``, or ``module._name`` / ``obj._name`` on anything but
    ``self`` and ``cls`` and the standard library's or third parties' modules imported by name."""
    tree = ast.parse(source)
    foreign = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names if not alias.name.startswith("patchcore")}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("patchcore")):
            found += [f"{node.lineno}: from {'.' * node.level}{node.module or ''} import {a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"} | foreign):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return sorted(found, key=lambda where: int(where.split(":")[0]))


def test_the_private_rule_finds_what_it_should():
    source = (
        "import argparse\nfrom .model import PatchCore, _image_sizes\nfrom . import model\n"
        "x = model._features(b)\ny = self._bar\nz = argparse._ArgumentGroup\nw = other.model_._run(1)\nfrom patchcore.coreset import _greedy_plain\n"
    )
    assert private_reaches(source) == [
        "2: from .model import _image_sizes", "4: model._features", "7: other.model_._run", "8: from patchcore.coreset import _greedy_plain",
    ]


def test_no_module_takes_a_private_name_from_another():
    offenders = {str(path.relative_to(PACKAGE)): found for path in sorted(PACKAGE.rglob("*.py")) if (found := private_reaches(path.read_text()))}
    assert offenders == {}, f"use the other module's public interface: {offenders}"


#: what `patchcore --help` must not import: each costs from 0.1 s (faiss) to 2 s (torch and torchvision)
HEAVY_FOR_HELP = ("torch", "torchvision", "scipy", "numba", "faiss", "sklearn", "onnxruntime", "openvino", "ray", "fastapi", "sqlalchemy")


def test_the_help_imports_none_of_the_heavy_libraries():
    # A fast start (issue 23): `patchcore --help` took 0.77 s, 0.56 of them in scipy.stats,
    # which calibrate.py imported at its top for one interval. Caught: that import moved back.
    code = (
        "import sys\nfrom patchcore.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")[-2].split())
    assert "patchcore" in loaded
    assert not loaded & set(HEAVY_FOR_HELP), sorted(loaded & set(HEAVY_FOR_HELP))


def test_scoring_and_serving_never_import_scipy_stats():
    # scipy.stats costs 0.6-0.9 s of every start; the Beta quantiles the calibration and the drift
    # watch need come from scipy.special. Caught: `from scipy.stats import beta` back in
    # record/drift.py (every `patchcore serve` paid it) or in calibrate.py.
    code = (
        "import sys\nimport patchcore.serve.app, patchcore.model, patchcore.calibrate as c, numpy as np\n"
        "from patchcore.record.drift import DriftWatch\n"
        "c.order_statistic_cut(np.linspace(1, 2, 50), 0.05)\nprint('scipy.stats' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1] == "False"
