"""Scalar reward functions in the shapes OpenRLHF and TRL call them.

Both frameworks pass text. The functions here tokenize it with the reward model's own
tokenizer (any object with Hugging Face's ``encode(text, add_special_tokens=...)``), send the
token IDs through a :class:`~tokenreward.RewardClient`, and return the holistic ``score`` of each
sample: the sequence-level reward these trainers expect. (Per-token rewards need a learner that
takes them: see :mod:`tokenreward.integrations.learner`.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tokenreward._client import RewardClient
from tokenreward.protocol import RewardItem

__all__ = ["Encoder", "openrlhf_reward_func", "trl_reward_func"]


class Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def _text(value: Any) -> str:
    """A plain string, or the content of a conversational turn list (TRL's chat format)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value and isinstance(value[-1], dict):
        return "".join(str(turn.get("content", "")) for turn in value)
    raise TypeError(f"expected text or a list of chat turns, got {type(value).__name__}")


def _items(
    tokenizer: Encoder, prompts: Sequence[str], responses: Sequence[str]
) -> list[RewardItem]:
    return [
        RewardItem(
            prompt_ids=tokenizer.encode(prompt, add_special_tokens=True),
            response_ids=tokenizer.encode(response, add_special_tokens=False),
        )
        for prompt, response in zip(prompts, responses, strict=True)
    ]


def openrlhf_reward_func(client: RewardClient, tokenizer: Encoder) -> Callable[..., Any]:
    """``reward_func(queries, prompts, labels)`` for OpenRLHF's ``--remote_rm_url file.py``.

    OpenRLHF's ``queries`` are prompt + response; the response is what follows the prompt.
    Returns a float tensor when torch is installed (OpenRLHF runs on torch), else a list.
    """

    def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Any = None) -> Any:
        responses = []
        for query, prompt in zip(queries, prompts, strict=True):
            if not query.startswith(prompt):
                raise ValueError("each query must start with its prompt")
            responses.append(query[len(prompt) :])
        scores = [r.score for r in client.rewards(_items(tokenizer, prompts, responses))]
        try:
            import torch
        except ImportError:
            return scores
        return torch.tensor(scores, dtype=torch.float32)

    return reward_func


def trl_reward_func(client: RewardClient, tokenizer: Encoder) -> Callable[..., list[float]]:
    """A reward function for TRL's ``GRPOTrainer(reward_funcs=[...])``.

    TRL calls it as ``f(prompts=..., completions=..., **columns)`` with text or chat-turn lists
    and logs it under its ``__name__``.
    """

    def tokenreward(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        items = _items(tokenizer, [_text(p) for p in prompts], [_text(c) for c in completions])
        return [r.score for r in client.rewards(items)]

    return tokenreward
