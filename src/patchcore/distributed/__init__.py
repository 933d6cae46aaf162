"""patchcore on Ray: scoring (``predict.py``: ``patchcore predict ... --ray``) and fitting
(``fit.py``: ``patchcore fit ... --ray``) spread over a cluster, which ``cluster.py`` starts or joins.

Importing this package imports neither Ray nor PyTorch; ``fit_on_ray`` imports PyTorch on first use.
"""

from typing import Any

from .cluster import connect, import_ray
from .predict import RayResult, RayScoring, is_uri


def __getattr__(name: str) -> Any:
    if name == "fit_on_ray":
        from .fit import fit_on_ray

        return fit_on_ray
    raise AttributeError(f"module 'patchcore.distributed' has no attribute {name!r}")


__all__ = ["RayResult", "RayScoring", "connect", "fit_on_ray", "import_ray", "is_uri"]
