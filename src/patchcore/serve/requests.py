"""Reading a predict request: its body within a size and a time, then its images.

Nothing here decodes an image; that is the intake's (``intake.py``), after the budget has room.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from starlette.formparsers import MultiPartException, MultiPartParser

#: files per multipart request
MAX_FILES_PER_REQUEST = 256
#: an oversized body is read on (and dropped) up to this many times the limit, so that the
#: client hears the 413 instead of a broken connection; past that the connection is closed
DRAIN_FACTOR = 4


class RequestError(Exception):
    """A request that cannot be served: ``status`` and a one-line ``message`` for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def declared_length(request: Request) -> int | None:
    """The body's Content-Length, or None when the client did not say (chunked)."""
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


async def read_body(request: Request, limit: int, timeout_s: float, limit_text: str) -> bytes:
    """The request body, or :class:`RequestError`: 413 when it is over ``limit`` bytes (declared
    or sent), 408 when it has not all arrived ``timeout_s`` after the headers did."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    declared = declared_length(request)
    if declared is not None and declared > limit:
        await drain(request, DRAIN_FACTOR * limit, deadline)
        raise RequestError(413, f"request body is larger than the limit of {limit_text}")
    chunks, size, over = [], 0, False
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    over = True  # read on and drop, so that the client hears the 413
                    chunks = []
                    if size > DRAIN_FACTOR * limit:
                        break
                elif not over:
                    chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout_s:g} s") from None
    if over:
        raise RequestError(413, f"request body is larger than the limit of {limit_text}")
    return b"".join(chunks)


async def drain(request: Request, most: int, deadline: float) -> None:
    """Read and drop the rest of a body (at most ``most`` bytes, until ``deadline`` on the loop's
    clock), so that the answer reaches a client that is still sending instead of a reset."""
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in request.stream():
                most -= len(chunk)
                if most <= 0:
                    return
    except (TimeoutError, RuntimeError):  # RuntimeError: the body was read already
        return


async def uploads(request: Request, body: bytes, filename: str) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each image: the files of a multipart form, else the body as one
    image named ``filename``; :class:`RequestError` (400) when there is none."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        if not body:
            raise RequestError(400, "no image: send image files as multipart form data, or one image as the request body")
        return [(filename, body)]

    async def once():
        yield body

    try:
        form = await MultiPartParser(request.headers, once(), max_files=MAX_FILES_PER_REQUEST, max_fields=64).parse()
    except MultiPartException as error:
        raise RequestError(400, f"malformed multipart form: {error.message}") from None
    try:
        files = [value for _, value in form.multi_items() if not isinstance(value, str)]
        found = [(upload.filename or f"image{i + 1}", await upload.read()) for i, upload in enumerate(files)]
    finally:
        await form.close()
    if not found:
        raise RequestError(400, "no image files in the multipart form (send them as file fields, e.g. curl -F file=@part.png)")
    return found
