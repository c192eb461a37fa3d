"""The inference pipeline (tokenreward_service.inference): batches launched in order on one
thread, collected in order on another, with the next launched before the running one is back.

The engine here is a stand-in whose ``launch_batch`` returns a waiter that blocks until the
test lets that batch "finish on the device" (a threading.Event per batch), so the order of
launches, waits and deliveries can be checked one by one; the simulated device's stream is
checked on a fake clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pytest
import torch

from tokenreward_service.bench import simulated
from tokenreward_service.inference import Landed, Pipeline
from tokenreward_service.model import BatchScores


class DeviceLike:
    """``launch_batch`` records the launch and returns a waiter held until ``finish(n)``."""

    def __init__(self, fail_launch: int | None = None, fail_wait: int | None = None) -> None:
        self.events: list[str] = []
        self.lock = threading.Lock()
        self.done: dict[int, threading.Event] = {}
        self.launched = threading.Semaphore(0)
        self.fail_launch = fail_launch
        self.fail_wait = fail_wait

    def log(self, event: str) -> None:
        with self.lock:
            self.events.append(event)

    def finish(self, number: int) -> None:
        self.done.setdefault(number, threading.Event()).set()

    def score_batch(self, sequences: Sequence[Sequence[int]], _: Sequence[int]) -> BatchScores:
        raise AssertionError("an engine with launch_batch is launched, not scored")

    def launch_batch(
        self, sequences: Sequence[Sequence[int]], _: Sequence[int]
    ) -> Callable[[], BatchScores]:
        number = sequences[0][0]
        self.log(f"launch {number}")
        self.launched.release()
        if number == self.fail_launch:
            raise RuntimeError(f"launch {number} failed")
        gate = self.done.setdefault(number, threading.Event())

        def wait() -> BatchScores:
            assert gate.wait(timeout=30)
            self.log(f"back {number}")
            if number == self.fail_wait:
                raise RuntimeError(f"batch {number} failed on the device")
            rows = [torch.tensor([float(t) for t in seq]) for seq in sequences]
            return BatchScores(scores=rows, computed_tokens=0, real_tokens=0, shared_items=0)

        return wait


def pipeline(
    engine: object, ahead: int = 2
) -> tuple[Pipeline[int], list[Landed[int]], threading.Semaphore]:
    landed: list[Landed[int]] = []
    delivered = threading.Semaphore(0)

    def deliver(item: Landed[int]) -> None:
        landed.append(item)
        delivered.release()

    clock = iter(range(10**6))
    runner: Pipeline[int] = Pipeline(
        engine,
        on_start=lambda _: None,
        deliver=deliver,
        clock=lambda: float(next(clock)),
        ahead=ahead,
    )
    runner.start()
    return runner, landed, delivered


def test_the_next_batch_is_launched_before_the_running_one_is_back() -> None:
    engine = DeviceLike()
    runner, landed, delivered = pipeline(engine)
    for number in (1, 2):
        runner.put(number, [[number, 9]], [1])
    for _ in range(2):
        assert engine.launched.acquire(timeout=30)  # both launched, neither back
    assert engine.events == ["launch 1", "launch 2"]
    engine.finish(1)
    assert delivered.acquire(timeout=30)
    engine.finish(2)
    assert delivered.acquire(timeout=30)
    runner.stop()
    assert engine.events == ["launch 1", "launch 2", "back 1", "back 2"]
    assert [item.batch for item in landed] == [1, 2]
    assert [item.scores.scores[0].tolist() for item in landed if item.scores] == [
        [1.0, 9.0],
        [2.0, 9.0],
    ]


def test_no_more_than_ahead_batches_are_launched_and_not_collected() -> None:
    engine = DeviceLike()
    runner, _, delivered = pipeline(engine, ahead=2)
    for number in (1, 2, 3):
        runner.put(number, [[number]], [1])
    for _ in range(2):
        assert engine.launched.acquire(timeout=30)
    assert not engine.launched.acquire(timeout=0.2)  # the third waits for a free slot
    assert engine.events == ["launch 1", "launch 2"]
    engine.finish(1)
    assert engine.launched.acquire(timeout=30)  # 1 is back: 3 goes onto the device
    for number in (2, 3):
        engine.finish(number)
    for _ in range(3):
        assert delivered.acquire(timeout=30)
    runner.stop()
    assert engine.events.index("launch 3") > engine.events.index("back 1")


@pytest.mark.parametrize("where", ["launch", "wait"])
def test_a_failing_batch_fails_alone_and_in_its_place(where: str) -> None:
    engine = DeviceLike(**{f"fail_{where}": 2})
    runner, landed, delivered = pipeline(engine)
    for number in (1, 2, 3):
        engine.finish(number)
        runner.put(number, [[number]], [1])
    for _ in range(3):
        assert delivered.acquire(timeout=30)
    runner.stop()
    assert [item.batch for item in landed] == [1, 2, 3]
    assert [item.error is None for item in landed] == [True, False, True]
    assert "2" in str(landed[1].error)
    assert landed[1].scores is None


def test_the_device_time_of_a_batch_starts_when_the_one_before_is_back() -> None:
    """Launched early, a batch's device time is counted from the end of the one before: the
    scheduler's rate estimate is the device's, not the wait in the queue."""
    engine = DeviceLike()
    runner, landed, delivered = pipeline(engine)
    for number in (1, 2):
        runner.put(number, [[number]], [1])
    for _ in range(2):
        assert engine.launched.acquire(timeout=30)
    for number in (1, 2):
        engine.finish(number)
        assert delivered.acquire(timeout=30)
    runner.stop()
    first, second = landed
    assert second.started == first.started + first.elapsed  # its start: the first one's end
    assert second.elapsed > 0


def test_the_simulated_device_runs_batches_one_after_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    slept: list[float] = []
    monkeypatch.setattr(simulated.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(simulated.time, "sleep", slept.append)
    device = simulated.SimulatedDevice(1000.0)
    first = device.launch_batch([[5, 6, 7, 8]], [1])  # 4 ms of device time
    second = device.launch_batch([[5, 6]], [1])  # 2 ms, after the first
    now[0] = 100.001  # 1 ms later
    first()
    second()
    assert slept == pytest.approx([0.003, 0.005])  # the first ends at +4 ms, the second at +6
    now[0] = 200.0  # long idle: the next starts when it is launched
    third = device.launch_batch([[1, 2, 3]], [1])
    third()
    assert slept[-1] == pytest.approx(0.003)
