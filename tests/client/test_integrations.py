"""The trainer integrations against a real server: vLLM outputs, learner tensors, scalar reward
functions for OpenRLHF and TRL."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from tests.support import LiveServer
from tokenreward import RewardClient, RewardResult
from tokenreward.integrations.learner import dense_rewards, ppo_token_rewards
from tokenreward.integrations.trainers import openrlhf_reward_func, trl_reward_func
from tokenreward.integrations.vllm import items_from_vllm, rewards_by_request
from tokenreward_service.config import Settings
from tokenreward_service.model import RewardModel


# vLLM cannot be installed here (CUDA-only wheels, pins that conflict with this stack), so these
# stand-ins carry exactly the documented fields the adapter reads from vllm.RequestOutput and
# vllm.CompletionOutput, plus a few it must ignore.
@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: tuple[int, ...]
    cumulative_logprob: float | None = None
    logprobs: Any = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def server(llama: RewardModel) -> Iterator[LiveServer]:
    with LiveServer(Settings(), model=llama) as live:
        yield live


def test_vllm_outputs_to_items_and_back(server: LiveServer) -> None:
    outputs = [
        RequestOutput(
            "req-0",
            "p0",
            [1, 5, 6],
            None,
            [CompletionOutput(1, "b", (9, 9, 2)), CompletionOutput(0, "a", (7, 8))],  # out of order
        ),
        RequestOutput("req-1", "p1", [1, 4], None, [CompletionOutput(0, "c", (3,))]),
    ]
    items = items_from_vllm(outputs)
    assert [(i.id, i.prompt_ids, i.response_ids) for i in items] == [
        ("req-0/0", [1, 5, 6], [7, 8]),
        ("req-0/1", [1, 5, 6], [9, 9, 2]),
        ("req-1/0", [1, 4], [3]),
    ]
    with RewardClient(server.url) as client:
        results = client.rewards(items)
        grouped = rewards_by_request(outputs, results)
        direct = client.rewards([([1, 5, 6], [9, 9, 2])])[0]
    assert [[len(r.token_rewards) for r in g] for g in grouped] == [[2, 3], [1]]
    assert grouped[0][1].token_rewards == pytest.approx(direct.token_rewards, abs=1e-5)
    with pytest.raises(ValueError, match="expected 'req-0/0'"):
        rewards_by_request(outputs, list(reversed(results)))
    with pytest.raises(ValueError, match="no prompt_token_ids"):
        items_from_vllm([RequestOutput("x", None, None, None, [])])


def _results(*rows: list[float]) -> list[RewardResult]:
    return [
        RewardResult(id=None, token_rewards=row, score=sum(row), prompt_score=0.0) for row in rows
    ]


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_dense_rewards_and_the_ppo_reward(backend: str) -> None:
    results = _results([1.0, 2.0, 3.0], [4.0])
    rewards, mask = dense_rewards(results, backend=backend)  # type: ignore[arg-type]
    lib: Any = torch if backend == "torch" else np
    assert isinstance(rewards, torch.Tensor if backend == "torch" else np.ndarray)
    assert rewards.tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    old = lib.full((2, 3), -1.0)
    ref = lib.full((2, 3), -1.5)
    r = ppo_token_rewards(rewards, old, ref, mask, beta=0.1)
    expected = [[1.0 - 0.05, 2.0 - 0.05, 3.0 - 0.05], [4.0 - 0.05, 0.0, 0.0]]
    assert np.allclose(np.asarray(r.tolist()), expected)
    padded, padded_mask = dense_rewards(results, pad_to=5, backend=backend)  # type: ignore[arg-type]
    assert tuple(padded.shape) == (2, 5)
    assert padded_mask.sum().item() == 4
    with pytest.raises(ValueError, match="pad_to"):
        dense_rewards(results, pad_to=2)
    with pytest.raises(ValueError, match="same shape"):
        ppo_token_rewards(rewards, old[:, :2], ref, mask, beta=0.1)


class WordTokenizer:
    """A real Hugging Face fast tokenizer (word level) built here, with a BOS it adds itself."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
        words = ["the", "a", "good", "bad", "movie", "was", "is", "very", "not", "2", "+", "4", "="]
        vocab.update({word: i + 4 for i, word in enumerate(words)})
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
        self.hf = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self.hf.encode(text, add_special_tokens=add_special_tokens)
        return ids


def test_openrlhf_and_trl_reward_functions(server: LiveServer) -> None:
    tokenizer = WordTokenizer()
    with RewardClient(server.url) as client:
        reference = client.rewards(
            [
                (
                    tokenizer.encode("the movie was"),
                    tokenizer.encode(" very good", add_special_tokens=False),
                ),
                (tokenizer.encode("2 + 2 ="), tokenizer.encode(" 4", add_special_tokens=False)),
            ]
        )
        openrlhf = openrlhf_reward_func(client, tokenizer)
        scores = openrlhf(
            ["the movie was very good", "2 + 2 = 4"], ["the movie was", "2 + 2 ="], None
        )
        assert isinstance(scores, torch.Tensor)
        assert scores.tolist() == pytest.approx([r.score for r in reference], abs=1e-6)

        trl = trl_reward_func(client, tokenizer)
        assert trl.__name__ == "tokenreward"
        plain = trl(
            prompts=["the movie was", "2 + 2 ="],
            completions=[" very good", " 4"],
            answer=["x", "y"],
        )
        chat = trl(
            prompts=[
                [{"role": "user", "content": "the movie was"}],
                [{"role": "user", "content": "2 + 2 ="}],
            ],
            completions=[
                [{"role": "assistant", "content": " very good"}],
                [{"role": "assistant", "content": " 4"}],
            ],
        )
    assert plain == pytest.approx([r.score for r in reference], abs=1e-6)
    assert chat == plain
