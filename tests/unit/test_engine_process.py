"""The engine process (tokenreward_service.engine): the batcher and the engine in a spawned
child, driven from this process through :class:`EngineProcess`, as the app drives it.

The engine is :class:`tests.engines.ScriptedEngine`, a stand-in for a model whose scores are
the running sums of the token IDs and whose forward pass can be held from here (a file it polls
for); the real model through an engine process is in tests/api/test_engine_process_api.py.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engines import HOLD, scripted
from tokenreward_service.batching import BatcherConfig, BatchStats, Job
from tokenreward_service.engine import EngineProcess, _error_fields, _error_from
from tokenreward_service.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    ModelLoadError,
    NotReady,
    Overloaded,
    ServiceError,
    TooLarge,
)

CONFIG = BatcherConfig(max_batch_tokens=4096, max_wait_s=0.001, max_queued_tokens=1000)


def run_with_engine(
    folder: Path,
    body: Callable[[EngineProcess, list[BatchStats]], Awaitable[Any]],
    *,
    config: BatcherConfig = CONFIG,
) -> Any:
    """Start an engine process on ``folder``, run ``body``, then stop it."""
    batches: list[BatchStats] = []

    async def main() -> Any:
        engine = EngineProcess(
            functools.partial(scripted, str(folder)), config, on_batch=batches.append
        )
        model = await engine.start()
        assert model.spec.architecture == "ScriptedEngine"
        try:
            return await body(engine, batches)
        finally:
            (folder / "release").touch()  # a failed test must not leave a batch held
            await engine.stop()

    return asyncio.run(main())


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def logged_batches(folder: Path) -> list[list[int]]:
    log = folder / "batches.log"
    if not log.exists():
        return []
    return [[int(t) for t in line.split()] for line in log.read_text().splitlines()]


def test_scores_come_back_for_each_job_in_order(tmp_path: Path) -> None:
    jobs = [Job([3, 1, 4, 1, 5], 2), Job([9, 2, 6], 1), Job([5, 3, 5, 8, 9, 7, 9], 3)]

    async def body(engine: EngineProcess, batches: list[BatchStats]) -> None:
        first, second = await asyncio.gather(
            engine.submit(jobs, timeout_s=30), engine.submit(jobs[::-1], timeout_s=30)
        )
        for got, job in zip([*first, *second], [*jobs, *jobs[::-1]], strict=True):
            expected = torch.cumsum(torch.tensor(job.tokens, dtype=torch.float32), 0)
            assert torch.equal(got, expected)
        await until(lambda: sum(b.size for b in batches) == 6)  # the metrics' view, here
        assert engine.queued_tokens == 0
        assert engine.queued_items == 0
        assert engine.alive
        assert not engine.failed

    run_with_engine(tmp_path, body)


def test_a_full_queue_is_refused_here_at_once_and_a_request_that_never_fits_is_413(
    tmp_path: Path,
) -> None:
    """The queue as the engine last reported it plus what was sent since: no round trip."""

    async def body(engine: EngineProcess, _: list[BatchStats]) -> None:
        held = asyncio.ensure_future(engine.submit([Job([HOLD] * 100, 1)], timeout_s=30))
        await until(lambda: logged_batches(tmp_path) == [[HOLD]])  # in the forward pass
        queued = asyncio.ensure_future(engine.submit([Job([1] * 900, 1)], timeout_s=30))
        await asyncio.sleep(0)
        assert engine.queued_tokens == 900
        with pytest.raises(Overloaded) as refused:
            await engine.submit([Job([2] * 200, 1)], timeout_s=30)
        assert refused.value.retry_after >= 1
        with pytest.raises(TooLarge):
            await engine.submit([Job([2] * 1001, 1)], timeout_s=30)
        (tmp_path / "release").touch()
        assert len((await held)[0]) == 100
        assert len((await queued)[0]) == 900
        assert logged_batches(tmp_path) == [[HOLD], [1]]  # the refused ones never ran

    run_with_engine(tmp_path, body)


def test_a_cancelled_caller_has_its_queued_items_dropped_in_the_engine(tmp_path: Path) -> None:
    async def body(engine: EngineProcess, batches: list[BatchStats]) -> None:
        held = asyncio.ensure_future(engine.submit([Job([HOLD, 1], 1)], timeout_s=30))
        await until(lambda: logged_batches(tmp_path) == [[HOLD]])
        gone = asyncio.ensure_future(engine.submit([Job([5] * 50, 1)], timeout_s=30))
        await until(lambda: engine.queued_tokens == 50)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        after = asyncio.ensure_future(engine.submit([Job([6, 6], 1)], timeout_s=30))
        (tmp_path / "release").touch()
        await held
        await after
        assert logged_batches(tmp_path) == [[HOLD], [6]]  # 5 was dropped before its batch
        await until(lambda: engine.queued_tokens == 0)

    run_with_engine(tmp_path, body)


def test_an_engine_that_dies_fails_its_callers_with_503_and_liveness(tmp_path: Path) -> None:
    async def body(engine: EngineProcess, _: list[BatchStats]) -> None:
        held = asyncio.ensure_future(engine.submit([Job([HOLD, 1], 1)], timeout_s=30))
        await until(lambda: logged_batches(tmp_path) == [[HOLD]])
        queued = asyncio.ensure_future(engine.submit([Job([3, 3], 1)], timeout_s=30))
        process = engine._process
        assert process is not None
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        for waiting in (held, queued):
            with pytest.raises(NotReady, match="engine"):
                await waiting
        assert engine.failed
        assert not engine.alive
        assert engine.queued_tokens == 0
        with pytest.raises(NotReady):
            await engine.submit([Job([1, 2], 1)], timeout_s=30)

    run_with_engine(tmp_path, body)


def test_stop_finishes_what_is_queued(tmp_path: Path) -> None:
    async def main() -> None:
        engine = EngineProcess(functools.partial(scripted, str(tmp_path)), CONFIG)
        await engine.start()
        held = asyncio.ensure_future(engine.submit([Job([HOLD, 1], 1)], timeout_s=30))
        await until(lambda: logged_batches(tmp_path) == [[HOLD]])
        queued = asyncio.ensure_future(engine.submit([Job([4, 4, 4], 1)], timeout_s=30))
        await until(lambda: engine.queued_tokens == 3)
        stopping = asyncio.ensure_future(engine.stop())
        (tmp_path / "release").touch()
        await stopping
        assert [len(s) for s in await held] == [2]
        assert [len(s) for s in await queued] == [3]
        assert engine._process is not None
        assert engine._process.exitcode == 0

    asyncio.run(main())


def test_a_model_that_cannot_load_is_a_load_error_with_its_reason(tmp_path: Path) -> None:
    async def main() -> None:
        factory = functools.partial(scripted, str(tmp_path), fail_load=True)
        engine = EngineProcess(factory, CONFIG)
        with pytest.raises(ModelLoadError, match="no weights in this folder"):
            await engine.start()
        await engine.stop()

    asyncio.run(main())


@pytest.mark.parametrize(
    "error",
    [
        TooLarge("too many", item=None),
        InvalidRequest("bad", item=3),
        DeadlineExceeded("late"),
        NotReady("down"),
        InternalError("boom", item=1),
        Overloaded("full", retry_after=7),
        ServiceError("other"),
    ],
)
def test_domain_errors_cross_with_their_class_and_fields(error: ServiceError) -> None:
    again = _error_from(_error_fields(error))
    assert type(again) is type(error)
    assert (again.message, again.item, again.type) == (error.message, error.item, error.type)
    if isinstance(error, Overloaded):
        assert isinstance(again, Overloaded)
        assert again.retry_after == 7


def test_an_engine_process_that_dies_while_loading_is_a_load_error(tmp_path: Path) -> None:
    async def main() -> None:
        engine = EngineProcess(functools.partial(os._exit, 3), CONFIG)  # type: ignore[arg-type]
        with pytest.raises(ModelLoadError, match="exited with code 3"):
            await engine.start()
        await engine.stop()

    asyncio.run(main())


def test_an_engine_whose_server_went_away_exits_at_once(tmp_path: Path) -> None:
    """Orphaned (its server killed), the engine does not drain a queue nobody waits for: it
    exits with its batch still held, freeing the device for the server that replaces it."""

    async def body(engine: EngineProcess, _: list[BatchStats]) -> None:
        held = asyncio.ensure_future(engine.submit([Job([HOLD, 1], 1)], timeout_s=30))
        await until(lambda: logged_batches(tmp_path) == [[HOLD]])
        process = engine._process
        assert process is not None
        assert engine._writer is not None
        engine._writer.transport.abort()  # as a killed server's socket closes
        await until(lambda: not process.is_alive())
        assert process.exitcode == 1
        assert not (tmp_path / "release").exists()  # it never finished the held batch
        with pytest.raises(NotReady):
            await held

    run_with_engine(tmp_path, body)


def test_auto_runs_an_engine_process_for_an_accelerator_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The README's default: ``auto`` is on for a model on an accelerator, off on the CPU."""
    from tokenreward_service.app import engine_process
    from tokenreward_service.config import Settings

    assert Settings().engine_process == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not engine_process(Settings())  # auto device: the CPU here
    assert not engine_process(Settings(device="cpu"))
    assert not engine_process(Settings(device="cuda"))  # unusable: the load says why
    assert engine_process(Settings(device="cpu", engine_process="on"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_process(Settings())
    assert engine_process(Settings(device="cuda:1"))
    assert not engine_process(Settings(device="cpu"))
    assert not engine_process(Settings(engine_process="off"))
