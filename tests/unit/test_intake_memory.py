"""The intake's memory figures hold: decoding an image of each mode never takes more than
``DECODE_BYTES_PER_PIXEL`` says (the server reserves that much from its budget before decoding),
and a 16-bit or float image is never widened to float64 as a whole.

Each measurement runs in a fresh interpreter: its peak resident memory (VmHWM, reset through
/proc/self/clear_refs) over what it held before decoding, divided by the image's pixels.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from patchcore.intake import DECODE_BYTES_PER_PIXEL, DECODE_BYTES_PER_PIXEL_BY_FORMAT

#: the side of the square images measured: large enough that buffers of fixed size do not count
SIDE = 3000

MEASURE = """
import gc, io, json, sys
import numpy as np
from PIL import Image
from patchcore.intake import read_header, read_image_bytes

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

kind, side = sys.argv[1], int(sys.argv[2])
y, x = np.mgrid[0:side, 0:side]
ramp = ((x + 2 * y) % 256).astype(np.uint8)
images = {
    "1": lambda: Image.fromarray(ramp > 127), "L": lambda: Image.fromarray(ramp), "P": lambda: Image.fromarray(ramp).convert("P"),
    "RGB": lambda: Image.fromarray(np.dstack([ramp, ramp[::-1], ramp.T])), "RGBA": lambda: Image.fromarray(np.dstack([ramp, ramp, ramp.T, ramp[::-1]]), "RGBA"),
    "LA": lambda: Image.fromarray(np.dstack([ramp, ramp.T]), "LA"), "CMYK": lambda: Image.fromarray(np.dstack([ramp] * 4), "CMYK"),
    "I;16": lambda: Image.fromarray(ramp.astype(np.uint16) * 257), "I": lambda: Image.fromarray(ramp.astype(np.int32) * 200),
    "F": lambda: Image.fromarray(ramp.astype(np.float32) / 255),
}
name, _, file_format = kind.partition("/")
buffer = io.BytesIO()
images[name]().save(buffer, format=file_format or "PNG")
data = buffer.getvalue()
del buffer, x, y, ramp, images
gc.collect()
header = read_header(data, "measured", None)
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
rgb = read_image_bytes(data, "measured", None)
peak = status("VmHWM:") - before
print(json.dumps({"mode": header.mode, "format": header.format, "bytes_per_pixel": peak / header.pixels, "shape": list(rgb.shape), "dtype": str(rgb.dtype)}))
"""


def measure(kind: str) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, kind, str(SIDE)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "kind",
    [
        "1", "L", "P", "RGB", "RGBA", "LA", "I;16", "RGB/JPEG", "L/JPEG", "CMYK/JPEG", "CMYK/TIFF", "I;16/TIFF", "I/TIFF", "F/TIFF", "P/TIFF",
        "RGB/TIFF", "RGB/BMP", "1/BMP", "RGB/WEBP", "RGBA/WEBP", "RGB/PPM", "I;16/PPM",
    ],
)
def test_decoding_takes_no_more_than_the_budget_is_told(kind):
    measured = measure(kind)
    assert measured["shape"] == [SIDE, SIDE, 3] and measured["dtype"] == "uint8"
    allowed = DECODE_BYTES_PER_PIXEL_BY_FORMAT.get((measured["format"], measured["mode"])) or DECODE_BYTES_PER_PIXEL[measured["mode"]]
    assert measured["bytes_per_pixel"] <= allowed, measured
    # and the figure is not far above what decoding takes, or the budget would refuse needlessly
    # (Pillow's 1-bit and palette images are the smallest before decoding: a looser floor)
    assert measured["bytes_per_pixel"] >= allowed / (3 if measured["mode"] in ("1", "P", "PA") else 2), measured
