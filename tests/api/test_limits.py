"""The request limits agree with each other and refuse what can never fit before the costly
work: the byte limit follows the queue bound, and a request with more token IDs than the queue
ever holds is refused right after its JSON is decoded, before validation and preparation."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support import LiveServer
from tokenreward_service.config import MAX_BYTES_PER_TOKEN_ID, Settings
from tokenreward_service.model import RewardModel


def test_the_byte_limit_follows_the_queue_bound_unless_set() -> None:
    assert Settings().request_bytes_limit == 8 * 1024 * 1024  # 8 bytes x 1,048,576 tokens
    assert Settings(max_queued_tokens=4_000_000).request_bytes_limit == 32_000_000
    assert Settings(max_queued_tokens=1000).request_bytes_limit == 1 << 20  # a floor
    assert Settings(max_request_bytes=5000).request_bytes_limit == 5000


def test_a_queue_full_of_the_longest_token_ids_fits_under_the_default_byte_limit() -> None:
    """The rule the default stands on: a compact JSON request holding as many token IDs of 7
    digits as the queue can take is under the limit."""
    settings = Settings(max_queued_tokens=20_000)
    ids = [9_999_999] * (settings.max_queued_tokens - 1)
    body = httpx.Request(
        "POST", "http://x", json={"items": [{"prompt_ids": ids, "response_ids": [9_999_999]}]}
    ).content
    assert len(body) <= settings.request_bytes_limit
    assert len(body) > 0.95 * MAX_BYTES_PER_TOKEN_ID * settings.max_queued_tokens


@pytest.fixture(scope="module")
def small_queue(llama: RewardModel) -> Iterator[LiveServer]:
    with LiveServer(Settings(max_queued_tokens=1000), model=llama) as live:
        yield live


def test_more_token_ids_than_the_queue_holds_is_413_before_validation(
    small_queue: LiveServer,
) -> None:
    # An unknown field would be a 422 from validation: the 413 shows the count came first.
    items: list[dict[str, object]] = [
        {"prompt_ids": [5] * 60, "response_ids": [6] * 65} for _ in range(8)
    ]  # 1000 token IDs: the bound
    items[0] = {**items[0], "response_ids": [6] * 66, "extra": 1}
    response = httpx.post(f"{small_queue.url}/v1/rewards", json={"items": items}, timeout=30)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["type"] == "too_large"
    assert "1001 token IDs" in error["message"]
    assert "queue bound (1000)" in error["message"]
    # At the bound it goes on (to validation here: the unknown field), and then is served.
    items[0] = {**items[0], "response_ids": [6] * 65}
    response = httpx.post(f"{small_queue.url}/v1/rewards", json={"items": items}, timeout=30)
    assert response.status_code == 422
    assert "extra" in response.json()["error"]["message"]
    del items[0]["extra"]
    response = httpx.post(f"{small_queue.url}/v1/rewards", json={"items": items}, timeout=30)
    assert response.status_code == 200, response.text
