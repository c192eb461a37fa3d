"""Error mapping, retries, endpoints and chunking of both clients, on httpx's MockTransport with
an injected sleep: every case runs for the sync and the async twin, instantly."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np
import pytest

import tokenreward
from tokenreward import (
    AsyncRewardClient,
    BadResponseError,
    ConnectionFailedError,
    DeadlineExceededError,
    InternalServerError,
    InvalidRequestError,
    OverloadedError,
    RequestTooLargeError,
    RetryPolicy,
    RewardClient,
    RewardClientError,
    RewardItem,
    UnauthorizedError,
)

Handler = Callable[[httpx.Request], httpx.Response]
TWINS = ["sync", "async"]


class FakeService:
    """Answers like the server: reward of each response token = its id; score = their sum.
    ``script`` holds canned answers (or exceptions) to give first, in order, per URL host."""

    def __init__(
        self, script: dict[str, list[Any]] | None = None, revision: str = "sha256:x"
    ) -> None:
        self.script = script or {}
        self.revision = revision
        self.requests: list[httpx.Request] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(request)
            queue = self.script.get(request.url.host, [])
            canned = queue.pop(0) if queue else None
        if isinstance(canned, Exception):
            raise canned
        if isinstance(canned, httpx.Response):  # a fresh copy: one response object serves one twin
            return httpx.Response(
                canned.status_code, headers=canned.headers, content=canned.content
            )
        body = json.loads(request.content)
        results = [
            {
                "id": item.get("id"),
                "token_rewards": [float(t) for t in item["response_ids"]],
                "score": float(sum(item["response_ids"])),
                "prompt_score": float(len(item["prompt_ids"])),
                "prefix_scores": None,
            }
            for item in body["items"]
        ]
        return httpx.Response(
            200, json={"model": {"id": "m", "revision": self.revision}, "results": results}
        )


def error(status: int, kind: str, item: int | None = None, **headers: str) -> httpx.Response:
    body = {"error": {"type": kind, "message": f"{kind} happened", "item": item}}
    return httpx.Response(status, json=body, headers=headers)


def call(
    twin: str,
    handler: Handler,
    items: Sequence[Any],
    urls: str | list[str] = "http://a",
    **options: Any,
) -> tuple[list[tokenreward.RewardResult], list[float]]:
    sleeps: list[float] = []
    kw = {k: options.pop(k) for k in ("beta_c", "baseline", "timeout") if k in options}
    options.setdefault("retry", RetryPolicy(max_attempts=5))
    if twin == "sync":
        with RewardClient(
            urls, transport=httpx.MockTransport(handler), sleep=sleeps.append, **options
        ) as client:
            return client.rewards(items, **kw), sleeps

    async def main() -> list[tokenreward.RewardResult]:
        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)

        async with AsyncRewardClient(
            urls, transport=httpx.MockTransport(handler), sleep=sleep, **options
        ) as client:
            return await client.rewards(items, **kw)

    return asyncio.run(main()), sleeps


ITEMS = [([1, 2], [3, 4]), ([5], [6])]


@pytest.mark.parametrize("twin", TWINS)
def test_items_in_every_accepted_shape(twin: str) -> None:
    items = [
        ([1, 2], [3, 4]),
        (np.array([1]), np.array([7, 8], dtype=np.int64)),
        {"id": "x", "prompt_ids": (1,), "response_ids": range(2, 4)},
        RewardItem(id="y", prompt_ids=[1], response_ids=[9]),
    ]
    results, _ = call(twin, FakeService(), items)
    assert [r.token_rewards for r in results] == [[3.0, 4.0], [7.0, 8.0], [2.0, 3.0], [9.0]]
    assert [r.id for r in results] == [None, None, "x", "y"]
    with pytest.raises(TypeError, match="item 1"):
        call(twin, FakeService(), [([1], [2]), "nonsense"])
    with pytest.raises(TypeError, match="item 0"):
        call(twin, FakeService(), [([1], [2.5])])


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize(
    ("answer", "exc", "status"),
    [
        (error(422, "invalid_request", item=1), InvalidRequestError, 422),
        (error(413, "too_large"), RequestTooLargeError, 413),
        (error(401, "unauthorized"), UnauthorizedError, 401),
        (error(500, "internal", item=0), InternalServerError, 500),
    ],
)
def test_final_errors_are_typed_and_never_retried(
    twin: str, answer: httpx.Response, exc: type, status: int
) -> None:
    service = FakeService({"a": [answer]})
    with pytest.raises(exc) as info:
        call(twin, service, ITEMS)
    assert len(service.requests) == 1
    assert info.value.status == status
    assert info.value.items == range(0, 2)
    assert isinstance(info.value, RewardClientError)
    assert info.value.request_id == service.requests[0].headers["x-request-id"]


@pytest.mark.parametrize("twin", TWINS)
def test_the_wire_type_wins_over_the_status(twin: str) -> None:
    # A body that says "overloaded" under an odd status is still an OverloadedError...
    odd = httpx.Response(
        418, json={"error": {"type": "overloaded", "message": "busy", "item": None}}
    )
    with pytest.raises(OverloadedError):
        call(twin, FakeService({"a": [odd]}), ITEMS)
    # ...and a bare status with no wire body maps by status (a proxy's 413 page).
    bare = httpx.Response(413, text="<html>Request Entity Too Large</html>")
    with pytest.raises(RequestTooLargeError, match="Request Entity Too Large"):
        call(twin, FakeService({"a": [bare]}), ITEMS)


@pytest.mark.parametrize("twin", TWINS)
def test_item_index_is_mapped_to_the_callers_list(twin: str) -> None:
    items = [([1], [t + 1]) for t in range(10)]

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body["items"][0]["response_ids"] == [7]:  # the third chunk: items 6..8
            return error(422, "invalid_request", item=2)
        return FakeService()(request)

    with pytest.raises(InvalidRequestError) as info:
        call(twin, handler, items, max_items_per_request=3, max_concurrency=1)
    assert info.value.item == 8
    assert info.value.items == range(6, 9)


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize(
    "transient",
    [
        error(429, "overloaded", **{"Retry-After": "3"}),
        error(503, "not_ready"),
        error(504, "timeout"),
        httpx.Response(502, text="bad gateway"),
        httpx.ConnectError("refused"),
        httpx.ReadError("reset by peer"),
        httpx.RemoteProtocolError("server disconnected"),
    ],
    ids=["429", "503", "504", "502", "connect", "read", "protocol"],
)
def test_transient_failures_are_retried_with_backoff(twin: str, transient: Any) -> None:
    service = FakeService({"a": [transient, transient]})
    results, sleeps = call(twin, service, ITEMS)
    assert [r.score for r in results] == [7.0, 6.0]
    assert len(service.requests) == 3
    ids = {r.headers["x-request-id"] for r in service.requests}
    assert len(ids) == 1  # one logical request, retried under the same id
    assert len(sleeps) == 2
    if isinstance(transient, httpx.Response) and transient.status_code == 429:
        assert all(s >= 3 for s in sleeps)  # Retry-After honoured
    else:
        assert 0 < sleeps[0] <= 0.2
        assert sleeps[1] <= 0.4


def test_backoff_is_capped_exponential_with_jitter() -> None:
    import random

    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=2.0, jitter=0.5)
    rng = random.Random(0)
    delays = [policy.delay(attempt, None, rng) for attempt in range(10)]
    for attempt, delay in enumerate(delays):
        ceiling = min(2.0, 0.1 * 2**attempt)
        assert ceiling * 0.5 <= delay <= ceiling
    assert policy.delay(0, 7.0, rng) == 7.0
    assert len(set(delays)) == len(delays)


@pytest.mark.parametrize("twin", TWINS)
def test_retries_are_bounded(twin: str) -> None:
    service = FakeService({"a": [error(429, "overloaded", **{"Retry-After": "1"})] * 10})
    with pytest.raises(OverloadedError) as info:
        call(twin, service, ITEMS, retry=RetryPolicy(max_attempts=4))
    assert len(service.requests) == 4
    assert info.value.retry_after == 1.0


@pytest.mark.parametrize("twin", TWINS)
def test_the_deadline_is_never_overrun(twin: str) -> None:
    service = FakeService({"a": [error(429, "overloaded", **{"Retry-After": "30"})] * 10})
    with pytest.raises(DeadlineExceededError) as info:
        call(twin, service, ITEMS, timeout=5.0)
    assert isinstance(info.value.__cause__, OverloadedError)
    assert len(service.requests) == 1


@pytest.mark.parametrize("twin", TWINS)
def test_a_failing_endpoint_is_set_aside_and_the_other_serves(twin: str) -> None:
    service = FakeService({"a": [httpx.ConnectError("refused")] * 100})
    results, _ = call(
        twin,
        service,
        [([1], [t]) for t in range(20)],
        urls=["http://a", "http://b"],
        max_items_per_request=2,
        max_concurrency=1,
    )
    assert [r.score for r in results] == [float(t) for t in range(20)]
    hosts = [r.url.host for r in service.requests]
    assert hosts.count("a") == 1  # tried once, then set aside for the back-off
    assert hosts.count("b") == 10


@pytest.mark.parametrize("twin", TWINS)
def test_all_endpoints_down_is_a_typed_error(twin: str) -> None:
    service = FakeService({h: [httpx.ConnectError("refused")] * 100 for h in "ab"})
    with pytest.raises(ConnectionFailedError, match="refused"):
        call(twin, service, ITEMS, urls=["http://a", "http://b"])
    assert len(service.requests) == 5


def _faulty(kind: str) -> Handler:
    """A replica or proxy that answers 200 with something that cannot be right."""
    good = FakeService()

    def handler(request: httpx.Request) -> httpx.Response:
        body = good(request).json()
        results = body["results"]
        if kind == "short":
            body["results"] = []
        elif kind == "swapped":
            results[0], results[1] = results[1], results[0]
        elif kind == "one_short":
            results[0]["token_rewards"] = results[0]["token_rewards"][:-1]
        elif kind == "one_long":
            results[1]["token_rewards"] = [*results[1]["token_rewards"], 0.0]
        elif kind == "nan":
            return httpx.Response(200, content=json.dumps(body).replace("4.0", "NaN").encode())
        return httpx.Response(200, json=body)

    return handler


FAULTS = ["short", "swapped", "one_short", "one_long", "nan"]


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("kind", FAULTS)
def test_a_faulty_replica_is_failed_over_never_returned(twin: str, kind: str) -> None:
    """Items without ids (the README's usage): the client still catches swapped results, and a
    wrong length or a non-finite value, and gets the right ones from the other replica."""
    faulty, good = _faulty(kind), FakeService()
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return (faulty if request.url.host == "a" else good)(request)

    results, _ = call(twin, handler, ITEMS, urls=["http://a", "http://b"])
    assert [r.token_rewards for r in results] == [[3.0, 4.0], [6.0]]
    assert [r.id for r in results] == [None, None]  # the client's own ids are taken off again
    if "a" in hosts:
        assert hosts.count("a") == 1  # set aside after its fault


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("kind", FAULTS)
def test_only_faulty_answers_end_in_a_typed_error(twin: str, kind: str) -> None:
    with pytest.raises(BadResponseError, match=r"http://a"):
        call(twin, _faulty(kind), ITEMS, retry=RetryPolicy(max_attempts=2))


@pytest.mark.parametrize("twin", TWINS)
def test_big_calls_are_split_sent_concurrently_and_reassembled_in_order(twin: str) -> None:
    items = [([1], [t, t]) for t in range(1000)]
    service = FakeService()
    results, _ = call(twin, service, items, max_items_per_request=64, max_bytes_per_request=1 << 20)
    assert [r.score for r in results] == [2.0 * t for t in range(1000)]
    assert len(service.requests) == 16
    by_bytes = FakeService()
    long_items = [([1] * 100, [t]) for t in range(50)]
    results, _ = call(twin, by_bytes, long_items, max_bytes_per_request=4000)
    assert [r.score for r in results] == [float(t) for t in range(50)]
    assert len(by_bytes.requests) > 1
    assert all(len(r.content) <= 4000 for r in by_bytes.requests)


@pytest.mark.parametrize("twin", TWINS)
def test_mixed_model_revisions_in_one_call_are_refused(twin: str) -> None:
    old, new = FakeService(revision="sha256:old"), FakeService(revision="sha256:new")

    def handler(request: httpx.Request) -> httpx.Response:
        return (old if request.url.host == "a" else new)(request)

    with pytest.raises(BadResponseError, match="different model revisions"):
        call(
            twin,
            handler,
            [([1], [t]) for t in range(8)],
            urls=["http://a", "http://b"],
            max_items_per_request=1,
        )


@pytest.mark.parametrize("twin", TWINS)
def test_empty_call_sends_nothing(twin: str) -> None:
    service = FakeService()
    assert call(twin, service, [])[0] == []
    assert service.requests == []


@pytest.mark.parametrize("twin", TWINS)
def test_api_key_and_request_id_headers(twin: str) -> None:
    service = FakeService()
    call(twin, service, ITEMS, api_key="k-123")
    (request,) = service.requests
    assert request.headers["authorization"] == "Bearer k-123"
    assert len(request.headers["x-request-id"]) == 32


def test_least_in_flight_endpoint_is_chosen() -> None:
    from tokenreward._policy import EndpointPool

    now = [0.0]
    pool = EndpointPool(["http://a", "http://b", "http://c"], backoff_s=1.0, clock=lambda: now[0])
    a, b, c = pool.endpoints
    assert {pool.acquire().url for _ in range(3)} == {"http://a", "http://b", "http://c"}
    pool.release(a, failed=False)
    assert pool.acquire() is a  # the only one with nothing in flight
    pool.release(b, failed=True)
    assert b.in_flight == 0
    assert pool.acquire() is not b  # set aside, although it has the fewest in flight...
    now[0] = 1.5
    assert pool.acquire() is b  # ...and probed again once its back-off has passed
    pool.release(b, failed=True)
    pool.release(b, failed=False)  # consecutive failures double the back-off; success clears it
    assert b.down_until == 0.0
    assert b.failures == 0
    pool.release(c, failed=True)
    pool.release(a, failed=True)
    pool.release(a, failed=True)
    assert pool.acquire() is b


def test_public_api_is_explicit() -> None:
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(tokenreward.__path__)}
    public = {name for name in dir(tokenreward) if not name.startswith("_")}
    assert public - set(tokenreward.__all__) <= submodules
    for name in tokenreward.__all__:
        assert hasattr(tokenreward, name)


@pytest.mark.parametrize("twin", TWINS)
def test_a_callers_id_that_looks_like_the_clients_own_comes_back_as_given(twin: str) -> None:
    items = [{"id": "#1", "prompt_ids": [1], "response_ids": [2]}, ([1], [3])]
    results, _ = call(twin, FakeService(), items)
    assert [r.id for r in results] == ["#1", None]
