"""The scheduler's indexed queue chooses exactly the batches that scanning the whole queue
chose (the reference below is that scan, as the batcher did it before the index): random
queues of random shapes, with and without cross-request batching and prompt groups."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from tokenreward_service.batching import Batcher, BatcherConfig, Job, _Pending
from tokenreward_service.model import MIN_SHARED_PROMPT


def reference_take(queue: list[_Pending], cfg: BatcherConfig, budget: int) -> list[_Pending]:
    """The batch the whole-queue scan picks (no item is expired or cancelled here)."""
    live = list(queue)
    if not live:
        return []
    anchor = live[0]
    candidates = live if cfg.cross_request else [p for p in live if p.request == anchor.request]
    units: dict[object, list[_Pending]] = {}
    for p in candidates:
        shared = cfg.group_prompts and len(p.prompt_key) >= MIN_SHARED_PROMPT
        units.setdefault(p.prompt_key if shared else id(p), []).append(p)
    first = next(unit for unit in units.values() if unit[0] is anchor)
    batch: list[_Pending] = []
    longest = real = 0
    for item in sorted(first, key=lambda p: p is not anchor):
        padded = max(longest, item.length) * (len(batch) + 1)
        if batch and (padded > budget or len(batch) >= cfg.max_batch_size):
            break
        batch.append(item)
        longest, real = max(longest, item.length), real + item.length
    others = sorted(
        ((max(p.length for p in unit), unit) for unit in units.values() if unit is not first),
        key=lambda pair: pair[0],
    )
    low = sum(1 for length, _ in others if length < anchor.length) - 1
    high = low + 1
    while len(batch) < cfg.max_batch_size and (low >= 0 or high < len(others)):
        if high < len(others) and (
            low < 0 or others[high][0] - anchor.length <= anchor.length - others[low][0]
        ):
            unit_longest, unit = others[high]
            high += 1
        else:
            unit_longest, unit = others[low]
            low -= 1
        new_longest = max(longest, unit_longest)
        count = len(batch) + len(unit)
        if new_longest * count > budget or count > cfg.max_batch_size:
            break
        added = sum(p.length for p in unit)
        if real + added < cfg.min_padding_efficiency * new_longest * count:
            break
        batch.extend(unit)
        longest, real = new_longest, real + added
    return batch


class NeverCalled:
    def score_batch(self, sequences: Any, prompt_lens: Any) -> Any:
        raise AssertionError("no forward pass in this test")


def _scenario(seed: int) -> None:
    rng = random.Random(seed)
    cfg = BatcherConfig(
        max_batch_tokens=rng.choice((256, 1024, 4096)),
        max_batch_size=rng.choice((4, 16, 64)),
        max_wait_s=0.0,
        max_queued_tokens=10**9,
        cross_request=rng.random() < 0.7,
        min_padding_efficiency=rng.choice((0.0, 0.5, 0.9)),
        group_prompts=rng.random() < 0.7,
    )
    loop = asyncio.new_event_loop()
    try:
        batcher = Batcher(NeverCalled(), cfg, clock=lambda: 0.0)
        reference: list[_Pending] = []
        prompts = [[rng.randrange(3, 50) for _ in range(rng.randint(1, 40))] for _ in range(6)]
        request = 0
        for _step in range(60):
            if rng.random() < 0.6 or not reference:
                request += 1
                for _ in range(rng.randint(1, 12)):
                    prompt = rng.choice(prompts) if rng.random() < 0.5 else [rng.randrange(50)]
                    tokens = prompt + [rng.randrange(50) for _ in range(rng.randint(1, 60))]
                    item = _Pending(
                        Job(tokens, len(prompt)), loop.create_future(), 0.0, 1e9, request
                    )
                    batcher._queue.add(item)
                    reference.append(item)
            else:
                want = reference_take(reference, cfg, cfg.max_batch_tokens)
                got = batcher._take_batch()
                assert [id(p) for p in got] == [id(p) for p in want]
                taken = {id(p) for p in got}
                reference = [p for p in reference if id(p) not in taken]
                assert len(batcher._queue) == len(reference)
                assert batcher._queue.longest() == max((p.length for p in reference), default=0)
    finally:
        loop.close()


@pytest.mark.parametrize("seed", range(300))
def test_the_index_picks_the_batches_the_scan_picked(seed: int) -> None:
    _scenario(seed)


def test_expired_items_leave_the_queue_and_fail_without_a_scan() -> None:
    loop = asyncio.new_event_loop()
    try:
        now = [0.0]
        cfg = BatcherConfig(16384, 256, 0.0, 10**9)
        batcher = Batcher(NeverCalled(), cfg, clock=lambda: now[0])
        soon = _Pending(Job([1, 2, 3], 1), loop.create_future(), 0.0, 5.0, 1)
        late = _Pending(Job([4, 5, 6, 7], 1), loop.create_future(), 0.0, 50.0, 2)
        for item in (soon, late):
            batcher._queue.add(item)
        now[0] = 10.0
        assert batcher._take_batch() == [late]
        assert soon.future.done()
        assert "deadline" in str(soon.future.exception())
        assert len(batcher._queue) == 0
    finally:
        loop.close()


def test_taken_items_are_not_held_until_their_deadline() -> None:
    loop = asyncio.new_event_loop()
    try:
        batcher = Batcher(NeverCalled(), BatcherConfig(16384, 256, 0.0, 10**9), clock=lambda: 0.0)
        for number in range(5000):
            item = _Pending(Job([1, 2, 3], 1), loop.create_future(), 0.0, 1e9, number)
            batcher._queue.add(item)
            if number % 100 == 99:
                while batcher._take_batch():
                    pass
        assert len(batcher._queue) == 0
        assert len(batcher._queue._deadlines) <= 2 * 100 + 1024
    finally:
        loop.close()
