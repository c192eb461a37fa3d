"""Scalar reward functions in the shapes OpenRLHF and TRL call them.

Both frameworks pass text. The functions here tokenize it with the reward model's own
tokenizer (any object with Hugging Face's ``encode(text, add_special_tokens=...)``), send the
token IDs through a :class:`~tokenreward.RewardClient`, and return the holistic ``score`` of each
sample: the sequence-level reward these trainers expect. TRL's conversational prompts go as
``messages`` instead, for the RM's chat template on the server to render. (Per-token rewards
need a learner that takes them: see :mod:`tokenreward.integrations.learner`.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tokenreward._client import RewardClient
from tokenreward.protocol import Message, RewardItem

__all__ = ["Encoder", "openrlhf_reward_func", "trl_reward_func"]


class Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


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


def trl_reward_func(
    client: RewardClient, tokenizer: Encoder, *, empty: float | None = None
) -> Callable[..., list[float | None]]:
    """A reward function for TRL's ``GRPOTrainer(reward_funcs=[...])``, named ``tokenreward``.

    TRL (1.16) calls it once per generation batch as ``f(prompts=..., completions=...,
    completion_ids=..., trainer_state=..., log_extra=..., log_metric=..., **dataset_columns)``,
    takes one reward per completion and logs their mean as ``rewards/tokenreward/mean``.

    Standard prompts are text: prompt and completion are tokenized here with the RM's
    ``tokenizer`` (the prompt with its special tokens, the completion without). Conversational
    prompts are turn lists: they go to the server as ``messages``, the completion's text as the
    response, so the RM's own chat template renders the conversation, as TRL does for a reward
    model it runs itself (the server needs a template: the RM tokenizer's or ``--chat-template``;
    without one the call fails with 422 rather than score text the RM was never trained on).
    ``completion_ids`` are the policy's tokens, not the RM's, so the text is what is scored.

    An empty completion (the policy ended at once) has no response token to score: it gets
    ``empty``. The default None is TRL's "unscorable": TRL warns, leaves it out of the mean and
    gives it zero advantage. Pass a number (a penalty) to train against empty answers instead.
    """

    def tokenreward(
        prompts: Sequence[Any], completions: Sequence[Any], **_: Any
    ) -> list[float | None]:
        items = [
            _trl_item(tokenizer, prompt, completion)
            for prompt, completion in zip(prompts, completions, strict=True)
        ]
        scorable = [item for item in items if item is not None]
        scores = iter([r.score for r in client.rewards(scorable)] if scorable else [])
        return [empty if item is None else next(scores) for item in items]

    return tokenreward


def _trl_item(tokenizer: Encoder, prompt: Any, completion: Any) -> RewardItem | None:
    """The item TRL's (prompt, completion) pair is scored as; None for an empty completion."""
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise TypeError(f"a text prompt's completion is text, not {type(completion).__name__}")
        response_ids = tokenizer.encode(completion, add_special_tokens=False)
        if not response_ids:
            return None
        return RewardItem(
            prompt_ids=tokenizer.encode(prompt, add_special_tokens=True), response_ids=response_ids
        )
    turns = [*_turns(prompt), *_turns(completion)]
    *before, last = turns
    if last.get("role") != "assistant":
        raise ValueError(f"a completion ends with an assistant turn, not {last.get('role')!r}")
    response = _content(last)
    if not response:
        return None
    roles = [turn.get("role") for turn in before]
    if unknown := [role for role in roles if role not in ("system", "user", "assistant")]:
        raise ValueError(f"messages are system, user and assistant turns; got {unknown[0]!r}")
    messages = [Message(role=turn["role"], content=_content(turn)) for turn in before]
    return RewardItem(messages=messages, response=response)


def _turns(value: Any) -> list[dict[str, Any]]:
    """TRL's conversational prompt or completion: a list of ``{"role", "content"}`` turns."""
    if isinstance(value, list) and value and all(isinstance(turn, dict) for turn in value):
        return value
    raise TypeError(f"expected a list of chat turns, got {type(value).__name__}")


def _content(turn: dict[str, Any]) -> str:
    """A turn's text: TRL writes content as a string or as typed blocks (multimodal prompts)."""
    content = turn.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    blocks: list[Any] = content if isinstance(content, list) else [content]
    if all(isinstance(block, dict) and block.get("type") == "text" for block in blocks):
        return "".join(str(block.get("text", "")) for block in blocks)
    kinds = {str(b.get("type")) if isinstance(b, dict) else type(b).__name__ for b in blocks}
    raise ValueError(f"the reward model reads text only; a turn holds {', '.join(sorted(kinds))}")
