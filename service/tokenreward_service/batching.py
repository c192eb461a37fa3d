"""Async micro-batcher: items of concurrent requests share forward passes.

Items wait in one queue. A scheduler task closes a batch when the queue holds a full padded-token
budget, or after a short wait, whichever comes first; it anchors the batch on the oldest item
(no starvation) and adds the items closest to it in length (little padding), under the budget
(padded cost = longest x count) and a size cap. The forward pass runs on one dedicated thread, so
the event loop keeps accepting, timing out and rejecting while the model works. The next batch
is handed to that thread shortly before the running one is expected to end, so the device goes
from one to the next without waiting for the event loop to come round. Admission is
bounded by queued tokens: past the bound a request is refused at once with
:class:`~tokenreward_service.errors.Overloaded` rather than queued without limit.

This module never imports FastAPI and raises domain errors only.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tokenreward_service.errors import (
    DeadlineExceeded,
    InternalError,
    NotReady,
    Overloaded,
    TooLarge,
)
from tokenreward_service.inference import Landed, Pipeline
from tokenreward_service.model import MIN_SHARED_PROMPT, BatchScores

__all__ = ["BatchStats", "Batcher", "BatcherConfig", "Engine", "Job", "admit", "retry_after_s"]

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the batcher needs of a model: per-position scores of each sequence, given where
    each prompt ends (so that items sharing a prompt can share its computation)."""

    def score_batch(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> BatchScores: ...


def retry_after_s(excess: int, tokens_per_s: float) -> int:
    """Seconds until ``excess`` tokens over the queue bound have been taken off the queue at
    ``tokens_per_s`` (not the time to drain it all, which would idle the device for clients
    that obey); 1 s while no rate is known, and never more than a minute."""
    if excess <= 0 or not tokens_per_s:
        return 1
    return max(1, min(60, math.ceil(excess / tokens_per_s)))


def admit(tokens: int, queued: int, bound: int, retry_after: Callable[[int], int]) -> None:
    """Refuse a request of ``tokens`` tokens that can never fit under the queue bound
    (:class:`TooLarge`) or does not fit now, with ``queued`` tokens waiting (:class:`Overloaded`,
    with the seconds ``retry_after`` gives)."""
    if tokens > bound:
        raise TooLarge(
            f"request holds {tokens} tokens, more than the queue bound ({bound}); split it"
        )
    if queued + tokens > bound:
        raise Overloaded(f"queue full ({queued} tokens waiting)", retry_after=retry_after(tokens))


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_tokens: int = 16384
    max_batch_size: int = 256
    max_wait_s: float = 0.002
    max_queued_tokens: int = 1_048_576
    cross_request: bool = True
    """False: a batch holds one request's items only (per-request batching, for comparison)."""
    min_padding_efficiency: float = 0.9
    """A batch stops growing when adding the next item would make real / padded tokens fall
    below this; 0 fills the budget whatever the padding."""
    group_prompts: bool = True
    """Put items that share the anchor's prompt in its batch first (the engine shares it)."""
    handover_s: float = 0.005
    """The next batch is closed and queued on the inference thread this long before the
    running one is expected to end (from the device's measured seconds per padded token), so
    the thread starts it at once instead of waiting for the event loop to come round, which
    under load takes a millisecond or more while the device idles. Closing it earlier only
    takes items out of reach of those still arriving."""
    waiting_batches: int = 2
    """Batches that may wait on the inference thread behind the running one. A queue that
    holds a full batch fills them at once, so the device has that much work in hand when the
    event loop comes round late (on the simulated 1M tokens/s device, with 32-item requests,
    the device idled 7% of the time with one waiting and 3% with two)."""


@dataclass(frozen=True)
class BatchStats:
    """What one forward pass did; handed to the ``on_batch`` observer (metrics)."""

    size: int
    submitted_tokens: int
    """Tokens of the batch's items."""
    real_tokens: int
    """Tokens the model computed, padding excluded (a shared prompt counts once)."""
    padded_tokens: int
    """Positions the model computed, padding included (shared prompts count once)."""
    shared_items: int
    oom_splits: int
    queue_wait_s: float
    inference_s: float


@dataclass(frozen=True)
class Job:
    """One sequence to score: ``tokens`` whose first ``prompt_len`` are the prompt."""

    tokens: Sequence[int]
    prompt_len: int


@dataclass(eq=False)
class _Pending:
    job: Job
    future: asyncio.Future[torch.Tensor]
    enqueued: float
    deadline: float
    request: int
    arrival: int = 0
    """Its place in arrival order (FIFO)."""
    length: int = field(init=False)
    prompt_key: tuple[int, ...] = field(init=False)
    released: bool = False
    """Its tokens no longer count against the queue bound (taken, dropped or given up)."""

    def __post_init__(self) -> None:
        self.length = len(self.job.tokens)
        self.prompt_key = tuple(self.job.tokens[: self.job.prompt_len])


@dataclass(eq=False)
class _Running:
    """A batch handed to the inference thread."""

    items: list[_Pending]
    padded: int
    """Its padded size (longest x count), for the estimate of when it ends."""
    queued: float
    started: float | None = None
    """When the thread began it (None while it waits behind the running one)."""


@dataclass(eq=False)
class _Unit:
    """Items that go into a batch together: those sharing a prompt, or one item alone."""

    key: object
    scope: int | None
    items: OrderedDict[int, _Pending] = field(default_factory=OrderedDict)
    entry: tuple[int, int, int] | None = None
    """Its place in its scope's length index: (longest, first arrival, unit number)."""


class _Queue:
    """The waiting items, indexed so that a batch decision costs O(batch), not O(queue).

    Items are kept in arrival order (the anchor is the oldest), grouped into units (items that
    share a prompt go together), and each scope's units (all of them when requests share
    batches, else each request's own) are kept sorted by their longest item, so that a batch
    grows outwards in length from its anchor without looking at the rest of the queue.
    Deadlines are in a heap: expired items are found without a scan.
    """

    def __init__(self, *, cross_request: bool, group_prompts: bool) -> None:
        self._cross_request = cross_request
        self._group_prompts = group_prompts
        self._items: OrderedDict[int, _Pending] = OrderedDict()
        self._unit_of: dict[int, _Unit] = {}
        self._units: dict[object, _Unit] = {}
        self._numbers: dict[int, _Unit] = {}
        self._index: dict[int | None, list[tuple[int, int, int]]] = {}
        self._deadlines: list[tuple[float, int, _Pending]] = []
        self._lengths: Counter[int] = Counter()
        self._longest = 0
        self._arrivals = 0
        self._unit_numbers = 0

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[_Pending]:
        return iter(list(self._items.values()))

    def oldest(self) -> _Pending | None:
        return next(iter(self._items.values()), None)

    def longest(self) -> int:
        """The longest queued item's length."""
        return self._longest

    def add(self, item: _Pending) -> None:
        self._arrivals += 1
        item.arrival = self._arrivals
        self._items[id(item)] = item
        heapq.heappush(self._deadlines, (item.deadline, item.arrival, item))
        self._lengths[item.length] += 1
        self._longest = max(self._longest, item.length)
        scope = None if self._cross_request else item.request
        shared = self._group_prompts and len(item.prompt_key) >= MIN_SHARED_PROMPT
        key = (scope, item.prompt_key) if shared else (scope, id(item))
        unit = self._units.get(key)
        if unit is None:
            unit = self._units[key] = _Unit(key, scope)
        else:
            self._unindex(unit)
        unit.items[id(item)] = item
        self._unit_of[id(item)] = unit
        self._reindex(unit)

    def remove(self, item: _Pending) -> None:
        """Take ``item`` out (a no-op when it is not queued)."""
        if self._items.pop(id(item), None) is None:
            return
        self._lengths[item.length] -= 1
        if not self._lengths[item.length]:
            del self._lengths[item.length]
            if item.length == self._longest:
                self._longest = max(self._lengths, default=0)
        unit = self._unit_of.pop(id(item))
        self._unindex(unit)
        del unit.items[id(item)]
        if unit.items:
            self._reindex(unit)
        else:
            del self._units[unit.key]
        if len(self._deadlines) > 2 * len(self._items) + 1024:
            # Taken items stay in the heap until their deadline passes; rebuilt from what is
            # queued once they outnumber it, so they are not held for the whole timeout.
            self._deadlines = [(p.deadline, p.arrival, p) for p in self._items.values()]
            heapq.heapify(self._deadlines)

    def expired(self, now: float) -> list[_Pending]:
        """Queued items whose deadline has passed, taken out of the queue."""
        out: list[_Pending] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, item = heapq.heappop(self._deadlines)
            if id(item) in self._items and self._items[id(item)] is item:
                self.remove(item)
                out.append(item)
        return out

    def unit_items(self, item: _Pending) -> list[_Pending]:
        """The items of ``item``'s unit, in arrival order."""
        return list(self._unit_of[id(item)].items.values())

    def outward(self, anchor: _Pending) -> Iterator[tuple[int, list[_Pending]]]:
        """The other units of the anchor's scope as (longest, items), nearest the anchor's
        length first (on a tie in distance, the longer side; then the earlier arrival)."""
        own = self._unit_of[id(anchor)]
        index = self._index.get(own.scope, [])
        high = bisect.bisect_left(index, (anchor.length, -1, -1))
        low = high - 1
        while True:
            while low >= 0 and self._numbers[index[low][2]] is own:
                low -= 1
            while high < len(index) and self._numbers[index[high][2]] is own:
                high += 1
            if low < 0 and high >= len(index):
                return
            if high < len(index) and (
                low < 0 or index[high][0] - anchor.length <= anchor.length - index[low][0]
            ):
                entry = index[high]
                high += 1
            else:
                entry = index[low]
                low -= 1
            yield entry[0], list(self._numbers[entry[2]].items.values())

    def _unindex(self, unit: _Unit) -> None:
        if unit.entry is None:
            return
        index = self._index[unit.scope]
        del index[bisect.bisect_left(index, unit.entry)]
        if not index:
            del self._index[unit.scope]
        del self._numbers[unit.entry[2]]
        unit.entry = None

    def _reindex(self, unit: _Unit) -> None:
        self._unit_numbers += 1
        number = self._unit_numbers
        first = next(iter(unit.items.values()))
        unit.entry = (max(p.length for p in unit.items.values()), first.arrival, number)
        self._numbers[number] = unit
        bisect.insort(self._index.setdefault(unit.scope, []), unit.entry)


class Batcher:
    """Schedules sequences into batches for one :class:`Engine` on one inference thread."""

    def __init__(
        self,
        engine: Engine,
        config: BatcherConfig,
        *,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_queue: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._config = config
        self._on_batch = on_batch
        self._on_queue = on_queue
        self._clock = clock
        self._queue = _Queue(cross_request=config.cross_request, group_prompts=config.group_prompts)
        self._queued_tokens = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pipeline: Pipeline[_Running] | None = None
        self._closing = False
        self._failed = False
        self._running: list[_Running] = []
        self._crash: BaseException | None = None
        self._tokens_per_s = 0.0
        self._s_per_padded = 0.0
        self._budget = config.max_batch_tokens
        self._requests = 0

    @property
    def alive(self) -> bool:
        """True while the scheduler runs and accepts work."""
        return self._task is not None and not self._task.done() and not self._closing

    @property
    def failed(self) -> bool:
        """True once the scheduler has died: the process can no longer serve and should be
        restarted (liveness reads this; a clean stop is not a failure)."""
        return self._failed or (
            self._task is not None
            and self._task.done()
            and not self._task.cancelled()
            and self._task.exception() is not None
        )

    @property
    def queued_items(self) -> int:
        return len(self._queue)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def batch_token_budget(self) -> int:
        """The padded-token budget in force (lowered after the device ran out of memory)."""
        return self._budget

    @property
    def tokens_per_s(self) -> float:
        """The rate at which the model has been taking tokens off the queue (0 before the
        first batch)."""
        return self._tokens_per_s

    async def finished(self) -> None:
        """Return once the scheduler has ended, whether stopped or failed (see ``failed``)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):  # failures were logged
                await asyncio.shield(self._task)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def started(running: _Running) -> None:
            running.started = self._clock()

        def deliver(landed: Landed[_Running]) -> None:
            loop.call_soon_threadsafe(self._landed, landed)

        self._pipeline = Pipeline(
            self._engine,
            on_start=started,
            deliver=deliver,
            clock=self._clock,
            ahead=1 + self._config.waiting_batches,  # every batch handed over is launched
        )
        self._pipeline.start()
        self._task = asyncio.create_task(self._run(), name="tokenreward-batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop the scheduler and the inference thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):  # failures were logged
                await self._task
        if self._pipeline is not None:
            await asyncio.to_thread(self._pipeline.stop)

    async def submit(self, jobs: Sequence[Job], *, timeout_s: float) -> list[torch.Tensor]:
        """Score ``jobs`` (in order) and return each one's per-position scores.

        All or nothing: the request is admitted whole or refused whole. Cancelling the caller
        (a client that went away, a deadline) drops its items that are still queued.
        """
        if not self.alive:
            raise NotReady("the batcher is not running")
        tokens = sum(len(job.tokens) for job in jobs)
        admit(tokens, self._queued_tokens, self._config.max_queued_tokens, self.retry_after)
        loop = asyncio.get_running_loop()
        now = self._clock()
        self._requests += 1
        pending = [
            _Pending(job, loop.create_future(), now, now + timeout_s, self._requests)
            for job in jobs
        ]
        for p in pending:
            self._queue.add(p)
        self._queued_tokens += tokens
        self._report_queue()
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        finally:
            for p in pending:
                if not p.future.done():
                    p.future.cancel()
            gone = [p for p in pending if not p.released]  # still queued
            if gone:
                # The caller went away (disconnect, deadline, a sibling's failure): its items
                # leave the queue and the bound now, not when the next batch is taken, so a
                # new request is not refused for work that nobody waits for.
                self._release(gone)
                for p in gone:
                    self._queue.remove(p)
                self._report_queue()

    @property
    def free_tokens(self) -> int:
        """Tokens the queue admits now."""
        return max(0, self._config.max_queued_tokens - self._queued_tokens)

    def retry_after(self, tokens: int) -> int:
        """Seconds until ``tokens`` fit under the bound: the excess over what is free, at the
        rate the model has been taking work off the queue (not the time to drain it all, which
        would idle the device for clients that obey). 1 s before any rate was seen."""
        excess = self._queued_tokens + tokens - self._config.max_queued_tokens
        return retry_after_s(excess, self._tokens_per_s)

    def _report_queue(self) -> None:
        if self._on_queue is not None:
            try:
                self._on_queue(len(self._queue), self._queued_tokens)
            except Exception:
                log.exception("the queue observer failed")

    def _drop(self, item: _Pending) -> None:
        self._release([item])

    def _release(self, items: Sequence[_Pending]) -> None:
        for item in items:
            if not item.released:
                item.released = True
                self._queued_tokens -= item.length

    def _take_batch(self) -> list[_Pending]:
        """Remove and return the next batch; expired and cancelled items are dropped on the way.

        Costs O(batch), not O(queue): the anchor is the oldest item, its unit comes from the
        queue's index, and the other units are visited outwards in length from the anchor's,
        nearest first, until one does not fit.
        """
        for item in self._queue.expired(self._clock()):
            self._drop(item)
            if not item.future.done():
                item.future.set_exception(
                    DeadlineExceeded("the request waited past its deadline in the queue")
                )
        anchor = self._queue.oldest()
        while anchor is not None and anchor.future.done():  # its caller is gone
            self._queue.remove(anchor)
            self._drop(anchor)
            anchor = self._queue.oldest()
        if anchor is None:
            self._report_queue()
            return []
        cfg = self._config
        # Units: the items that share a prompt go together (the engine computes it once for
        # them; split across batches it would be computed again, or in full for a lone item).
        first = self._queue.unit_items(anchor)
        batch: list[_Pending] = []
        longest = real = 0
        for item in sorted(first, key=lambda p: p is not anchor):  # the anchor, then siblings
            padded = max(longest, item.length) * (len(batch) + 1)
            if batch and (padded > self._budget or len(batch) >= cfg.max_batch_size):
                break  # a group bigger than a batch: the rest of it leads a later batch
            batch.append(item)
            longest, real = max(longest, item.length), real + item.length
        # Grow outwards in length from the anchor's unit, nearest first, whole units only.
        for unit_longest, unit in self._queue.outward(anchor):
            if len(batch) >= cfg.max_batch_size:
                break
            new_longest = max(longest, unit_longest)
            count = len(batch) + len(unit)
            if new_longest * count > self._budget or count > cfg.max_batch_size:
                break
            added = sum(p.length for p in unit)
            if real + added < cfg.min_padding_efficiency * new_longest * count:
                break  # the rest waits for a batch of its own length: padding is pure waste
            batch.extend(unit)
            longest, real = new_longest, real + added
        for item in batch:
            self._queue.remove(item)
            self._drop(item)
        self._report_queue()
        return batch

    def _close_at(self, first_seen: float) -> float:
        """When the next batch closes: at once when closing or when the queue holds a full
        batch, else when the oldest item has waited ``max_wait_s`` and, with batches on the
        inference thread, ``handover_s`` ahead of the expected end of the last of them. While
        no rate is known a batch closes only after the running one is back (its end wakes the
        scheduler).

        A full queue does not wait for the running batch: nothing more could join the next
        one, and the event loop, busy with requests, can come round many milliseconds late
        for a hand-over timed to the end (measured on the simulated 1M tokens/s device:
        14% of the time idle in gaps between batches with 170 items queued)."""
        if self._closing:
            return -math.inf
        full = self._queue.longest() * len(self._queue) >= self._budget or (
            len(self._queue) >= self._config.max_batch_size
        )
        at = -math.inf if full else first_seen + self._config.max_wait_s
        if self._running and not self._s_per_padded:
            return math.inf
        if full or not self._running:
            return at
        end = -math.inf  # the expected end of the batches on the device, one after another
        for running in self._running:
            begin = max(end, running.queued if running.started is None else running.started)
            end = begin + running.padded * self._s_per_padded
        return max(at, end - self._config.handover_s)

    async def _run(self) -> None:
        """The scheduler; should it ever fail or be cancelled, every waiting caller gets an
        error at once, not a hang until its deadline."""
        try:
            await self._schedule()
        except asyncio.CancelledError:
            self._abandon("stopped")
            raise
        except BaseException:
            log.exception(
                "the batch scheduler failed: failing %d waiting and %d in-flight items; the "
                "process must be restarted (liveness now fails)",
                len(self._queue),
                sum(len(r.items) for r in self._running),
            )
            self._failed = True
            self._abandon("failed")
            raise

    def _abandon(self, how: str) -> None:
        """Answer every queued and in-flight caller with :class:`NotReady` (503, which clients
        retry, on another replica when they have one): the request did nothing wrong and this
        process can no longer serve it, while a 500 would tell the client not to try again."""
        self._closing = True
        error = f"the batch scheduler {how}; this server cannot serve until it is restarted"
        in_flight = [item for running in self._running for item in running.items]
        for item in [*in_flight, *self._queue]:
            if not item.future.done():
                item.future.set_exception(NotReady(error))
        self._running = []
        queued = list(self._queue)
        self._release(queued)  # so that their callers' own clean-up does not release them again
        for item in queued:
            self._queue.remove(item)
        self._report_queue()

    async def _schedule(self) -> None:
        while True:
            if self._crash is not None:
                raise self._crash
            # One batch runs and at most `waiting_batches` wait behind it on the thread.
            if not self._queue or len(self._running) > self._config.waiting_batches:
                if self._closing and not self._queue and not self._running:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = self._queue.oldest()
            assert oldest is not None
            first_seen = oldest.enqueued  # the oldest item's wait counts, not ours
            close_at = self._close_at(first_seen)
            if self._clock() < close_at:
                self._wakeup.clear()  # new items, or the running batch's end, re-decide
                timeout = None if close_at == math.inf else close_at - self._clock()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)
                continue
            batch = self._take_batch()
            if batch:
                self._launch(batch)

    def _launch(self, batch: list[_Pending]) -> None:
        """Hand ``batch`` to the inference threads; it lands in :meth:`_landed`."""
        running = _Running(batch, max(p.length for p in batch) * len(batch), self._clock())
        self._running.append(running)
        assert self._pipeline is not None
        self._pipeline.put(
            running, [p.job.tokens for p in batch], [p.job.prompt_len for p in batch]
        )

    def _landed(self, landed: Landed[_Running]) -> None:
        """On the event loop, when a batch is back: a model failure fails that batch only;
        anything failing here is the scheduler's failure (it is raised there)."""
        running = landed.batch
        if running not in self._running:
            return  # the scheduler ended meanwhile and answered its callers
        try:
            self._running.remove(running)
            self._wakeup.set()
            batch = running.items
            error = landed.error
            if error is not None or landed.scores is None:
                log.error("forward pass failed for a batch of %d", len(batch), exc_info=error)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(InternalError(f"forward pass failed: {error}"))
                return
            self._finish(batch, (landed.scores, landed.started, landed.elapsed))
        except BaseException as exc:
            self._crash = exc
            self._running.append(running)  # its callers are failed with the rest

    def _finish(self, batch: list[_Pending], ran: tuple[BatchScores, float, float] | None) -> None:
        """Hand each caller its scores. An engine answering with the wrong number of results
        fails the batch (never a shifted result); a failing observer is logged, not fatal."""
        if ran is None:
            return
        scored, started, elapsed = ran
        if len(scored.scores) != len(batch):
            log.error("the engine returned %d results for %d items", len(scored.scores), len(batch))
            error = f"the model returned {len(scored.scores)} results for a batch of {len(batch)}"
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(InternalError(error))
            return
        if scored.oom_splits and self._budget > 1024:
            # The device ran out of memory at this budget: later batches get a smaller one.
            self._budget = max(1024, self._budget // 2)
            log.warning("out of device memory: batch token budget lowered to %d", self._budget)
        for p, result in zip(batch, scored.scores, strict=True):
            if not p.future.done():
                p.future.set_result(result)
        real = sum(p.length for p in batch)
        if elapsed > 0:
            rate = real / elapsed
            self._tokens_per_s = (
                rate if not self._tokens_per_s else 0.8 * self._tokens_per_s + 0.2 * rate
            )
            per_padded = elapsed / (max(p.length for p in batch) * len(batch))
            self._s_per_padded = (
                per_padded
                if not self._s_per_padded
                else 0.8 * self._s_per_padded + 0.2 * per_padded
            )
        if self._on_batch is None:
            return
        try:
            self._on_batch(
                BatchStats(
                    size=len(batch),
                    submitted_tokens=real,
                    real_tokens=scored.real_tokens,
                    padded_tokens=scored.computed_tokens,
                    shared_items=scored.shared_items,
                    oom_splits=scored.oom_splits,
                    queue_wait_s=started - min(p.enqueued for p in batch),
                    inference_s=elapsed,
                )
            )
        except Exception:
            log.exception("the batch observer failed; the results were delivered")
