"""How long one batch decision of the scheduler takes with a deep queue.

    .venv/bin/python benchmarks/scheduler_decision.py [--items 20000] [--workload mixed]

The real :class:`~tokenreward_service.batching.Batcher` with the service's default settings
(but a queue bound that admits every item) in front of an engine that returns at once. The
first batch is held on the "device" until every request is queued (``--items`` items, in
requests of 8, shaped like the ``mixed`` or ``group`` workload); then the queue drains and every
decision (``Batcher._take_batch``: drop what expired, pick the next batch) is timed. It prints
the decision time with the queue still deep (the first 10 decisions) and over the whole drain,
and the total time spent deciding; draining costs O(decisions x queue) when each decision
scans the whole queue.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from tokenreward_service.app import batcher_config
from tokenreward_service.batching import Batcher, Job
from tokenreward_service.bench.workloads import make_workload
from tokenreward_service.config import Settings
from tokenreward_service.model import BatchScores


class HeldEngine:
    """Returns zeros at once, but holds its first batch until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.batches = 0

    def score_batch(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> Any:
        if self.batches == 0:
            self.release.wait()
        self.batches += 1
        return BatchScores(
            scores=[torch.zeros(len(s)) for s in sequences],
            computed_tokens=max(map(len, sequences)) * len(sequences),
            real_tokens=sum(map(len, sequences)),
            shared_items=0,
        )


async def measure(items: int, workload: str) -> dict[str, Any]:
    base = make_workload(workload, vocab_size=32000)
    shaped = make_workload(workload, vocab_size=32000, scale=items / len(base.items))
    defaults = Settings()
    engine = HeldEngine()
    config = dataclasses.replace(batcher_config(defaults), max_queued_tokens=shaped.tokens * 2)
    batcher = Batcher(engine, config)
    decisions: list[tuple[int, float]] = []
    take = batcher._take_batch

    def timed() -> Any:
        depth = batcher.queued_items
        started = time.perf_counter()
        batch = take()
        decisions.append((depth, time.perf_counter() - started))
        return batch

    batcher._take_batch = timed  # type: ignore[method-assign]
    await batcher.start()
    requests = [
        [Job(tokens=p + r, prompt_len=len(p)) for p, r in request] for request in shaped.requests
    ]
    tasks = [asyncio.create_task(batcher.submit(jobs, timeout_s=3600.0)) for jobs in requests]
    # Each submit queues its items before its first await: one pass of the loop queues them
    # all, while the first batch the scheduler took is held on the "device".
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    queued = batcher.queued_items
    engine.release.set()
    started = time.perf_counter()
    await asyncio.gather(*tasks)
    drained = time.perf_counter() - started
    await batcher.stop()
    deep = [seconds for depth, seconds in decisions[1:11]]
    return {
        "workload": workload,
        "items": len(shaped.items),
        "queued_when_released": queued,
        "decisions": len(decisions),
        "deep_queue_decision_ms": {
            "median": statistics.median(deep) * 1e3,
            "max": max(deep) * 1e3,
            "queue_items": decisions[1][0],
        },
        "all_decisions_ms": {
            "median": statistics.median(s for _, s in decisions) * 1e3,
            "max": max(s for _, s in decisions) * 1e3,
        },
        "deciding_s": sum(s for _, s in decisions),
        "drain_s": drained,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--workload", default="mixed", choices=("mixed", "group"))
    args = parser.parse_args(argv)
    report = asyncio.run(measure(args.items, args.workload))
    deep = report["deep_queue_decision_ms"]
    print(
        f"{report['workload']}: {report['items']} items; with {deep['queue_items']} queued a "
        f"decision took {deep['median']:.1f} ms (median of 10, max {deep['max']:.1f}); "
        f"{report['decisions']} decisions drained the queue, {report['deciding_s']:.1f} s of "
        f"them deciding, {report['drain_s']:.1f} s in all",
        file=sys.stderr,
    )
    import json

    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
