"""The call's deadline holds against replicas that trickle or never answer, a 429 sends the
chunk to an idle replica instead of waiting, and both twins give up a failed call alike."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.client.test_policy import TWINS, FakeService, call, error
from tests.support import LiveServer
from tokenreward import (
    AsyncRewardClient,
    InvalidRequestError,
    RetryPolicy,
    RewardClient,
    RewardClientError,
)
from tokenreward_service.config import Settings
from tokenreward_service.model import RewardModel


@contextlib.contextmanager
def raw_server(serve: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """A TCP server on 127.0.0.1 that handles each connection with ``serve`` in a thread; it
    stops (and closes every connection) when the test leaves the block."""
    stop = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    threads: list[threading.Thread] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=serve, args=(conn, stop), daemon=True)
            thread.start()
            threads.append(thread)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        acceptor.join(5)
        for thread in threads:
            thread.join(5)
        listener.close()


def trickle(conn: socket.socket, stop: threading.Event) -> None:
    """Reads the request, then answers 200 one body byte every 0.5 s (for at most 60 s)."""
    with conn:
        conn.settimeout(5)
        with contextlib.suppress(OSError):
            conn.recv(1 << 16)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            conn.sendall(b"Content-Length: 100000\r\n\r\n")
            for _ in range(120):
                if stop.wait(0.5):
                    return
                conn.sendall(b" ")


def silent(conn: socket.socket, stop: threading.Event) -> None:
    """Accepts and reads, never answers (until the test ends)."""
    with conn:
        conn.settimeout(5)
        with contextlib.suppress(OSError):
            conn.recv(1 << 16)
            stop.wait(60)


def timed_call(twin: str, urls: list[str], **options: Any) -> tuple[float, Any]:
    """A real call (real sleeps, real sockets); returns its duration and result or error."""
    items = [([1, 2], [3, 4])]
    started = time.monotonic()
    try:
        if twin == "sync":
            with RewardClient(urls, **options) as client:
                result: Any = client.rewards(items)
        else:

            async def main() -> Any:
                async with AsyncRewardClient(urls, **options) as client:
                    return await client.rewards(items)

            result = asyncio.run(main())
    except RewardClientError as exc:
        result = exc
    return time.monotonic() - started, result


@pytest.mark.parametrize("twin", TWINS)
def test_a_trickling_replica_cannot_stretch_the_deadline(twin: str) -> None:
    """Before: 1 byte a second held a 6 s call for 25 s (httpx's timeouts are per read)."""
    with raw_server(trickle) as url:
        took, outcome = timed_call(twin, [url], timeout=3.0, request_timeout=60.0)
    assert isinstance(outcome, RewardClientError)
    assert took < 4.5


@pytest.mark.parametrize("twin", TWINS)
def test_a_silent_replica_leaves_time_for_a_healthy_one(twin: str, llama: RewardModel) -> None:
    """Before: with request_timeout >= timeout the first attempt took the whole deadline and
    the healthy replica was never tried."""
    with raw_server(silent) as dead, LiveServer(Settings(), model=llama) as alive:
        took, outcome = timed_call(
            twin, [dead, alive.url], timeout=8.0, request_timeout=600.0, seed=0
        )
        assert not isinstance(outcome, Exception), outcome
        assert len(outcome[0].token_rewards) == 2
        assert took < 7.0


@pytest.mark.parametrize("twin", TWINS)
def test_an_overloaded_replica_sends_the_chunk_to_an_idle_one_at_once(twin: str) -> None:
    """Before: it slept Retry-After (8 s) although the other replica was idle."""
    busy = error(429, "overloaded", **{"Retry-After": "8"})
    service = FakeService({"a": [busy] * 10})
    results, sleeps = call(twin, service, [([1], [5])], urls=["http://a", "http://b"], seed=1)
    assert results[0].token_rewards == [5.0]
    assert sleeps == []
    # And later chunks go to the idle replica first while the busy one's Retry-After runs.
    hosts = [r.url.host for r in service.requests]
    assert hosts[-1] == "b"


@pytest.mark.parametrize("twin", TWINS)
def test_a_final_error_gives_up_the_siblings_in_both_twins_alike(twin: str) -> None:
    """Before: the sync twin waited for its siblings' whole retry loops (3.0 s against 0.2 s)."""
    calls = {"n": 0}
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            calls["n"] += 1
        if b'"response_ids":[9]' in request.content:
            return error(422, "invalid_request", item=0)
        return error(503, "not_ready")  # the sibling retries, with real back-off

    items = [([1], [9]), ([1], [2]), ([1], [3])]
    options = {
        "transport": httpx.MockTransport(handler),
        "retry": RetryPolicy(max_attempts=10, initial_backoff_s=1.0, jitter=0.0),
        "max_items_per_request": 1,
    }

    def run_call() -> None:
        if twin == "sync":
            with RewardClient("http://a", **options) as client:
                client.rewards(items)
            return

        async def main() -> None:
            async with AsyncRewardClient("http://a", **options) as client:
                await client.rewards(items)

        asyncio.run(main())

    started = time.monotonic()
    with pytest.raises(InvalidRequestError):
        run_call()
    assert time.monotonic() - started < 0.9  # the siblings' first back-off is 1 s
    assert calls["n"] <= 3  # no sibling went on to a second attempt
