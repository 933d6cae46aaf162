"""Tests for patchcore.serve.batching: micro-batches from concurrent requests, a bounded queue."""

from __future__ import annotations

import asyncio
import threading

import pytest

from patchcore.serve.batching import MicroBatcher, QueueFullError


class Recorder:
    """A scoring function that doubles numbers and records each batch and the thread it ran on."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.gate = gate

    def __call__(self, items):
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if any(item < 0 for item in items):
            raise ValueError("negative")
        return [2 * item for item in items]


def run(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_items_are_gathered_up_to_max_batch_in_order():
    recorder = Recorder()

    async def main():
        batcher = MicroBatcher(recorder, max_batch=4, max_wait=0.5, max_queue=64)
        batcher.start()
        results = await asyncio.gather(*[future for i in range(10) for future in batcher.submit([i])])
        await batcher.stop()
        return results

    assert run(main()) == [2 * i for i in range(10)]
    assert recorder.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # full batches need no wait; the rest waits max_wait
    assert all(name.startswith("patchcore-score") for name in recorder.threads)  # off the event loop


def test_a_lone_item_is_scored_after_max_wait_without_waiting_for_company():
    recorder = Recorder()

    async def main():
        batcher = MicroBatcher(recorder, max_batch=8, max_wait=0.02, max_queue=8)
        batcher.start()
        [future] = batcher.submit([21])
        result = await asyncio.wait_for(future, 5)
        await batcher.stop()
        return result

    assert run(main()) == 42 and recorder.batches == [[21]]


def test_items_arriving_while_a_batch_is_scored_form_the_next_batch():
    gate = threading.Event()
    recorder = Recorder(gate)

    async def main():
        batcher = MicroBatcher(recorder, max_batch=8, max_wait=0.0, max_queue=16)
        batcher.start()
        first = batcher.submit([1])
        await asyncio.sleep(0.05)  # batch [1] is now held at the gate
        later = batcher.submit([2]) + batcher.submit([3, 4])
        assert batcher.depth == 3
        gate.set()
        results = await asyncio.gather(*first, *later)
        await batcher.stop()
        return results

    assert run(main()) == [2, 4, 6, 8]
    assert recorder.batches == [[1], [2, 3, 4]]


def test_a_full_queue_refuses_the_whole_request_at_once():
    gate = threading.Event()

    async def main():
        batcher = MicroBatcher(Recorder(gate), max_batch=1, max_wait=0.0, max_queue=3)
        batcher.start()
        held = batcher.submit([1])
        await asyncio.sleep(0.05)  # [1] is being scored; the queue is empty
        waiting = batcher.submit([2, 3])
        with pytest.raises(QueueFullError, match=r"^the queue is full \(2 of 3 images waiting\); retry shortly$"):
            batcher.submit([4, 5])  # would make 4 waiting
        assert batcher.depth == 2  # nothing of the refused request was queued
        more = batcher.submit([6])  # exactly fills it
        gate.set()
        results = await asyncio.gather(*held, *waiting, *more)
        await batcher.stop()
        return results

    assert run(main()) == [2, 4, 6, 12]


def test_a_failing_batch_fails_its_items_and_the_worker_carries_on():
    recorder = Recorder()

    async def main():
        batcher = MicroBatcher(recorder, max_batch=2, max_wait=0.2, max_queue=8)
        batcher.start()
        bad = batcher.submit([-1, 5])
        outcomes = await asyncio.gather(*bad, return_exceptions=True)
        [good] = batcher.submit([7])
        value = await good
        await batcher.stop()
        return outcomes, value

    outcomes, value = run(main())
    assert [type(o) for o in outcomes] == [ValueError, ValueError] and value == 14


def test_settings_are_checked():
    with pytest.raises(ValueError, match=r"^need max_batch >= 1, max_queue >= 1 and max_wait >= 0, got 0, 4, 0.01$"):
        MicroBatcher(Recorder(), max_batch=0, max_wait=0.01, max_queue=4)


def test_exclusive_work_runs_on_the_scoring_thread_between_batches():
    gate = threading.Event()
    recorder = Recorder(gate)
    events: list[str] = []

    def build() -> str:
        events.append(f"built after {len(recorder.batches)} batches")
        return threading.current_thread().name

    async def main():
        batcher = MicroBatcher(recorder, max_batch=1, max_wait=0.0, max_queue=8)
        batcher.start()
        first = batcher.submit([1])
        await asyncio.sleep(0.05)  # [1] is held at the gate, on the scoring thread
        building = asyncio.ensure_future(batcher.run_exclusive(build))
        await asyncio.sleep(0.05)
        assert events == []  # it waits for the batch being scored
        gate.set()
        thread = await building
        await asyncio.gather(*first)
        await batcher.stop()
        return thread

    assert run(main()).startswith("patchcore-score") and events == ["built after 1 batches"]
