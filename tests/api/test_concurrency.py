"""Batch invariance under concurrency: 50 concurrent requests of mixed lengths through a real
uvicorn share forward passes, and every item's result equals its result when sent alone."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx

from tests.support import LiveServer
from tokenreward_service.config import Settings
from tokenreward_service.model import RewardModel


def _requests(n: int, seed: int = 11) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for r in range(n):
        items = [
            {
                "id": f"{r}-{i}",
                "prompt_ids": [rng.randrange(128) for _ in range(rng.randint(1, 60))],
                "response_ids": [rng.randrange(128) for _ in range(rng.randint(1, 120))],
            }
            for i in range(rng.randint(1, 6))
        ]
        out.append({"items": items, "beta_c": rng.choice([1.0, 0.5]), "return_prefix_scores": True})
    return out


def test_fifty_concurrent_requests_equal_their_results_alone(llama: RewardModel) -> None:
    requests = _requests(50)
    # A small budget and a real wait so concurrent items really are mixed into shared batches.
    settings = Settings(max_batch_tokens=2048, max_wait_ms=20)
    with LiveServer(settings, model=llama) as server:

        async def together() -> list[dict[str, Any]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                responses = await asyncio.gather(
                    *(client.post("/v1/rewards", json=r) for r in requests)
                )
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            return [r.json() for r in responses]

        concurrent = asyncio.run(together())
        metrics = httpx.get(f"{server.url}/metrics").text
        alone = []
        for request in requests:
            for item in request["items"]:
                single = dict(request, items=[item])
                alone.append(httpx.post(f"{server.url}/v1/rewards", json=single, timeout=60).json())

    assert _sample(metrics, "tokenreward_items_total") == sum(len(r["items"]) for r in requests)
    flat = [res for response in concurrent for res in response["results"]]
    assert [res["id"] for res in flat] == [it["id"] for r in requests for it in r["items"]]
    worst = 0.0
    for together_result, alone_response in zip(flat, alone, strict=True):
        single = alone_response["results"][0]
        assert single["id"] == together_result["id"]
        pairs = [
            *zip(together_result["token_rewards"], single["token_rewards"], strict=True),
            *zip(together_result["prefix_scores"], single["prefix_scores"], strict=True),
            (together_result["score"], single["score"]),
            (together_result["prompt_score"], single["prompt_score"]),
        ]
        worst = max(worst, *(abs(a - b) for a, b in pairs))
    assert worst <= 1e-4, worst


def test_concurrent_items_share_forward_passes(llama: RewardModel) -> None:
    requests = _requests(30, seed=5)
    settings = Settings(max_batch_tokens=8192, max_wait_ms=50)
    with LiveServer(settings, model=llama) as server:

        async def send() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                responses = await asyncio.gather(
                    *(client.post("/v1/rewards", json=r) for r in requests)
                )
            assert all(r.status_code == 200 for r in responses)

        asyncio.run(send())
        metrics = httpx.get(f"{server.url}/metrics").text
    items_total = sum(len(r["items"]) for r in requests)
    batches = _sample(metrics, "tokenreward_batch_size_count")
    assert _sample(metrics, "tokenreward_batch_size_sum") == items_total
    assert batches < items_total / 2, (batches, items_total)


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")
