"""Shared prompts: a prompt computed once, its key/value cache reused for every response of its
group, gives the same scores as scoring each item in full, for every architecture."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch

from tests.support import LiveServer
from tokenreward_service.config import Settings
from tokenreward_service.loading import load_reward_model
from tokenreward_service.model import find_shared_prompts

ARCHITECTURES = ["llama", "qwen2", "mistral", "gpt2", "gpt_neox"]


def _batch(seed: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 128, (n,), generator=g).tolist()

    prompts = [ids(n) for n in (9, 30, 17)]
    sequences, prompt_lens = [], []
    for prompt, responses in zip(prompts, [(1, 12, 5), (7, 7), (20, 2, 9, 3)], strict=True):
        for r in responses:
            sequences.append(prompt + ids(r))
            prompt_lens.append(len(prompt))
    sequences += [ids(4) + ids(6), ids(25)]  # a short prompt and a lone item: not shared
    prompt_lens += [4, 10]
    return sequences, prompt_lens


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_shared_prompt_scores_equal_full_scores(
    model_dir: Callable[..., Path], architecture: str
) -> None:
    folder = model_dir(architecture, seed=ARCHITECTURES.index(architecture))
    model = load_reward_model(folder, device="cpu", dtype="float32")
    sequences, prompt_lens = _batch(seed=ARCHITECTURES.index(architecture))
    shared = model.score_batch(sequences, prompt_lens)
    assert shared.shared_items == 9
    full = model.score(sequences)
    for a, b, seq in zip(shared.scores, full, sequences, strict=True):
        assert a.shape == (len(seq),)
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    padded_full = len(sequences) * max(map(len, sequences))
    assert shared.computed_tokens < padded_full  # the prompts ran once
    model.share_prompts = False
    assert model.score_batch(sequences, prompt_lens).shared_items == 0


def test_grouping() -> None:
    p = list(range(10, 20))
    groups, singles = find_shared_prompts([[*p, 1], [5, 5, 5, 1], [*p, 2, 3], p], [10, 3, 10, 10])
    assert groups == [[0, 2]]  # the third item with that prompt has no response: not shared
    assert singles == [1, 3]


def test_server_shares_prompts_and_counts_hits(llama_dir: Path) -> None:
    model = load_reward_model(llama_dir, device="cpu")
    prompt = list(range(3, 40))
    body = {"items": [{"prompt_ids": prompt, "response_ids": [5 + i] * (3 + i)} for i in range(8)]}
    with LiveServer(Settings(), model=model) as server:
        shared = httpx.post(f"{server.url}/v1/rewards", json=body).json()["results"]
        metrics = httpx.get(f"{server.url}/metrics").text
    model.share_prompts = False
    with LiveServer(Settings(), model=model) as server:
        alone = httpx.post(f"{server.url}/v1/rewards", json=body).json()["results"]
    assert "tokenreward_shared_prompt_items_total 8.0" in metrics
    for a, b in zip(shared, alone, strict=True):
        assert a["token_rewards"] == pytest.approx(b["token_rewards"], abs=1e-4)
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
