"""``RewardClient`` and ``AsyncRewardClient``: the I/O twins over :class:`BaseRewardClient`.

They mirror each other method for method (``close``/``aclose``, context managers). Each holds
only the sending, the concurrency and the sleeping; what to send, where, and whether to retry
is decided by the shared base.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from types import TracebackType
from typing import Any

import httpx

from tokenreward._base import (
    BaseRewardClient,
    CallCancelled,
    CallState,
    Chunk,
    ItemLike,
    Outcome,
    Send,
)
from tokenreward.protocol import Baseline, ModelInfo, RewardResult

__all__ = ["AsyncRewardClient", "RewardClient"]


class RewardClient(BaseRewardClient):
    """Blocking client. Chunks of a big call are sent from a small thread pool.

    ``RewardClient("http://rm:8000")`` or ``RewardClient(["http://rm-0:8000", "http://rm-1:8000"])``;
    ``transport=`` replaces httpx's transport (tests, custom pools); ``sleep=`` replaces the
    wait between attempts (tests; by default a wait that ends early when the call is given up).
    """

    def __init__(
        self,
        base_urls: str | Sequence[str],
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(base_urls, **options)
        limits = httpx.Limits(
            max_connections=self.max_concurrency * 2,
            max_keepalive_connections=self.max_concurrency * 2,
        )
        self._http = httpx.Client(transport=transport, limits=limits, timeout=self.request_timeout)
        self._sleep = sleep
        self._executor: ThreadPoolExecutor | None = None

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._http.close()

    def rewards(
        self,
        items: Sequence[ItemLike],
        *,
        beta_c: float = 1.0,
        baseline: Baseline = "prompt",
        return_prefix_scores: bool = False,
        policy_tokenizer: str | None = None,
        step_separator: str | None = None,
        timeout: float | None = None,
    ) -> list[RewardResult]:
        """Per-token rewards of every item, in order, or a typed error: never a partial list.

        ``policy_tokenizer`` names a tokenizer the server loaded (``--policy-tokenizer``): the
        items' token IDs are the policy's, and each result has one reward per policy response
        token. ``step_separator`` adds ``step_rewards``/``step_ends`` to each result.
        """
        chunks = self.plan(
            items,
            beta_c=beta_c,
            baseline=baseline,
            return_prefix_scores=return_prefix_scores,
            policy_tokenizer=policy_tokenizer,
            step_separator=step_separator,
        )
        state = self.new_call(len(items), timeout)
        if len(chunks) == 1:
            self._send(chunks[0], state)
        elif chunks:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self.max_concurrency, thread_name_prefix="tokenreward-client"
                )
            futures = [self._executor.submit(self._send, chunk, state) for chunk in chunks]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f in done and f.exception() is not None]
            if failed:
                # As the async twin does: give up the siblings now. Queued ones never start;
                # running ones stop at their next step (a wait ends early), and an attempt
                # still on the wire is left to finish on its own, its answer dropped.
                state.cancelled.set()
                for future in pending:
                    future.cancel()
                first = failed[0].exception()
                assert first is not None
                raise first
        return self.finish(state)

    def _send(self, chunk: Chunk, state: CallState) -> None:
        self.accept(state, chunk, self._call("POST", "/v1/rewards", chunk, state))

    def _call(self, method: str, path: str, chunk: Chunk, state: CallState) -> Outcome:
        """Drive the shared attempt machine: send, or wait, as it says."""
        machine = self.attempts(chunk, state)
        step = next(machine)
        while True:
            outcome: Outcome | None = None
            try:
                if isinstance(step, Send):
                    outcome = self._attempt(method, path, chunk, step)
                elif self._sleep is not None:
                    self._sleep(step.seconds)
                elif state.cancelled.wait(step.seconds):
                    raise CallCancelled("a sibling chunk of this call failed")
            except BaseException as exc:
                machine.throw(exc)  # the machine releases what it holds and re-raises
                raise
            try:
                step = machine.send(outcome)
            except StopIteration as finished:
                return finished.value  # type: ignore[no-any-return]

    def _attempt(self, method: str, path: str, chunk: Chunk, step: Send) -> Outcome:
        """One HTTP exchange that ends within ``step.timeout`` even if the body trickles in
        (httpx's own timeouts are per read, so a replica sending a byte a second evades them)."""
        url = step.endpoint.url
        deadline = time.monotonic() + step.timeout
        try:
            with self._http.stream(
                method,
                url + path,
                content=chunk.body or None,
                headers=self.headers(chunk.request_id, chunk.content_type),
                timeout=step.timeout,
            ) as response:
                parts = []
                for part in response.iter_bytes():
                    parts.append(part)
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout(
                            "the answer did not arrive within the attempt's time"
                        )
        except httpx.TransportError as exc:
            return self.transport_outcome(exc, chunk, url)
        return self.outcome(
            method, response.status_code, b"".join(parts), response.headers, chunk, url
        )

    def model_info(self) -> ModelInfo:
        return ModelInfo.model_validate_json(self._get("/v1/model"))

    def healthy(self) -> bool:
        """True when some endpoint's process answers ``/healthz``."""
        return self._any_ok("/healthz")

    def ready(self) -> bool:
        """True when some endpoint has its model loaded and is accepting work (``/readyz``)."""
        return self._any_ok("/readyz")

    def _any_ok(self, path: str) -> bool:
        for endpoint in self.pool.endpoints:
            try:
                if (
                    self._http.get(
                        endpoint.url + path, headers=self.headers(uuid.uuid4().hex), timeout=5.0
                    ).status_code
                    == 200
                ):
                    return True
            except httpx.TransportError:
                continue
        return False

    def _get(self, path: str) -> bytes:
        chunk = Chunk(items=range(0), body=b"", request_id=uuid.uuid4().hex, ids=())
        outcome = self._call("GET", path, chunk, self.new_call(0, None))
        assert outcome.content is not None
        return outcome.content


class AsyncRewardClient(BaseRewardClient):
    """The asyncio twin of :class:`RewardClient`: the same methods, awaited."""

    def __init__(
        self,
        base_urls: str | Sequence[str],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        **options: Any,
    ) -> None:
        super().__init__(base_urls, **options)
        limits = httpx.Limits(
            max_connections=self.max_concurrency * 2,
            max_keepalive_connections=self.max_concurrency * 2,
        )
        self._http = httpx.AsyncClient(
            transport=transport, limits=limits, timeout=self.request_timeout
        )
        self._sleep = sleep

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def rewards(
        self,
        items: Sequence[ItemLike],
        *,
        beta_c: float = 1.0,
        baseline: Baseline = "prompt",
        return_prefix_scores: bool = False,
        policy_tokenizer: str | None = None,
        step_separator: str | None = None,
        timeout: float | None = None,
    ) -> list[RewardResult]:
        """Per-token rewards of every item, in order, or a typed error: never a partial list.

        ``policy_tokenizer`` names a tokenizer the server loaded (``--policy-tokenizer``): the
        items' token IDs are the policy's, and each result has one reward per policy response
        token. ``step_separator`` adds ``step_rewards``/``step_ends`` to each result.
        """
        chunks = self.plan(
            items,
            beta_c=beta_c,
            baseline=baseline,
            return_prefix_scores=return_prefix_scores,
            policy_tokenizer=policy_tokenizer,
            step_separator=step_separator,
        )
        state = self.new_call(len(items), timeout)
        limit = asyncio.Semaphore(self.max_concurrency)

        async def bounded(chunk: Chunk) -> None:
            async with limit:
                await self._send(chunk, state)

        tasks = [asyncio.ensure_future(bounded(chunk)) for chunk in chunks]
        if tasks:
            try:
                done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            except asyncio.CancelledError:
                for task in tasks:
                    task.cancel()
                raise
            state.cancelled.set()
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            # Retrieve every failure (so none is reported as unretrieved); raise the first.
            errors = [t.exception() for t in tasks if t in done and not t.cancelled()]
            first = next((e for e in errors if e is not None), None)
            if first is not None:
                raise first
        return self.finish(state)

    async def _send(self, chunk: Chunk, state: CallState) -> None:
        self.accept(state, chunk, await self._call("POST", "/v1/rewards", chunk, state))

    async def _call(self, method: str, path: str, chunk: Chunk, state: CallState) -> Outcome:
        """Drive the shared attempt machine: send, or wait, as it says."""
        machine = self.attempts(chunk, state)
        step = next(machine)
        while True:
            outcome: Outcome | None = None
            try:
                if isinstance(step, Send):
                    outcome = await self._attempt(method, path, chunk, step)
                else:
                    await self._sleep(step.seconds)
            except BaseException as exc:
                machine.throw(exc)  # the machine releases what it holds and re-raises
                raise
            try:
                step = machine.send(outcome)
            except StopIteration as finished:
                return finished.value  # type: ignore[no-any-return]

    async def _attempt(self, method: str, path: str, chunk: Chunk, step: Send) -> Outcome:
        """One HTTP exchange that ends within ``step.timeout``, however slowly bytes come."""
        url = step.endpoint.url
        try:
            response = await asyncio.wait_for(
                self._http.request(
                    method,
                    url + path,
                    content=chunk.body or None,
                    headers=self.headers(chunk.request_id, chunk.content_type),
                    timeout=step.timeout,
                ),
                step.timeout,
            )
        except asyncio.TimeoutError:
            timeout = httpx.ReadTimeout("the answer did not arrive within the attempt's time")
            return self.transport_outcome(timeout, chunk, url)
        except httpx.TransportError as exc:
            return self.transport_outcome(exc, chunk, url)
        return self.outcome(
            method, response.status_code, response.content, response.headers, chunk, url
        )

    async def model_info(self) -> ModelInfo:
        return ModelInfo.model_validate_json(await self._get("/v1/model"))

    async def healthy(self) -> bool:
        """True when some endpoint's process answers ``/healthz``."""
        return await self._any_ok("/healthz")

    async def ready(self) -> bool:
        """True when some endpoint has its model loaded and is accepting work (``/readyz``)."""
        return await self._any_ok("/readyz")

    async def _any_ok(self, path: str) -> bool:
        for endpoint in self.pool.endpoints:
            try:
                response = await self._http.get(
                    endpoint.url + path, headers=self.headers(uuid.uuid4().hex), timeout=5.0
                )
            except httpx.TransportError:
                continue
            if response.status_code == 200:
                return True
        return False

    async def _get(self, path: str) -> bytes:
        chunk = Chunk(items=range(0), body=b"", request_id=uuid.uuid4().hex, ids=())
        outcome = await self._call("GET", path, chunk, self.new_call(0, None))
        assert outcome.content is not None
        return outcome.content
