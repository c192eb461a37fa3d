"""Text in, tokens out: items may carry prompt/response text, tokenized by the RM's tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import LiveServer
from tokenreward_service.config import Settings
from tokenreward_service.loading import load_reward_model


@pytest.fixture(scope="module")
def url(text_model_dir: Path) -> Iterator[str]:
    model = load_reward_model(text_model_dir, device="cpu")
    assert model.tokenizer is not None
    with LiveServer(Settings(), model=model) as server:
        yield server.url


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/rewards", json=body, timeout=60)


def test_text_items_equal_their_token_ids(url: str, text_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_model_dir)
    prompt, response = "the movie was", " very good, I hate it"
    by_text = post(url, {"items": [{"id": "t", "prompt": prompt, "response": response}]})
    assert by_text.status_code == 200, by_text.text
    result = by_text.json()["results"][0]
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id
    by_ids = post(url, {"items": [{"prompt_ids": prompt_ids, "response_ids": response_ids}]}).json()
    assert result["token_rewards"] == pytest.approx(by_ids["results"][0]["token_rewards"], abs=1e-6)
    assert len(result["response_tokens"]) == len(response_ids)
    assert "".join(result["response_tokens"]) == response
    for token, (start, end) in zip(
        result["response_tokens"], result["response_offsets"], strict=True
    ):
        assert response[start:end] == token
    assert by_ids["results"][0]["response_tokens"] is None  # only text items get them


@pytest.mark.parametrize(
    "item",
    [
        {"prompt_ids": [1, 2], "response": "good"},
        {"prompt": "a", "response_ids": [3]},
        {"prompt": "a", "response": "b", "prompt_ids": [1], "response_ids": [2]},
        {"prompt": "a"},
        {"prompt": "a", "response": ""},
    ],
)
def test_invalid_mixes_are_refused(url: str, item: dict[str, Any]) -> None:
    ok = {"prompt": "the", "response": "movie"}
    response = post(url, {"items": [ok, item]})
    assert response.status_code == 422
    assert response.json()["error"] == {
        "type": "invalid_request",
        "message": response.json()["error"]["message"],
        "item": 1,
    }


def test_text_needs_a_tokenizer(llama_dir: Path) -> None:
    model = load_reward_model(llama_dir, device="cpu")
    assert model.tokenizer is None
    with LiveServer(Settings(), model=model) as server:
        response = post(
            server.url,
            {"items": [{"prompt_ids": [1], "response_ids": [2]}, {"prompt": "a", "response": "b"}]},
        )
    assert response.status_code == 422
    assert response.json()["error"]["item"] == 1
    assert "no tokenizer" in response.json()["error"]["message"]


def test_the_client_sends_text_items(url: str) -> None:
    from tokenreward import RewardClient

    with RewardClient(url) as client:
        (result,) = client.rewards([{"prompt": "what a", "response": " great day"}])
    assert "".join(result.response_tokens or []) == " great day"
