"""Starting or joining a Ray cluster, for scoring (``predict.py``) and fitting (``fit.py``) on Ray.

Ray is optional (``pip install 'patchcore[ray]'``) and imported only here, when asked for.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from ..errors import BadInputError, ClusterError

#: the object store of a local Ray instance (``--ray`` alone): in-flight images and pictures, plus the model
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
#: how long to wait for a cluster's head to accept a connection before saying it is not there
CONNECT_TIMEOUT_S = 5.0

def import_ray() -> Any:
    """The ``ray`` module, or a one-line error naming the extra that installs it."""
    try:
        import ray
        import ray.data  # Ray without its data extra cannot run the pipeline
    except ImportError as error:
        raise BadInputError(f"--ray needs Ray ({error}): pip install 'patchcore[ray]'") from None
    return ray


def _check_reachable(address: str) -> None:
    """A HOST:PORT that nothing answers on fails here, at once: ray.init would retry for minutes."""
    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit() or "://" in address:
        return  # "auto", "ray://...": Ray's own forms, left to Ray
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ClusterError(f"--ray: no Ray cluster answers at {address} ({error.strerror or error})") from None


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def connect(ray: Any, address: str | None, object_store_bytes: int) -> str:
    """Start a local Ray instance (``address`` None; its object store ``object_store_bytes``) or
    join the cluster at ``address``; a failure is one line that says how authentication is set
    up. Returns the driver's node id."""
    where = "start a local Ray instance" if address is None else f"join the Ray cluster at {address}"
    if address is not None:
        _check_reachable(address)
    try:
        if address is None:
            # "local": a new instance, never an existing cluster that ray.init() would find and join.
            ray.init(address="local", object_store_memory=object_store_bytes, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as error:  # Ray reports connection and authentication failures as several types
        hint = ""
        if address is not None and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint = "; a cluster started with `ray start --head` wants RAY_AUTH_MODE=token and its token (~/.ray/auth_token or RAY_AUTH_TOKEN)"
        raise ClusterError(f"--ray: could not {where} ({first_line(error)}){hint}") from None
    return ray.get_runtime_context().get_node_id()
