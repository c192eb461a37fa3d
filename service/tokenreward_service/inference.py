"""The inference threads: batches are launched on the device in order on one thread and
collected in order on another, so the next batch starts before the running one is back.

With one thread that launches a batch and then waits for it, the device idles from the end of
each batch until that thread has woken, taken the GIL back, handed the results over and laid
out and launched the next batch: on the simulated 1M tokens/s device that was 0.3 ms between
batches plus 0.3-0.6 ms of waking late, 5-8% of the device's time. A device runs what it is
given in order, so the next batch can be launched while the running one computes: the device
goes from one to the next by itself, and the host's work for a batch (layout, the launch, the
hand-over of results) overlaps the device's work on another.

An engine that can launch without waiting offers ``launch_batch(sequences, prompt_lens)``,
returning a function that waits for the results (:meth:`RewardModel.launch_batch
<tokenreward_service.model.RewardModel.launch_batch>` on CUDA); any other engine is run with
``score_batch`` on the launching thread, and its results are handed over by the other.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from tokenreward_service.model import BatchScores

__all__ = ["Landed", "Pipeline"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Waiter = Callable[[], BatchScores]


@dataclass(frozen=True)
class Landed(Generic[T]):
    """A batch back from the device: its scores or the error that failed it, and its device
    time (from when it started computing, after the batch before it, to when it was back)."""

    batch: T
    scores: BatchScores | None
    error: BaseException | None
    started: float
    elapsed: float


class Pipeline(Generic[T]):
    """Two threads around one engine (``score_batch``, and ``launch_batch`` where it has one):
    ``put`` hands a batch over, ``on_start(batch)`` is called
    on the launching thread as it begins, and ``deliver(landed)`` on the collecting thread once
    it is back, in the order they were put. At most ``ahead`` batches are launched and not yet
    collected (the device's memory holds that many at once)."""

    def __init__(
        self,
        engine: Any,
        *,
        on_start: Callable[[T], None],
        deliver: Callable[[Landed[T]], None],
        clock: Callable[[], float],
        ahead: int = 2,
        name: str = "tokenreward-infer",
    ) -> None:
        self._engine = engine
        self._on_start = on_start
        self._deliver = deliver
        self._clock = clock
        self._slots = threading.Semaphore(ahead)
        self._to_launch: queue.SimpleQueue[tuple[T, Sequence[Sequence[int]], Sequence[int]] | None]
        self._to_launch = queue.SimpleQueue()
        self._to_collect: queue.SimpleQueue[tuple[T, Waiter, float] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._launching, name=name, daemon=True),
            threading.Thread(target=self._collecting, name=f"{name}-collect", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def put(self, batch: T, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> None:
        self._to_launch.put((batch, sequences, prompt_lens))

    def stop(self) -> None:
        """Finish what was put, then end both threads (blocks: call it off the event loop)."""
        self._to_launch.put(None)
        for thread in self._threads:
            if thread.is_alive():
                thread.join()

    def _launching(self) -> None:
        while (work := self._to_launch.get()) is not None:
            batch, sequences, prompt_lens = work
            self._slots.acquire()
            started = self._clock()
            try:
                self._on_start(batch)
                waiter = self._launch(sequences, prompt_lens)
            except BaseException as exc:  # fails this batch only, as it lands
                waiter = _raiser(exc)
            self._to_collect.put((batch, waiter, started))
        self._to_collect.put(None)

    def _launch(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> Waiter:
        launch: Callable[..., Waiter] | None = getattr(self._engine, "launch_batch", None)
        if launch is not None:
            return launch(sequences, prompt_lens)
        scores: BatchScores = self._engine.score_batch(sequences, prompt_lens)
        return lambda: scores

    def _collecting(self) -> None:
        previous_end = -float("inf")
        while (work := self._to_collect.get()) is not None:
            batch, waiter, launched = work
            scores: BatchScores | None = None
            error: BaseException | None = None
            try:
                scores = waiter()
            except BaseException as exc:
                error = exc
            end = self._clock()
            self._slots.release()
            started = max(launched, previous_end)  # it computed once the one before was done
            previous_end = end
            try:
                self._deliver(Landed(batch, scores, error, started, end - started))
            except Exception:
                log.exception("handing a batch's results over failed")


def _raiser(error: BaseException) -> Waiter:
    def wait() -> BatchScores:
        raise error

    return wait
