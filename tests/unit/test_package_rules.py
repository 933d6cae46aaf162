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
        "fastapi, uvicorn, prometheus_client, onnx, onnxscript, onnxruntime, openvino, ray"
    )
    modules = sorted(
        "patchcore." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" and path.name != "__main__.py"
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
