"""Out of device memory: a batch is split in two and retried, and the batcher lowers its budget.

No GPU is available here, so the model is the real tiny RM whose shared-scoring step raises
torch's own CUDA out-of-memory error for batches above a size, as a full GPU would; the
splitting, retrying and budget logic that runs is the real one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import httpx
import torch

from tests.support import LiveServer
from tokenreward_service.config import Settings
from tokenreward_service.loading import load_reward_model
from tokenreward_service.model import BatchScores, RewardModel


def limit_batches(model: RewardModel, most: int) -> list[int]:
    real = model.score_shared
    seen: list[int] = []

    def score_shared(sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> BatchScores:
        seen.append(len(sequences))
        if len(sequences) > most:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(sequences, prompt_lens)

    model.score_shared = score_shared  # type: ignore[method-assign]
    return seen


def test_a_batch_that_does_not_fit_is_split_and_retried(llama_dir: Path) -> None:
    model = load_reward_model(llama_dir, device="cpu")
    g = torch.Generator().manual_seed(0)
    sequences = [
        torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 9, 12, 3, 30, 8, 17)
    ]
    expected = model.score(sequences)
    seen = limit_batches(model, most=2)
    out = model.score_batch(sequences, [2] * len(sequences))
    assert out.oom_splits > 0
    assert max(seen) == 7
    for got, want in zip(out.scores, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_the_server_survives_and_lowers_its_budget(llama_dir: Path) -> None:
    model = load_reward_model(llama_dir, device="cpu")
    limit_batches(model, most=3)
    settings = Settings(max_batch_tokens=8192, max_wait_ms=50, min_padding_efficiency=0.0)
    with LiveServer(settings, model=model) as server:
        body = {"items": [{"prompt_ids": [1, 2, 3], "response_ids": [4 + i] * 5} for i in range(8)]}
        response = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=60)
        metrics = httpx.get(f"{server.url}/metrics").text
        budget = server.app.state.tokenreward.batcher_budget()
    assert response.status_code == 200
    assert len(response.json()["results"]) == 8
    assert (
        "tokenreward_oom_splits_total 2.0" in metrics
        or "tokenreward_oom_splits_total 3.0" in metrics
    )
    assert budget == 4096
    assert "tokenreward_batch_token_budget 4096.0" in metrics
