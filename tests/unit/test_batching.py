"""The batcher's policy, driven by a recording engine.

The engine here is a stand-in for the model (it returns the running sum of the token IDs, which
is exact and identifies each sequence) so the scheduling decisions can be checked one by one;
the real model goes through the same batcher in tests/api.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import pytest
import torch

from tokenreward_service.batching import Batcher, BatcherConfig, BatchStats, Job
from tokenreward_service.errors import (
    DeadlineExceeded,
    InternalError,
    NotReady,
    Overloaded,
    TooLarge,
)
from tokenreward_service.model import BatchScores


class RecordingEngine:
    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []  # lengths per batch
        self.delay_s = delay_s
        self.gate = gate
        self.fail_next = False
        self.thread_names: set[str] = set()
        self.prompt_lens: list[list[int]] = []
        self.entered = 0  # forward passes begun (the gated one included)

    def score_batch(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> BatchScores:
        self.entered += 1
        self.prompt_lens.append(list(prompt_lens))
        self.thread_names.add(threading.current_thread().name)
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.batches.append([len(s) for s in sequences])
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        scores = [torch.cumsum(torch.tensor(s, dtype=torch.float32), 0) for s in sequences]
        real = sum(map(len, sequences))
        return BatchScores(scores, max(map(len, sequences)) * len(sequences), real, 0)


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll the state a test waits for (never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the state waited for never came"
        await asyncio.sleep(0.001)


def seq(n: int, start: int = 1, prompt_len: int = 1) -> Job:
    return Job(list(range(start, start + n)), min(prompt_len, n))


async def started(engine: RecordingEngine, **cfg: float) -> Batcher:
    batcher = Batcher(engine, BatcherConfig(**cfg))  # type: ignore[arg-type]
    await batcher.start()
    return batcher


async def one_held(
    timeout_s: float,
) -> tuple[threading.Event, RecordingEngine, Batcher, asyncio.Future[list[torch.Tensor]]]:
    """A batcher of one-item batches whose first item is held in the forward pass until the
    returned gate opens: what comes next waits in the queue."""
    gate = threading.Event()
    engine = RecordingEngine(gate=gate)
    batcher = await started(engine, max_batch_size=1, max_wait_s=0)
    held = asyncio.ensure_future(batcher.submit([seq(3)], timeout_s=timeout_s))
    await until(lambda: engine.entered == 1)
    return gate, engine, batcher, held


def test_results_come_back_in_order_for_each_caller() -> None:
    async def main() -> None:
        engine = RecordingEngine()
        batcher = await started(engine, max_wait_s=0.01)
        requests = [[seq(n, start=r * 100) for n in (5, 1, 9)] for r in range(4)]
        results = await asyncio.gather(*(batcher.submit(r, timeout_s=5) for r in requests))
        for request, result in zip(requests, results, strict=True):
            for job, scores in zip(request, result, strict=True):
                expected = torch.cumsum(torch.tensor(job.tokens, dtype=torch.float32), 0)
                assert scores.tolist() == expected.tolist()
        assert sum(len(b) for b in engine.batches) == 12
        assert len(engine.batches) < 12  # concurrent requests shared forward passes
        assert engine.thread_names == {"tokenreward-infer"}
        await batcher.stop()

    asyncio.run(main())


def test_budget_and_size_cap_bound_every_batch() -> None:
    async def main() -> None:
        engine = RecordingEngine()
        stats: list[BatchStats] = []
        batcher = Batcher(
            engine,
            BatcherConfig(max_batch_tokens=64, max_batch_size=5, max_wait_s=0.05),
            on_batch=stats.append,
        )
        await batcher.start()
        lengths = [3, 30, 7, 16, 2, 2, 2, 2, 2, 2, 2, 9, 31, 100]
        await batcher.submit([seq(n) for n in lengths], timeout_s=5)
        for batch in engine.batches:
            assert len(batch) <= 5
            assert max(batch) * len(batch) <= 64 or len(batch) == 1  # alone may exceed
        assert sorted(n for b in engine.batches for n in b) == sorted(lengths)
        assert [s.size for s in stats] == [len(b) for b in engine.batches]
        assert all(s.padded_tokens >= s.real_tokens for s in stats)
        await batcher.stop()

    asyncio.run(main())


def test_items_of_similar_length_share_a_batch() -> None:
    async def main() -> None:
        engine = RecordingEngine()
        batcher = await started(engine, max_batch_tokens=40, max_wait_s=0.05)
        await batcher.submit([seq(n) for n in (10, 2, 10, 2, 10, 2, 10, 2)], timeout_s=5)
        # Sorted by length: the four 10s fill one budget, the 2s another; no 10 pads a 2.
        assert sorted(map(sorted, engine.batches)) == [[2, 2, 2, 2], [10, 10, 10, 10]]
        await batcher.stop()

    asyncio.run(main())


def test_overload_is_refused_at_once_and_too_large_is_not_retryable() -> None:
    async def main() -> None:
        gate = threading.Event()
        engine = RecordingEngine(gate=gate)
        batcher = await started(engine, max_queued_tokens=100, max_batch_size=1, max_wait_s=0)
        first = asyncio.ensure_future(batcher.submit([seq(40), seq(40)], timeout_s=5))
        await until(lambda: engine.entered == 1)  # one item in the (gated) forward pass
        assert batcher.queued_tokens == 40
        with pytest.raises(Overloaded) as info:
            await batcher.submit([seq(61)], timeout_s=5)
        assert info.value.retry_after >= 1
        with pytest.raises(TooLarge):
            await batcher.submit([seq(101)], timeout_s=5)
        ok = asyncio.ensure_future(batcher.submit([seq(60)], timeout_s=5))  # exactly fits
        gate.set()
        assert len(await first) == 2
        assert len(await ok) == 1
        await batcher.stop()

    asyncio.run(main())


def test_cancelled_callers_items_are_dropped_before_inference() -> None:
    async def main() -> None:
        gate, engine, batcher, busy = await one_held(timeout_s=5)
        gone = asyncio.ensure_future(batcher.submit([seq(77), seq(78)], timeout_s=5))
        await until(lambda: batcher.queued_items == 2)
        gone.cancel()
        gate.set()
        await busy
        await batcher.submit([seq(4)], timeout_s=5)
        assert [n for b in engine.batches for n in b] == [3, 4]  # 77 and 78 never ran
        assert batcher.queued_tokens == 0
        await batcher.stop()

    asyncio.run(main())


def test_work_past_its_deadline_is_dropped_with_timeout() -> None:
    async def main() -> None:
        gate, engine, batcher, busy = await one_held(timeout_s=5)
        late = asyncio.ensure_future(batcher.submit([seq(9)], timeout_s=0.01))
        await until(lambda: batcher.queued_items == 1)
        await asyncio.sleep(0.02)  # the deadline itself is what is tested: let it pass
        gate.set()
        await busy
        with pytest.raises(DeadlineExceeded):
            await late
        assert [n for b in engine.batches for n in b] == [3]
        await batcher.stop()

    asyncio.run(main())


def test_a_failed_forward_fails_its_batch_only() -> None:
    async def main() -> None:
        engine = RecordingEngine()
        batcher = await started(engine, max_wait_s=0)
        engine.fail_next = True
        with pytest.raises(InternalError, match="boom"):
            await batcher.submit([seq(3)], timeout_s=5)
        assert len(await batcher.submit([seq(3)], timeout_s=5)) == 1
        await batcher.stop()

    asyncio.run(main())


def test_the_event_loop_keeps_running_during_the_forward_pass() -> None:
    async def main() -> None:
        engine = RecordingEngine(delay_s=0.3)
        batcher = await started(engine, max_wait_s=0)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        await batcher.submit([seq(3)], timeout_s=5)
        task.cancel()
        assert ticks >= 10  # a forward on the loop would have frozen the ticker for 0.3 s
        await batcher.stop()

    asyncio.run(main())


def test_stop_finishes_queued_work_then_refuses() -> None:
    async def main() -> None:
        engine = RecordingEngine(delay_s=0.05)
        batcher = await started(engine, max_batch_size=1, max_wait_s=0)
        pending = asyncio.ensure_future(batcher.submit([seq(2), seq(3), seq(4)], timeout_s=5))
        await until(lambda: engine.entered == 1)
        await batcher.stop()
        assert len(await pending) == 3
        assert not batcher.alive
        with pytest.raises(NotReady):
            await batcher.submit([seq(2)], timeout_s=5)

    asyncio.run(main())


def test_items_sharing_a_prompt_are_batched_together_with_their_prompt_lengths() -> None:
    async def main() -> None:
        engine = RecordingEngine()
        batcher = await started(engine, max_batch_tokens=60, max_wait_s=0.05)
        group_a = [Job([7] * 10 + [i] * (2 + i), 10) for i in range(4)]  # prompt [7]*10
        others = [Job([3] * 12 + [i] * 2, 12) for i in range(4)]  # same lengths as group_a[0]
        await batcher.submit([group_a[0], *others, *group_a[1:]], timeout_s=5)
        first = engine.batches[0]
        assert sorted(first) == sorted(len(j.tokens) for j in group_a)  # the anchor's group
        assert engine.prompt_lens[0] == [10, 10, 10, 10]
        await batcher.stop()

    asyncio.run(main())


def test_batching_off_never_mixes_requests() -> None:
    async def main() -> None:
        engine = RecordingEngine()
        batcher = Batcher(engine, BatcherConfig(max_wait_s=0.05, cross_request=False))
        await batcher.start()
        requests = [[seq(5, start=100 * r + 1), seq(6, start=100 * r + 50)] for r in range(5)]
        await asyncio.gather(*(batcher.submit(r, timeout_s=5) for r in requests))
        assert sorted(map(sorted, engine.batches)) == [[5, 6]] * 5
        await batcher.stop()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("floor", "expected"), [(0.9, [[10, 10], [100, 100]]), (0.0, [[10, 10, 100, 100]])]
)
def test_a_batch_stops_growing_before_padding_passes_the_floor(
    floor: float, expected: list[list[int]]
) -> None:
    async def main() -> None:
        engine = RecordingEngine()
        batcher = await started(
            engine, max_batch_tokens=4096, max_wait_s=0.05, min_padding_efficiency=floor
        )
        await batcher.submit([seq(n) for n in (100, 10, 100, 10)], timeout_s=5)
        assert sorted(map(sorted, engine.batches)) == expected
        await batcher.stop()

    asyncio.run(main())


def test_a_group_that_fits_is_never_split_across_batches() -> None:
    # Length alone would pick B's 20-token item (and C's) to join A; as units, C joins whole and
    # B, which no longer fits beside them, leads the next batch whole.
    async def main() -> None:
        engine = RecordingEngine()
        batcher = await started(engine, max_batch_tokens=240, max_wait_s=0.05)

        def group(prompt: int, lengths: list[int]) -> list[Job]:
            return [Job([prompt] * 10 + [i] * (n - 10), 10) for i, n in enumerate(lengths)]

        a, b, c = group(7, [20] * 4), group(8, [20, 30, 30, 30]), group(9, [21] * 4)
        await batcher.submit([*a, *b, *c], timeout_s=5)
        assert sorted(map(sorted, engine.batches)) == [[20] * 4 + [21] * 4, [20, 30, 30, 30]]
        await batcher.stop()

    asyncio.run(main())


def test_a_group_larger_than_the_budget_fills_batches_in_turn() -> None:
    async def main() -> None:
        engine = RecordingEngine()
        batcher = await started(engine, max_batch_tokens=60, max_wait_s=0.05)
        jobs = [Job([7] * 10 + [i] * 10, 10) for i in range(7)]  # 7 x 20 tokens, budget 3 x 20
        results = await batcher.submit(jobs, timeout_s=5)
        assert engine.batches == [[20] * 3, [20] * 3, [20]]
        assert [float(r[-1]) for r in results] == [70.0 + 10 * i for i in range(7)]
        await batcher.stop()

    asyncio.run(main())


def test_a_caller_that_goes_away_frees_its_share_of_the_bound_at_once() -> None:
    """Before: the cancelled items kept counting until the next batch was taken, so a request
    of the same size was refused with 429 although nothing real waited."""

    async def main() -> None:
        gate = threading.Event()
        engine = RecordingEngine(gate=gate)
        queued: list[tuple[int, int]] = []
        batcher = Batcher(
            engine,
            BatcherConfig(max_queued_tokens=100, max_batch_size=1, max_wait_s=0),
            on_queue=lambda items, tokens: queued.append((items, tokens)),
        )
        await batcher.start()
        busy = asyncio.ensure_future(batcher.submit([seq(10)], timeout_s=5))
        await until(lambda: engine.entered == 1)  # the model is busy (held) with it
        gone = asyncio.ensure_future(batcher.submit([seq(80)], timeout_s=5))
        await until(lambda: batcher.queued_tokens == 80)
        gone.cancel()
        await until(gone.done)
        assert (batcher.queued_items, batcher.queued_tokens) == (0, 0)
        assert queued[-1] == (0, 0)  # the autoscaling signal is not inflated either
        same = asyncio.ensure_future(batcher.submit([seq(80)], timeout_s=5))  # admitted
        await until(lambda: batcher.queued_tokens == 80)
        gate.set()
        await busy
        assert len(await same) == 1
        await batcher.stop()

    asyncio.run(main())


class BrokenEngine(RecordingEngine):
    """Answers with a malformed result: ``wrong_count`` results too few, or none at all (which
    nothing in the scheduler expects: it dies with the batch in flight)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def score_batch(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> BatchScores:
        good = super().score_batch(sequences, prompt_lens)
        if self.mode == "wrong_count":
            return BatchScores(good.scores[:-1], good.computed_tokens, good.real_tokens, 0)
        return BatchScores(None, 0, 0, 0)  # type: ignore[arg-type]


def test_a_wrong_number_of_results_fails_the_batch_not_the_scheduler() -> None:
    async def main() -> None:
        batcher = await started(BrokenEngine("wrong_count"), max_wait_s=0)
        with pytest.raises(InternalError, match="2 results for a batch of 3"):
            await batcher.submit([seq(3), seq(3), seq(3)], timeout_s=5)
        assert batcher.alive
        assert not batcher.failed
        await batcher.stop()

    asyncio.run(main())


def test_a_failing_observer_does_not_take_the_results_or_the_scheduler() -> None:
    async def main() -> None:
        def observe(_: BatchStats) -> None:
            raise RuntimeError("metrics backend broke")

        batcher = Batcher(RecordingEngine(), BatcherConfig(max_wait_s=0), on_batch=observe)
        await batcher.start()
        for _ in range(2):
            assert len(await batcher.submit([seq(3)], timeout_s=5)) == 1
        assert batcher.alive
        await batcher.stop()

    asyncio.run(main())


def test_a_dead_scheduler_fails_the_batch_in_flight_at_once_and_says_so() -> None:
    """Before: the in-flight batch's callers waited for their own deadline (here 30 s)."""

    async def main() -> None:
        batcher = await started(BrokenEngine("none"), max_wait_s=0)
        started_at = time.monotonic()
        # Not the request's fault: a retryable 503, so clients go to another replica.
        with pytest.raises(NotReady, match="scheduler failed"):
            await batcher.submit([seq(3)], timeout_s=30)
        assert time.monotonic() - started_at < 5
        assert batcher.failed
        assert not batcher.alive
        with pytest.raises(NotReady):
            await batcher.submit([seq(3)], timeout_s=30)
        await batcher.stop()

    asyncio.run(main())


def test_a_cancelled_scheduler_answers_its_callers_at_once() -> None:
    """A scheduler task that ends by cancellation (as a crash would end it) answers what is
    queued and in flight with NotReady at once, instead of leaving the callers to wait for
    their deadlines (or, on Ray, for the replica to be killed)."""

    async def main() -> None:
        gate, _, batcher, running = await one_held(timeout_s=60)
        queued = asyncio.ensure_future(batcher.submit([seq(4)], timeout_s=60))
        await until(lambda: batcher.queued_items == 1)
        (scheduler,) = [t for t in asyncio.all_tasks() if t.get_name() == "tokenreward-batcher"]
        scheduler.cancel()
        for caller in (running, queued):
            with pytest.raises(NotReady, match="scheduler stopped"):
                await caller
        assert not batcher.alive
        assert not batcher.failed  # a stop, not a crash
        assert batcher.queued_tokens == 0
        with pytest.raises(NotReady):
            await batcher.submit([seq(3)], timeout_s=30)
        gate.set()
        await batcher.stop()

    asyncio.run(main())


def test_retry_after_is_the_time_until_the_request_fits() -> None:
    """Before: the time to drain the whole queue plus the request (capped at 60 s), so
    clients that obeyed it left the device idle. Checked against the measured drain."""

    async def main() -> None:
        engine = RecordingEngine(delay_s=0.1)  # 100-token batches: 1,000 tokens/s
        batcher = await started(
            engine, max_queued_tokens=4000, max_batch_tokens=100, max_batch_size=1, max_wait_s=0
        )
        fill = asyncio.ensure_future(batcher.submit([seq(100)] * 40, timeout_s=60))
        await until(lambda: len(engine.batches) >= 2)  # a rate has been seen
        with pytest.raises(Overloaded) as info:
            await batcher.submit([seq(100)] * 30, timeout_s=60)
        estimate = info.value.retry_after
        started_at = time.monotonic()
        await until(lambda: batcher.free_tokens >= 3000, timeout_s=20)  # it would fit now
        measured = time.monotonic() - started_at
        assert 0.5 * measured <= estimate <= 1.5 * measured + 1.0, (estimate, measured)
        fill.cancel()
        await asyncio.gather(fill, return_exceptions=True)
        await batcher.stop()

    asyncio.run(main())


def test_the_next_batch_is_handed_over_before_the_running_one_ends() -> None:
    """Once the device's speed is known, the next batch waits on the inference thread before
    the running one ends, so the thread starts it without the event loop; before that (no
    rate seen yet) a batch is closed only after the running one is back."""

    async def main() -> None:
        engine = RecordingEngine(delay_s=0.3)
        # Items of different lengths never share a batch here, and the queue is never full.
        batcher = await started(engine, max_wait_s=0, handover_s=0.2, min_padding_efficiency=1)
        queued_at_end = record_queue_at_each_end(engine, batcher)
        assert BatcherConfig().handover_s == 0.005  # the README's "5 ms before"
        # No rate yet: the second item stays queued until the first batch is back.
        await batcher.submit([seq(5), seq(6)], timeout_s=30)
        assert queued_at_end == [1, 0]
        # The rate is known (about 0.06 s per padded token): while the first of three runs,
        # the second is taken 0.2 s before the first's expected end, the third 0.2 s before
        # the second's. Without the hand-over: [2, 1, 0].
        queued_at_end.clear()
        await batcher.submit([seq(5), seq(6), seq(7)], timeout_s=30)
        assert queued_at_end == [1, 0, 0]
        await batcher.stop()

    asyncio.run(main())


def test_a_full_queue_fills_the_waiting_batches_at_once() -> None:
    """With a full batch queued, up to ``waiting_batches`` (2) wait behind the running one,
    whatever its expected end: the device has work in hand if the event loop comes round
    late."""

    async def main() -> None:
        engine = RecordingEngine(delay_s=0.1)
        batcher = await started(engine, max_batch_size=1, max_wait_s=0, handover_s=0)
        queued_at_end = record_queue_at_each_end(engine, batcher)
        assert BatcherConfig().waiting_batches == 2
        await batcher.submit([seq(5)], timeout_s=30)  # a rate is seen
        queued_at_end.clear()
        await batcher.submit([seq(5)] * 5, timeout_s=30)
        # The first runs, two wait on the thread: 2 of 5 are still queued when it ends.
        # With one waiting: [3, 2, 1, 0, 0]; without the hand-over: [4, 3, 2, 1, 0].
        assert queued_at_end == [2, 1, 0, 0, 0]
        await batcher.stop()

    asyncio.run(main())


def record_queue_at_each_end(engine: RecordingEngine, batcher: Batcher) -> list[int]:
    """The batcher's queued items as each forward pass ends (from the inference thread)."""
    queued_at_end: list[int] = []
    real_score = engine.score_batch

    def score(sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> BatchScores:
        out = real_score(sequences, prompt_lens)
        queued_at_end.append(batcher.queued_items)
        return out

    engine.score_batch = score  # type: ignore[method-assign]
    return queued_at_end


def test_a_batch_waiting_behind_the_running_one_is_answered_and_failures_stay_its_own() -> None:
    """Two batches on the thread at once: each caller gets its own scores, a failing forward
    pass fails only its own batch, and stop() waits for both."""

    async def main() -> None:
        gate = threading.Event()
        gate.set()
        engine = RecordingEngine(delay_s=0.05, gate=gate)
        batcher = await started(engine, max_batch_size=2, max_wait_s=0, handover_s=1.0)
        await batcher.submit([seq(4)], timeout_s=30)  # a rate is seen
        gate.clear()  # the next batch is held in the engine until the gate opens
        engine.fail_next = True  # and fails
        first = asyncio.ensure_future(
            batcher.submit([seq(3, start=1), seq(3, start=7)], timeout_s=30)
        )
        await until(lambda: engine.entered == 2)
        second = asyncio.ensure_future(batcher.submit([seq(6, start=50)], timeout_s=30))
        await until(lambda: batcher.queued_items == 0)  # handed over while the first runs
        assert engine.entered == 2
        gate.set()
        with pytest.raises(InternalError, match="boom"):
            await first
        (scores,) = await second
        assert scores.tolist() == torch.cumsum(torch.arange(50.0, 56.0), 0).tolist()
        third = asyncio.ensure_future(batcher.submit([seq(2)], timeout_s=30))
        await until(lambda: batcher.queued_items == 1 or engine.entered == 4)  # admitted
        await batcher.stop()
        assert len(await third) == 1
        assert not batcher.failed

    asyncio.run(main())
