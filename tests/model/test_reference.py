"""Served rewards equal plain transformers run on each prefix separately, per architecture.

Each model is a tiny random RM of a real HF architecture, saved with save_pretrained and loaded
through the real path; it is served by a real uvicorn and called over HTTP. The reference runs
the HF model's own forward (with its own last-token pooling) once per prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch

from tests.support import LiveServer, expected_rewards, reference_prefix_scores
from tokenreward_service.config import Settings
from tokenreward_service.loading import load_reward_model

ARCHITECTURES = ["llama", "qwen2", "mistral", "gpt2", "gpt_neox"]
TOLERANCE = 1e-4


def _cases(vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()  # 0..2 are pad/bos/eos

    return [(ids(p), ids(r)) for p, r in [(1, 1), (5, 12), (17, 3), (2, 40), (30, 25), (9, 9)]]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize(
    ("beta_c", "baseline", "suffix"),
    [(1.0, "prompt", ()), (0.3, "zero", (2,)), (1.0, "prompt", (2, 1))],
)
def test_served_rewards_equal_per_prefix_reference(
    model_dir: Callable[..., Path],
    architecture: str,
    beta_c: float,
    baseline: str,
    suffix: tuple[int, ...],
) -> None:
    folder = model_dir(architecture, seed=ARCHITECTURES.index(architecture))
    model = load_reward_model(folder, device="cpu", dtype="float32", suffix_ids=suffix)
    cases = _cases(128, seed=len(suffix))
    body = {
        "items": [
            {"id": str(i), "prompt_ids": p, "response_ids": r} for i, (p, r) in enumerate(cases)
        ],
        "beta_c": beta_c,
        "baseline": baseline,
        "return_prefix_scores": True,
    }
    with LiveServer(Settings(), model=model) as server:
        response = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"]["revision"] == model.spec.revision
    worst = 0.0
    for (prompt, resp), result in zip(cases, data["results"], strict=True):
        prefix = reference_prefix_scores(folder, [*prompt, *resp, *suffix])
        rewards, score, prompt_score = expected_rewards(
            prefix, len(prompt), len(resp), beta_c=beta_c, baseline=baseline
        )
        assert len(result["token_rewards"]) == len(resp)
        assert prompt_score is not None
        worst = max(
            worst,
            abs(result["score"] - score),
            abs(result["prompt_score"] - prompt_score),
            *(abs(a - b) for a, b in zip(result["token_rewards"], rewards, strict=True)),
        )
        assert result["prefix_scores"][-1] == result["score"]
    assert worst <= TOLERANCE, f"{architecture}: max abs error {worst:.3g}"
    # The rewards must not be trivially equal: a model that scores everything alike would pass.
    assert len({round(r, 4) for res in data["results"] for r in res["token_rewards"]}) > 20


def test_a_response_that_ends_with_the_suffix_gets_no_second_copy(
    model_dir: Callable[..., Path],
) -> None:
    """The policy generated the EOS the RM is read at: it is read once, as the reference
    reads the sequence, not followed by another."""
    folder = model_dir("llama", seed=0)
    model = load_reward_model(folder, device="cpu", dtype="float32", suffix_ids=(2,))
    prompt, response = [1, 9, 10], [11, 12, 13]
    body = {
        "items": [
            {"prompt_ids": prompt, "response_ids": response},
            {"prompt_ids": prompt, "response_ids": [*response, 2]},
        ]
    }
    with LiveServer(Settings(), model=model) as server:
        plain, ended = httpx.post(f"{server.url}/v1/rewards", json=body).json()["results"]
    once = reference_prefix_scores(folder, [*prompt, *response, 2])
    twice = reference_prefix_scores(folder, [*prompt, *response, 2, 2])
    assert ended["score"] == pytest.approx(once[-1], abs=TOLERANCE)
    assert plain["score"] == pytest.approx(once[-1], abs=TOLERANCE)
    assert abs(twice[-1] - once[-1]) > 1e-3  # a second copy would have shown
    assert len(ended["token_rewards"]) == len(response) + 1
