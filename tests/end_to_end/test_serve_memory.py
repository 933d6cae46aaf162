"""The server's memory budget is told the truth: what one image really holds, decoded, scored and
answered (with its picture), never passes what ``budget.image_cost`` reserves for it from the
header, and the backbones' scoring figures hold.

Each measurement runs in a fresh interpreter: its peak resident memory (VmHWM, reset through
/proc/self/clear_refs) over what it held before the image arrived.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from patchcore.serve.budget import INPUT_BYTES_PER_PIXEL, SCORING_BYTES_PER_INPUT_PIXEL

PIPELINE = """
import gc, io, json, sys
import numpy as np
from PIL import Image
from patchcore.intake import read_header
from patchcore.serve.holder import load_served_model
from patchcore.serve.uploads import decode_upload, record as make_record
from patchcore.serve.budget import image_cost

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

model, mode, side, picture = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
served = load_served_model(model, device="cpu", max_image_pixels=None)
y, x = np.mgrid[0:side, 0:side]
ramp = ((x // 7 + y // 5) % 256).astype(np.uint8)  # stripes: an image the bottle model finds very anomalous
ramp[: side // 3, : side // 3] = 128  # and a flat corner, so that the map has edges
images = {
    "RGB": lambda: Image.fromarray(np.dstack([ramp, ramp.T, ramp[::-1]])),
    "RGBA": lambda: Image.fromarray(np.dstack([ramp, ramp.T, ramp[::-1], 255 - ramp // 2]), "RGBA"),
    "I;16": lambda: Image.fromarray(ramp.astype(np.uint16) * 257),
}
buffer = io.BytesIO()
images[mode]().save(buffer, format="PNG", compress_level=1)
data = buffer.getvalue()
del buffer, x, y, ramp, images
gc.collect()
header = read_header(data, "measured", None)
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
loaded, status_code = decode_upload("measured", data, served, picture, None)
[prediction] = served.model.predict_loaded([loaded])
del loaded
record = make_record(prediction, picture, "jpeg")
peak = status("VmHWM:") - before
print(json.dumps({
    "peak": peak, "cost": image_cost(header, served.model.layout_, served.metadata["backbone"], picture),
    "regions": len(record["regions"]), "picture": "picture" in record, "status": status_code,
}))
"""


@pytest.mark.parametrize(("mode", "picture"), [("RGB", True), ("RGB", False), ("I;16", False), ("RGBA", True)])
def test_one_image_never_holds_more_than_it_reserved(bottle_model_file, mode, picture):
    done = subprocess.run([sys.executable, "-c", PIPELINE, str(bottle_model_file), mode, "4000", str(int(picture))], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["status"] == 200 and measured["regions"] >= 1 and measured["picture"] is picture
    assert measured["peak"] <= measured["cost"], measured
    # and the reservation is not far above it, or the budget would refuse needlessly
    assert measured["peak"] >= measured["cost"] / 2, measured


BACKBONE = """
import json, sys, torch
from patchcore.backbones import build_feature_extractor, get_spec
from patchcore.features import PatchFeatures

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

spec = get_spec(sys.argv[1])
features = PatchFeatures(build_feature_extractor(spec, spec.default_layers), spec.default_layers).eval()
batch = torch.rand(2, 3, 256, 256)
with torch.inference_mode():
    features(batch[:, :, :64, :64], None, 2)  # the first call's one-off allocations
    before = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")
    features(batch, None, 2)
print(json.dumps({"bytes_per_input_pixel": (status("VmHWM:") - before) / batch[:, 0].numel()}))
"""


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet18", "wide_resnet50_2"])
def test_scoring_figures_cover_the_backbones(backbone):
    """The backbone's activations over the input's pixels fit its figure (random weights: the
    same shapes as ImageNet's)."""
    done = subprocess.run([sys.executable, "-c", BACKBONE, backbone], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])["bytes_per_input_pixel"]
    assert measured + INPUT_BYTES_PER_PIXEL <= SCORING_BYTES_PER_INPUT_PIXEL[backbone], measured
    assert measured >= SCORING_BYTES_PER_INPUT_PIXEL[backbone] / 3, measured
