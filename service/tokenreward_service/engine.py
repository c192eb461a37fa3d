"""The batcher and the model in a process of their own, fed by the server's process.

One Python process holds one GIL. In front of a fast device the server's event loop (HTTP,
JSON, validation, preparation, redistribution, encoding) keeps it busy most of the time, and
the inference thread waits for it between batches and after each forward pass: on the
simulated 1M tokens/s device the thread spent 0.35 s in 6.4 s waiting to get the GIL back
after a batch's wait, and another 0.35 s between batches, with the server process at 0.97 of
a core. With ``engine_process`` on, the server's process keeps the HTTP edge and everything
per request, and a child process (spawned, never forked, so that CUDA and the OpenMP pools
start clean) runs the one :class:`~tokenreward_service.batching.Batcher` and the model: its GIL
is shared only with its own scheduler, so the device goes from batch to batch without waiting
for HTTP work.

The two talk over a Unix socket in frames (a 4-byte length, then a pickle):

- server to engine: ``submit`` (a request's token IDs as one int32 array, with each item's
  length and prompt length, and its deadline), ``cancel`` (its caller went away: its queued
  items are dropped), ``stop`` (finish what is queued, then exit);
- engine to server: ``ready`` (the model's spec and tokenizer) or ``load_failed``, ``done``
  (a request's per-position scores as one array) or ``error`` (a domain error, re-raised as
  the same class in the server), ``queue`` (its queue changed: items were queued, taken into
  a batch or dropped), ``batch`` (a forward pass's statistics for the metrics),
  ``failed`` (the scheduler died: liveness fails) and ``stopped``.

Every message from the engine carries its queue as it stood after the last submit it queued,
so that the server refuses a request that cannot fit (429, 413) at once, without a round trip,
as the in-process batcher does; the engine checks again and its answer is the one that counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import pickle
import shutil
import struct
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch

from tokenreward_service.batching import (
    Batcher,
    BatcherConfig,
    BatchStats,
    Job,
    admit,
    retry_after_s,
)
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
from tokenreward_service.metrics import GpuMemory, cuda_memory
from tokenreward_service.model import ModelSpec, RewardModel, host_threads

__all__ = ["EngineModel", "EngineProcess"]

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<I")
_ERRORS: dict[str, type[ServiceError]] = {
    cls.__name__: cls
    for cls in (DeadlineExceeded, InternalError, InvalidRequest, NotReady, TooLarge, ServiceError)
}


@dataclass(frozen=True)
class EngineModel:
    """What the server's process knows of the model the engine loaded: enough to prepare
    items (the spec's vocabulary and suffix, the tokenizer) and to describe it."""

    spec: ModelSpec
    tokenizer: Any | None


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(size))


def _write_frame(writer: asyncio.StreamWriter, message: tuple[Any, ...]) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.writelines((_LENGTH.pack(len(data)), data))


