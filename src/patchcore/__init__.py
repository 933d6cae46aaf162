"""patchcore: find and outline defects in product images after learning only from good ones.

An implementation of PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly
Detection", CVPR 2022). The public face::

    from patchcore import PatchCore
    model = PatchCore("mobilenet_v2").fit(good_image_paths)
    predictions = model.predict(new_image_paths)
"""

__version__ = "0.1.0"

from .backbones import BACKBONES, WeightsError  # noqa: E402
from .data import BadInputError  # noqa: E402
from .model import PatchCore, Prediction  # noqa: E402
from .storage import ModelFileError  # noqa: E402

load = PatchCore.load

__all__ = ["PatchCore", "Prediction", "load", "BACKBONES", "BadInputError", "ModelFileError", "WeightsError", "__version__"]
