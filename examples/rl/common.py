"""What the three roles of the RL example share: the run's knobs, the policy's tokenizer and
model, the prompts, and the log-probabilities of sampled tokens.

The policy is a small Llama-shaped causal LM with a SentencePiece-style tokenizer of its own
(``▁`` for spaces, byte fallback), so it shares neither vocabulary nor pre-tokenizer with the
demo RM's byte-level BPE: the service aligns the RM's credit onto the policy's tokens.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokenreward_service.model import right_pad

POLICY_NAME = "policy"
"""The name the service knows the policy's tokenizer by (``--policy-tokenizer policy=DIR``)."""
UNK, BOS, EOS = "<unk>", "<s>", "</s>"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every knob of one training run (one arm, one seed); the curves file records them."""

    beta_c: float = 1.0
    """Dense (1), sparse (0) or a mix of the two (Eq. 7), sent to the service."""
    seed: int = 0
    updates: int = 100
    prompts_per_update: int = 16
    samples_per_prompt: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    ppo_epochs: int = 4
    minibatches: int = 2
    policy_lr: float = 1e-4
    critic_lr: float = 5e-4
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    kl_beta: float = 0.1
    """β of Eq. 8: the per-token KL penalty to the frozen reference policy."""
    critic_warmup: int = 0
    """Updates at the start that train the critic only (the policy is left as it is)."""
    max_grad_norm: float = 1.0
    sample_count: int = 6
    """Texts recorded at the start and at the end."""

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def load_policy_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def quiet_transformers() -> None:
    """No progress bars from loading: the roles print their own progress."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    logging.set_verbosity_error()  # type: ignore[no-untyped-call]


def load_policy(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    quiet_transformers()

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model


def prompts_for(texts: Sequence[str], tokenizer: Any, *, count: int, seed: int) -> list[list[int]]:
    """``count`` prompts: the first three or four words of tweets, as the policy's IDs (BOS
    first). Drawn with ``seed`` from ``texts``; words that start with ``@`` or ``#`` are skipped,
    so a prompt is ordinary words the policy continues."""
    rng = random.Random(seed)
    prompts: list[list[int]] = []
    seen: set[str] = set()
    order = list(range(len(texts)))
    rng.shuffle(order)
    for index in order:
        words = [w for w in texts[index].split() if w[0] not in "@#" and w.isascii()]
        take = rng.choice((3, 4))
        if len(words) < take + 2:
            continue
        opening = " ".join(words[:take])
        if opening.lower() in seen:
            continue
        seen.add(opening.lower())
        prompts.append(tokenizer(opening)["input_ids"])
        if len(prompts) == count:
            break
    return prompts


def response_logprobs(
    model: Any, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
) -> torch.Tensor:
    """``[B, T]`` log-probability of each response token under ``model`` given everything before
    it (0 past a response's end); ``T`` is the longest response. Sequences are right-padded, so
    positions count from 0 in every row."""
    ids, mask = right_pad([list(p) + list(r) for p, r in zip(prompts, responses, strict=True)])
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return gather_responses(token_logp, prompts, responses)


def gather_responses(
    per_position: torch.Tensor, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
) -> torch.Tensor:
    """From a ``[B, L-1]`` tensor whose column ``j`` belongs to the token at position ``j + 1``
    (what a causal LM predicts there), the ``[B, T]`` block of each row's response tokens."""
    width = max(len(r) for r in responses)
    out = per_position.new_zeros((len(responses), width))
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        start = len(prompt) - 1
        out[i, : len(response)] = per_position[i, start : start + len(response)]
    return out
