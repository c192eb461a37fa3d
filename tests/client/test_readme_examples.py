"""The README's "Use from a trainer" examples run as written, against a real server."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.client.test_integrations import CompletionOutput, RequestOutput
from tests.support import LiveServer
from tokenreward_service.config import Settings
from tokenreward_service.model import RewardModel

README = Path(__file__).resolve().parents[2] / "README.md"


def example(name: str) -> str:
    match = re.search(
        rf"<!-- example: {name} -->\n```python\n(.*?)```", README.read_text(), flags=re.S
    )
    assert match, f"README has no '{name}' example"
    return match.group(1)


@pytest.fixture(scope="module")
def url(llama: RewardModel) -> Iterator[str]:
    with LiveServer(Settings(), model=llama) as live:
        yield live.url


def test_rollout_worker_example(url: str) -> None:
    outputs = [
        RequestOutput(
            f"r{r}",
            None,
            [1, 10 + r, 11],
            None,
            [CompletionOutput(i, "", (20 + i,) * (i + 1)) for i in range(4)],
        )
        for r in range(3)
    ]
    namespace = {"RM_URL": url, "outputs": outputs}
    exec(example("rollout"), namespace)
    per_sample = namespace["per_sample"]
    assert [len(samples) for samples in per_sample] == [4, 4, 4]  # type: ignore[arg-type]


def test_learner_example(url: str) -> None:
    prompt_ids = [[1, 5, 6], [1, 7]]
    response_ids = [[8, 9, 10], [11]]
    logp = torch.full((2, 3), -1.0)
    namespace = {
        "RM_URL": url,
        "prompt_ids": prompt_ids,
        "response_ids": response_ids,
        "logp_old": logp,
        "logp_ref": logp - 0.5,
    }
    exec(example("learner"), namespace)
    rewards, mask = namespace["rewards"], namespace["mask"]
    token_rewards = namespace["token_rewards"]
    assert isinstance(token_rewards, torch.Tensor)
    assert mask.tolist() == [[True, True, True], [True, False, False]]  # type: ignore[attr-defined]
    expected = (rewards - 0.05 * 0.5) * mask  # type: ignore[operator]
    assert torch.allclose(token_rewards, expected)