class EngineProcess:
    """The :class:`~tokenreward_service.batching.Batcher`'s interface, served by a child
    process that loads the model with ``factory`` (a picklable callable, run there) and runs
    the batcher around it. ``on_batch`` and ``on_queue`` are called in this process."""

    def __init__(
        self,
        factory: Callable[[], RewardModel],
        config: BatcherConfig,
        *,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_queue: Callable[[int, int], None] | None = None,
    ) -> None:
        self._factory = factory
        self._config = config
        self._on_batch = on_batch
        self._on_queue = on_queue
        self._process: multiprocessing.process.BaseProcess | None = None
        self._folder: str | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[list[torch.Tensor]]] = {}
        self._requests = 0
        self._unread: deque[tuple[int, int, int]] = deque()
        """(request number, items, tokens) sent but not yet read by the engine."""
        self._engine_items = 0
        self._engine_tokens = 0
        self._tokens_per_s = 0.0
        self._budget = config.max_batch_tokens
        self._gpu_memory: GpuMemory = (0.0, 0.0, 0.0)
        self._closing = False
        self._failed: str | None = None
        self._stopped = False

    @property
    def alive(self) -> bool:
        return (
            self._reader_task is not None
            and not self._reader_task.done()
            and not self._closing
            and self._failed is None
        )

    @property
    def failed(self) -> bool:
        """The engine died or its scheduler failed: the server must be restarted."""
        return self._failed is not None

    @property
    def queued_items(self) -> int:
        return self._engine_items + sum(items for _, items, _ in self._unread)

    @property
    def queued_tokens(self) -> int:
        return self._engine_tokens + sum(tokens for _, _, tokens in self._unread)

    @property
    def free_tokens(self) -> int:
        return max(0, self._config.max_queued_tokens - self.queued_tokens)

    @property
    def batch_token_budget(self) -> int:
        return self._budget

    @property
    def gpu_memory(self) -> GpuMemory:
        """The engine's CUDA memory as of its last batch (zeros on other devices)."""
        return self._gpu_memory

    def retry_after(self, tokens: int) -> int:
        excess = self.queued_tokens + tokens - self._config.max_queued_tokens
        return retry_after_s(excess, self._tokens_per_s)

    async def start(self) -> EngineModel:
        """Spawn the engine and wait until its model is loaded (as long as that takes; a
        failure to load is raised as :class:`ModelLoadError`)."""
        self._folder = tempfile.mkdtemp(prefix="tokenreward-engine-")
        path = os.path.join(self._folder, "engine.sock")
        connected: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if connected.done():
                writer.close()  # one engine, one connection
            else:
                connected.set_result((reader, writer))

        listener = await asyncio.start_unix_server(accept, path)
        context = multiprocessing.get_context("spawn")
        self._process = context.Process(
            target=_engine_main,
            args=(self._factory, self._config, path),
            name="tokenreward-engine",
            daemon=True,
        )
        self._process.start()
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await self._until_exit(connected)
            message = await self._until_exit(asyncio.ensure_future(_read_frame(reader)))
            if message[0] == "load_failed":
                await asyncio.to_thread(self._process.join, 30)
                raise ModelLoadError(message[1])
        except BaseException:
            if writer is not None:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            raise
        finally:
            listener.close()
        _, spec, tokenizer = message
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read(reader), name="tokenreward-engine-io")
        return EngineModel(spec, tokenizer)

    async def _until_exit(self, awaitable: asyncio.Future[Any]) -> Any:
        """``awaitable``'s result, unless the engine process exits first."""
        process = self._process
        assert process is not None
        while True:
            done, _ = await asyncio.wait({awaitable}, timeout=0.2)
            if done and not isinstance(
                awaitable.exception(), (asyncio.IncompleteReadError, ConnectionError)
            ):
                return awaitable.result()
            if done or not process.is_alive():  # gone, or going: its connection closed
                awaitable.cancel()
                await asyncio.to_thread(process.join, 30)
                raise ModelLoadError(
                    f"the engine process exited with code {process.exitcode} before its "
                    "model was loaded (its log says why)"
                )

    async def submit(self, jobs: Sequence[Job], *, timeout_s: float) -> list[torch.Tensor]:
        """As :meth:`Batcher.submit`: each job's per-position scores, in order."""
        if not self.alive or self._writer is None:
            raise NotReady("the engine is not running")
        tokens = sum(len(job.tokens) for job in jobs)
        admit(tokens, self.queued_tokens, self._config.max_queued_tokens, self.retry_after)
        self._requests += 1
        number = self._requests
        ids = np.fromiter(chain.from_iterable(job.tokens for job in jobs), np.int32, tokens)
        future: asyncio.Future[list[torch.Tensor]] = asyncio.get_running_loop().create_future()
        self._pending[number] = future
        self._unread.append((number, len(jobs), tokens))
        _write_frame(
            self._writer,
            (
                "submit",
                number,
                timeout_s,
                ids.tobytes(),
                [len(job.tokens) for job in jobs],
                [job.prompt_len for job in jobs],
            ),
        )
        self._report_queue()
        try:
            await self._writer.drain()
            return await future
        except asyncio.CancelledError:
            if self._pending.pop(number, None) is not None and not self._writer.is_closing():
                _write_frame(self._writer, ("cancel", number))
            raise
        finally:
            self._pending.pop(number, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Answers from the engine, until it stops or dies; a death fails every waiting
        caller with :class:`NotReady` (503, which clients retry) and liveness."""
        reason = "the engine process closed its connection"
        try:
            while True:
                message = await _read_frame(reader)
                kind = message[0]
                if kind == "done":
                    _, number, state, dtype, data, lengths = message
                    self._engine_state(state)
                    flat = torch.frombuffer(data, dtype=getattr(torch, dtype))
                    self._resolve(number, list(torch.split(flat, lengths)))
                elif kind == "error":
                    _, number, state, error = message
                    self._engine_state(state)
                    self._resolve(number, _error_from(error))
                elif kind == "queue":
                    self._engine_state(message[1])
                elif kind == "batch":
                    _, state, stats, budget, tokens_per_s, gpu_memory = message
                    self._engine_state(state)
                    self._budget, self._tokens_per_s = budget, tokens_per_s
                    self._gpu_memory = gpu_memory
                    if self._on_batch is not None:
                        try:
                            self._on_batch(stats)
                        except Exception:
                            log.exception("the batch observer failed; the results were delivered")
                elif kind == "failed":
                    self._failed = message[1]
                    log.error("the engine's scheduler failed: %s", message[1])
                elif kind == "stopped":
                    self._stopped = True
                    return
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            reason = f"the engine process went away ({type(exc).__name__})"
        except Exception as exc:
            reason = f"the engine connection failed: {exc!r}"
            log.exception("reading the engine's answers failed")
        finally:
            if not self._stopped:
                code = None if self._process is None else self._process.exitcode
                self._failed = self._failed or f"{reason} (exit code {code})"
                log.error("%s; failing %d waiting requests", self._failed, len(self._pending))
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(
                        NotReady(f"{self._failed or 'the engine stopped'}; retry elsewhere")
                    )
            self._pending.clear()
            self._unread.clear()
            self._engine_items = self._engine_tokens = 0
            self._report_queue()

    def _engine_state(self, state: tuple[int, int, int]) -> None:
        seen, self._engine_items, self._engine_tokens = state
        while self._unread and self._unread[0][0] <= seen:
            self._unread.popleft()
        self._report_queue()

    def _resolve(self, number: int, outcome: list[torch.Tensor] | ServiceError) -> None:
        future = self._pending.pop(number, None)
        if future is None or future.done():
            return  # its caller went away meanwhile
        if isinstance(outcome, ServiceError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def _report_queue(self) -> None:
        if self._on_queue is not None:
            try:
                self._on_queue(self.queued_items, self.queued_tokens)
            except Exception:
                log.exception("the queue observer failed")

    async def stop(self) -> None:
        """Let the engine finish what is queued, then end it."""
        self._closing = True
        if self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(ConnectionError):
                _write_frame(self._writer, ("stop",))
                await self._writer.drain()
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        if self._process is not None and self._process.pid is not None:  # it was started
            await asyncio.to_thread(self._process.join, 30)
            if self._process.is_alive():
                log.error("the engine process did not stop within 30 s: killing it")
                self._process.kill()
                await asyncio.to_thread(self._process.join, 5)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def _error_fields(error: ServiceError) -> tuple[str, str, int | None, int]:
    """A domain error as it crosses to the server (exceptions with keyword-only fields do
    not survive a pickle round trip)."""
    retry_after = error.retry_after if isinstance(error, Overloaded) else 0
    return type(error).__name__, error.message, error.item, retry_after


def _error_from(fields: tuple[str, str, int | None, int]) -> ServiceError:
    """The same class and fields again, in the server (an unknown class is internal)."""
    name, message, item, retry_after = fields
    if name == Overloaded.__name__:
        return Overloaded(message, retry_after=retry_after)
    return _ERRORS.get(name, InternalError)(message, item=item)


def _engine_main(factory: Callable[[], RewardModel], config: BatcherConfig, path: str) -> None:
    """The engine process: load the model, then serve the server's process until it says
    stop or goes away."""
    sys.setswitchinterval(0.001)  # as `tokenreward serve` runs
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s engine: %(message)s")
    asyncio.run(_engine(factory, config, path))


async def _engine(factory: Callable[[], RewardModel], config: BatcherConfig, path: str) -> None:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        model = factory()
        tokenizer = getattr(model, "tokenizer", None)
        ready = pickle.dumps(("ready", model.spec, tokenizer), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        _write_frame(writer, ("load_failed", f"{type(exc).__name__}: {exc}"))
        await writer.drain()
        writer.close()
        return
    host_threads(model.spec)
    cuda = torch.device(model.spec.device) if model.spec.device.startswith("cuda") else None
    writer.writelines((_LENGTH.pack(len(ready)), ready))
    seen = 0
    batcher: Batcher

    def state() -> tuple[int, int, int]:
        return seen, batcher.queued_items, batcher.queued_tokens

    def on_batch(stats: BatchStats) -> None:
        memory = (0.0, 0.0, 0.0) if cuda is None else cuda_memory(cuda)
        message = ("batch", state(), stats, batcher.batch_token_budget, batcher.tokens_per_s)
        _write_frame(writer, (*message, memory))

    def on_queue(_: int, __: int) -> None:
        _write_frame(writer, ("queue", state()))

    batcher = Batcher(model, config, on_batch=on_batch, on_queue=on_queue)
    await batcher.start()
    gc.collect()
    gc.freeze()  # the model's objects, out of the collector's full passes (as in the app)
    tasks: dict[int, asyncio.Task[None]] = {}

    async def serve(number: int, jobs: list[Job], timeout_s: float) -> None:
        nonlocal seen
        try:
            seen = number  # submit queues the items before it first waits
            scores = await batcher.submit(jobs, timeout_s=timeout_s)
        except ServiceError as exc:
            _write_frame(writer, ("error", number, state(), _error_fields(exc)))
        except asyncio.CancelledError:
            return  # the caller went away: nobody to answer
        except Exception as exc:
            log.exception("scoring a request failed")
            error = InternalError(f"unexpected error: {type(exc).__name__}")
            _write_frame(writer, ("error", number, state(), _error_fields(error)))
        else:
            flat = torch.cat([score.reshape(-1) for score in scores])
            data = bytearray(flat.numpy().tobytes())
            dtype = str(flat.dtype).removeprefix("torch.")
            lengths = [score.shape[0] for score in scores]
            _write_frame(writer, ("done", number, state(), dtype, data, lengths))
        finally:
            tasks.pop(number, None)

    async def watch() -> None:
        await batcher.finished()
        if batcher.failed:
            _write_frame(writer, ("failed", "the engine's batch scheduler failed"))

    watcher = asyncio.create_task(watch())
    try:
        while True:
            try:
                message = await _read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                # Nobody is left to answer: end now, so that the device's memory is free for
                # the server that replaces this one, instead of draining the queue first.
                log.warning("the server's process went away: the engine exits")
                os._exit(1)
            if message[0] == "submit":
                _, number, timeout_s, data, lengths, prompt_lens = message
                ids = np.frombuffer(data, dtype=np.int32).tolist()
                jobs, start = [], 0
                for length, prompt_len in zip(lengths, prompt_lens, strict=True):
                    jobs.append(Job(ids[start : start + length], prompt_len))
                    start += length
                task = asyncio.create_task(serve(number, jobs, timeout_s))
                tasks[number] = task
                await asyncio.sleep(0)  # let it queue its items before the next is read
            elif message[0] == "cancel":
                cancelled = tasks.get(message[1])
                if cancelled is not None:
                    cancelled.cancel()
            elif message[0] == "stop":
                break
        await batcher.stop()  # finishes what is queued: every waiting request is answered
        if tasks:
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        watcher.cancel()
        _write_frame(writer, ("stopped",))
        await writer.drain()
    finally:
        writer.close()
