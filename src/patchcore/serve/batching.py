"""Micro-batching: images from concurrent requests gathered into one backbone batch.

A request's images wait in one bounded queue. A single worker takes up to ``max_batch`` of them,
waiting at most ``max_wait`` after the first arrives for more to join, and scores them on its
own thread, off the event loop, so that health checks and uploads are served meanwhile. While a
batch is scored the next one gathers, so under load batches fill without waiting at all.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFullError(RuntimeError):
    """The queue cannot take a request's images now; the client should retry shortly."""


@dataclass
class _Job(Generic[Item, Result]):
    item: Item
    done: asyncio.Future


class MicroBatcher(Generic[Item, Result]):
    """Scores items in batches: ``score(items) -> results`` (same order, same length) runs on one
    worker thread; :meth:`submit` returns an awaitable per item.

    ``on_batch(size)`` is told each batch's size (metrics). ``max_queue`` bounds the items waiting:
    a request that does not fit gets :class:`QueueFullError` at once instead of waiting unbounded.
    """

    def __init__(
        self,
        score: Callable[[Sequence[Item]], Sequence[Result]],
        max_batch: int = 8,
        max_wait: float = 0.010,
        max_queue: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1 and max_wait >= 0, got {max_batch}, {max_queue}, {max_wait}")
        self._score = score
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self._on_batch = on_batch
        self._waiting: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchcore-score")
        self._worker: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting the batch being scored)."""
        return len(self._waiting)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for job in self._waiting:
            job.done.cancel()
        self._thread.shutdown(wait=True)

    async def run_exclusive(self, work: Callable[..., Result], *args) -> Result:
        """Run ``work(*args)`` on the scoring thread, between batches: for work that must never
        overlap scoring, such as building a model (torch.fx tracing patches torch globally)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    def check_room(self, count: int) -> None:
        """Raise :class:`QueueFullError` unless ``count`` more items fit in the queue now."""
        if len(self._waiting) + count > self.max_queue:
            raise QueueFullError(f"the queue is full ({len(self._waiting)} of {self.max_queue} images waiting); retry shortly")

    def submit(self, items: Sequence[Item]) -> list[asyncio.Future]:
        """Queue all of a request's items or none of them (:class:`QueueFullError`)."""
        self.check_room(len(items))
        loop = asyncio.get_running_loop()
        jobs = [_Job(item, loop.create_future()) for item in items]
        self._waiting.extend(jobs)
        self._arrived.set()
        return [job.done for job in jobs]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.max_wait
            while len(self._waiting) < self.max_batch and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            batch = [job for job in batch if not job.done.cancelled()]  # their client went away
            if not batch:
                continue
            if self._on_batch is not None:
                self._on_batch(len(batch))
            try:
                results = await loop.run_in_executor(self._thread, self._score, [job.item for job in batch])
            except Exception as error:  # a failure of the batch is every item's failure, never the worker's
                for job in batch:
                    if not job.done.done():
                        job.done.set_exception(error)
                continue
            for job, result in zip(batch, results):
                if not job.done.done():
                    job.done.set_result(result)
