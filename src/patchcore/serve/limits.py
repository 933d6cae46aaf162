"""The server's limits in one place: what each bounds, and how they relate.

Four limits bound what requests can make the server hold, each checked before the cost is paid:

- ``max_request_mb`` bounds a request's body (413), checked from Content-Length and as it arrives.
- ``max_image_pixels`` bounds each image (413), checked from its header.
- ``max_memory_mb`` bounds what all requests hold together, in decoded bytes (the budget,
  ``budget.py``): a request reserves its body, then its images' decoding, scoring and pictures,
  from their headers, before decoding any; one that does not fit waits briefly, then gets 503
  with Retry-After. ``max_request_memory_mb`` is the most one request may hold (413 beyond).
- ``max_queue`` bounds the images waiting to be scored (503 when full, 413 when one request has
  more images than it holds): it bounds latency, the budget bounds memory.

And the connections: at most ``max_connections`` open (503 with Retry-After beyond), a request's
headers within ``header_timeout_s`` and its body within ``read_timeout_s`` (408). A request
refused for what it holds (400, 401, 413, 415, 422 with nothing scored) is answered after
``refusal_delay_s``, so that a client repeating it back to back costs the server little.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..intake import DEFAULT_SERVER_MAX_IMAGE_PIXELS
from .budget import MB, default_budget_mb


@dataclass(frozen=True)
class ServerLimits:
    """Every limit of ``patchcore serve`` (see the module's docstring for how they relate)."""

    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_request_mb: float = 32.0
    max_image_pixels: int = DEFAULT_SERVER_MAX_IMAGE_PIXELS
    max_memory_mb: float | None = None  # None: default_budget_mb(), from the machine's memory
    max_request_memory_mb: float | None = None  # None: the budget less the small requests' share
    max_tiles: int = 100  # tile-mode models: tiles one image may need
    max_connections: int = 64
    header_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    refusal_delay_s: float = 1.0  # a request refused for its content is answered after this

    def __post_init__(self) -> None:
        problems = []
        if self.max_batch < 1 or self.max_queue < 1 or self.max_wait_ms < 0:
            problems.append(f"need --max-batch >= 1, --max-queue >= 1 and --max-wait-ms >= 0, got {self.max_batch}, {self.max_queue} and {self.max_wait_ms}")
        if self.max_request_mb <= 0 or self.max_image_pixels < 64:
            problems.append(f"need --max-request-mb > 0 and --max-image-pixels >= 64, got {self.max_request_mb} and {self.max_image_pixels}")
        if self.max_tiles < 1 or self.max_connections < 2:
            problems.append(f"need --max-tiles >= 1 and --max-connections >= 2, got {self.max_tiles} and {self.max_connections}")
        if self.header_timeout_s <= 0 or self.read_timeout_s <= 0 or not 0 <= self.refusal_delay_s <= 60:
            problems.append(
                f"need positive timeouts and a refusal delay of 0 to 60 s, got --header-timeout {self.header_timeout_s}, "
                f"--read-timeout {self.read_timeout_s} and --refusal-delay {self.refusal_delay_s}"
            )
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def budget_bytes(self) -> int:
        return int((self.max_memory_mb if self.max_memory_mb is not None else default_budget_mb()) * MB)

    @property
    def per_request_bytes(self) -> int | None:
        return None if self.max_request_memory_mb is None else int(self.max_request_memory_mb * MB)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_request_mb * MB)

    def to_dict(self) -> dict[str, Any]:
        """The limits as clients see them in the model's metadata (the budget resolved)."""
        return {**asdict(self), "max_memory_mb": round(self.budget_bytes / MB, 1)}
