"""The inference server and its inspection page: ``patchcore serve MODEL``, or mount
``create_app(model_path)`` in any ASGI server. Needs the ``serve`` extra (FastAPI, uvicorn,
python-multipart, prometheus-client, psutil)."""

from .access import AccessRules
from .app import create_app
from .holder import load_served_model
from .limits import DEFAULT_SERVER_MAX_IMAGE_PIXELS, ServerLimits
from .server import serve

__all__ = ["create_app", "load_served_model", "serve", "AccessRules", "ServerLimits", "DEFAULT_SERVER_MAX_IMAGE_PIXELS"]
