"""The server's memory budget: admission control in bytes, decided before anything is decoded.

Every request reserves what it will hold before it holds it: its body before the body is read,
then each image's decoding, scoring and record (:func:`image_cost`, from the image's header)
before any image is decoded. A request that does not fit waits briefly for others to finish,
then gets 503 with Retry-After; one that could never fit gets 413. So the memory that requests
hold together never passes the budget, whatever they send.

A quarter of the budget is kept for small requests (a line's camera images: megabytes each):
a request larger than that share may use only the rest, so a stream of huge images slows the
small ones but cannot shut them out.
"""

from __future__ import annotations

import asyncio
import math
import os
from dataclasses import dataclass

from ..intake import ImageHeader
from ..layout import InputLayout
from ..render import panel_size

MB = 2**20
#: the budget unless --max-memory-mb is given: this share of the machine's memory, within bounds
DEFAULT_BUDGET_SHARE = 1 / 24
DEFAULT_BUDGET_BOUNDS_MB = (512, 4096)
#: the share of the budget kept for small requests (those that need no more than this share)
SMALL_SHARE = 0.25
#: longest wait for room before a request is told 503 (Retry-After)
ADMISSION_WAIT_S = 2.0

#: Bytes a pixel of the image that the server holds at most for an image, phase by phase (one
#: phase at a time per image): decoding (the intake's figure, by mode), the resize to the
#: model's input (the RGB image and Pillow's copy of it: 7) and the record (the map at the
#: image's size, float32, the mask above the threshold, the labels and each region's mask:
#: about 10.5 measured).
PREPARE_BYTES_PER_PIXEL = 8
RECORD_BYTES_PER_PIXEL = 12
#: Bytes a pixel of the model's input: the float32 input (12) and everything scoring it holds:
#: the backbone's activations, the patch features, the distances and the maps on the input's
#: grid. Per backbone (its default layers), measured and held to by tests/unit/test_intake_memory.py.
INPUT_BYTES_PER_PIXEL = 12
SCORING_BYTES_PER_INPUT_PIXEL = {"mobilenet_v2": 400, "resnet18": 250, "resnet50": 400, "wide_resnet50_2": 700, "wide_resnet101_2": 650}
SCORING_BYTES_PER_INPUT_PIXEL_UNKNOWN = 700
#: a picture asked for is drawn at most this large (longest side): what a person looks at
PICTURE_MAX_SIDE = 2048
#: what drawing one picture and its map holds at most, a pixel of the picture: the image shrunk
#: to the picture's size, the map there, the overlay, outline and caption, the encoded JPEG and
#: PNG and their base64 (about 13 measured)
PICTURE_BYTES_PER_PIXEL = 16
#: the least any image or request is charged: buffers, the JSON answer, Python objects
IMAGE_OVERHEAD_BYTES = 1 * MB


def default_budget_mb() -> int:
    """The default process budget, from the machine's memory (``--max-memory-mb``)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: the lower bound
        return DEFAULT_BUDGET_BOUNDS_MB[0]
    low, high = DEFAULT_BUDGET_BOUNDS_MB
    return int(min(high, max(low, total * DEFAULT_BUDGET_SHARE / MB)))


def picture_hw(image_hw: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of the picture the server draws for an image of ``image_hw``: the image's own size,
    shrunk so that its longest side is at most :data:`PICTURE_MAX_SIDE`."""
    return panel_size(image_hw, PICTURE_MAX_SIDE)


def image_cost(header: ImageHeader, layout: InputLayout, backbone: str, picture: bool) -> int:
    """Bytes the server may hold at once for one image, from its header: the largest phase over
    the image's pixels, what scoring holds over the input's pixels, and the picture if asked."""
    pixels = header.pixels
    per_pixel = max(header.decode_bytes / max(pixels, 1), PREPARE_BYTES_PER_PIXEL, RECORD_BYTES_PER_PIXEL)
    input_pixels = max(math.prod(layout.input_hw(hw)) for hw in _either_way(header))
    scoring = INPUT_BYTES_PER_PIXEL + SCORING_BYTES_PER_INPUT_PIXEL.get(backbone, SCORING_BYTES_PER_INPUT_PIXEL_UNKNOWN)
    cost = math.ceil(pixels * per_pixel) + input_pixels * scoring + IMAGE_OVERHEAD_BYTES
    if picture:
        cost += math.prod(picture_hw((header.height, header.width))) * PICTURE_BYTES_PER_PIXEL
    return cost


