"""The inference server and its inspection page: ``patchcore serve MODEL``, or mount
``create_app(model_path)`` in any ASGI server. Needs the ``serve`` extra (FastAPI, uvicorn,
python-multipart, prometheus-client)."""

from .app import DEFAULT_MAX_IMAGE_PIXELS, create_app, load_served_model, serve

__all__ = ["create_app", "load_served_model", "serve", "DEFAULT_MAX_IMAGE_PIXELS"]
