"""The client and the binary encoding: answers are asked for in it (and read in whichever
encoding comes back), requests are sent in it on request; the results are the same."""

from __future__ import annotations

import random
from collections.abc import Iterator

import httpx
import pytest

from tests.support import LiveServer
from tokenreward import BadResponseError, RetryPolicy, RewardClient, binary
from tokenreward.protocol import ModelRef, RewardItem, RewardResponse, RewardResult
from tokenreward_service.config import Settings
from tokenreward_service.model import RewardModel


class Recording(httpx.HTTPTransport):
    """A real transport that keeps each exchange's request and response content types."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST":
            self.seen.append(
                (request.headers["content-type"], response.headers.get("content-type", ""))
            )
        return response


@pytest.fixture(scope="module")
def url(llama: RewardModel) -> Iterator[str]:
    with LiveServer(Settings(), model=llama) as live:
        yield live.url


def _items(seed: int, n: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [
        (
            [rng.randrange(3, 128) for _ in range(rng.randint(1, 30))],
            [rng.randrange(3, 128) for _ in range(rng.randint(1, 30))],
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("binary_requests", [False, True])
def test_results_are_the_same_in_either_encoding(url: str, binary_requests: bool) -> None:
    items = _items(5, 300)
    recording = Recording()
    with RewardClient(
        url,
        transport=recording,
        binary_requests=binary_requests,
        max_items_per_request=64,
    ) as client:
        got = client.rewards(items, return_prefix_scores=True)
    # The reference: the server's JSON, read with plain httpx, one item per request.
    for (prompt, response), result in zip(items[:40], got, strict=False):
        body = {"items": [{"prompt_ids": prompt, "response_ids": response}]}
        body["return_prefix_scores"] = True
        want = httpx.post(f"{url}/v1/rewards", json=body, timeout=30).json()["results"][0]
        assert result.token_rewards == pytest.approx(want["token_rewards"], abs=1e-5)
        assert result.prefix_scores == pytest.approx(want["prefix_scores"], abs=1e-5)
        assert result.score == pytest.approx(want["score"], abs=1e-5)
        assert result.id is None  # the client's own ids are taken off again
    assert len(got) == 300
    sent = "application/json" if not binary_requests else binary.MEDIA_TYPE
    assert recording.seen
    assert {kind for kind, _ in recording.seen} == {sent}
    assert {answer for _, answer in recording.seen} == {binary.MEDIA_TYPE}


def test_text_items_go_as_json_even_when_binary_is_asked_for() -> None:
    client = RewardClient("http://127.0.0.1:1", binary_requests=True)
    (ids,) = client.plan([RewardItem(prompt_ids=[1], response_ids=[2])], **OPTIONS)
    (text,) = client.plan([RewardItem(prompt="a", response="b")], **OPTIONS)
    assert ids.content_type == binary.MEDIA_TYPE
    assert text.content_type == "application/json"
    client.close()


OPTIONS = {"beta_c": 1.0, "baseline": "prompt", "return_prefix_scores": False}


def test_a_json_answer_is_read_as_before() -> None:
    """A server that ignores Accept (older ones) answers JSON: the client reads it."""

    def answer(request: httpx.Request) -> httpx.Response:
        assert binary.MEDIA_TYPE in request.headers["accept"]
        body = {
            "model": {"id": "m", "revision": "r"},
            "results": [{"id": "#0", "token_rewards": [0.5], "score": 1.0, "prompt_score": 0.5}],
        }
        return httpx.Response(200, json=body)

    with RewardClient("http://rm", transport=httpx.MockTransport(answer)) as client:
        (result,) = client.rewards([([1], [2])])
    assert result.token_rewards == [0.5]


def test_a_broken_binary_answer_is_a_bad_response_never_data() -> None:
    whole = binary.encode_response(
        RewardResponse(
            model=ModelRef(id="m", revision="r"),
            results=[RewardResult(id="#0", token_rewards=[0.5], score=1.0, prompt_score=0.5)],
        )
    )

    def answer(request: httpx.Request) -> httpx.Response:
        cut = whole[:-3]  # the last reward's bytes cut short
        return httpx.Response(200, content=cut, headers={"Content-Type": binary.MEDIA_TYPE})

    with (
        RewardClient(
            "http://rm",
            transport=httpx.MockTransport(answer),
            retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01),
        ) as client,
        pytest.raises(BadResponseError, match="ends inside the token rewards"),
    ):
        client.rewards([([1], [2])])