def tile_count(header: ImageHeader, layout: InputLayout) -> int:
    """How many tiles a tile-mode model cuts the image into (1 in the other modes)."""
    if layout.mode != "tile":
        return 1
    return max(len(layout.tiles(layout.input_hw(hw), layout.stride) or [None]) for hw in _either_way(header))


def _either_way(header: ImageHeader) -> tuple[tuple[int, int], tuple[int, int]]:
    """(H, W) as stored and turned: an EXIF turn of the image is only known once it is decoded."""
    return (header.height, header.width), (header.width, header.height)


def request_cap(capacity: int, per_request: int | None = None) -> int:
    """The most one request may hold: ``per_request``, by default the budget less the small
    requests' share (all a large request can ever be given)."""
    return capacity - int(capacity * SMALL_SHARE) if per_request is None else per_request


class NeverFitsError(Exception):
    """The request needs more memory than any request may have (413)."""


class BudgetBusyError(Exception):
    """There was no room for the request within the wait (503, Retry-After)."""


@dataclass
class Reservation:
    """Bytes a request holds; grown by :meth:`MemoryBudget.grow`, given back by :meth:`MemoryBudget.release`."""

    nbytes: int = 0


class MemoryBudget:
    """Reservations of bytes against a capacity, on one event loop.

    ``capacity``: the process budget; ``per_request``: the most one request may hold (at most
    what a large request can be given, the capacity less the small requests' share).
    """

    def __init__(self, capacity: int, per_request: int | None = None, wait_s: float = ADMISSION_WAIT_S) -> None:
        if capacity < 16 * MB:
            raise ValueError(f"need a memory budget of at least 16 MB, got {capacity / MB:g} MB")
        self.capacity = capacity
        self.small_limit = int(capacity * SMALL_SHARE)  # a request of at most this much is small
        self.large_room = request_cap(capacity)  # what large requests may hold together
        self.per_request = request_cap(capacity, per_request)
        if not 0 < self.per_request <= self.large_room:
            raise ValueError(
                f"the per-request memory cap must be between 0 and {self.large_room / MB:.0f} MB (the budget less the "
                f"{SMALL_SHARE:.0%} kept for small requests), got {self.per_request / MB:g} MB"
            )
        self.wait_s = wait_s
        self.in_use = 0
        self.peak = 0
        self._large_in_use = 0
        self._room = asyncio.Condition()

    def _fits(self, held: int, extra: int) -> bool:
        total = held + extra
        if total <= self.small_limit:
            return self.in_use + extra <= self.capacity
        return self.in_use + extra <= self.capacity and self._large_in_use - (held if held > self.small_limit else 0) + total <= self.large_room

    async def grow(self, reservation: Reservation, extra: int) -> None:
        """Add ``extra`` bytes to ``reservation``, waiting up to the wait for room.

        Raises :class:`NeverFitsError` when the request would need more than one request may
        hold, :class:`BudgetBusyError` when no room came in time (the reservation is unchanged).
        """
        if extra <= 0:
            return
        if reservation.nbytes + extra > self.per_request:
            raise NeverFitsError(reservation.nbytes + extra)
        async with self._room:
            try:
                await asyncio.wait_for(self._room.wait_for(lambda: self._fits(reservation.nbytes, extra)), self.wait_s)
            except asyncio.TimeoutError:
                raise BudgetBusyError(reservation.nbytes + extra) from None
            self._account(reservation, extra)

    def release(self, reservation: Reservation) -> None:
        """Give back everything ``reservation`` holds (safe to call twice). Must run on the loop;
        wakes the waiters from a task, since it may be called where no ``await`` is possible."""
        if reservation.nbytes:
            self._account(reservation, -reservation.nbytes)
            asyncio.get_running_loop().create_task(self._wake())

    def _account(self, reservation: Reservation, change: int) -> None:
        before = reservation.nbytes
        after = before + change
        if before > self.small_limit:
            self._large_in_use -= before
        if after > self.small_limit:
            self._large_in_use += after
        reservation.nbytes = after
        self.in_use += change
        self.peak = max(self.peak, self.in_use)

    async def _wake(self) -> None:
        async with self._room:
            self._room.notify_all()
