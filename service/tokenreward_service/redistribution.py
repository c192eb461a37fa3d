"""Reward redistribution (RED / R3HF, arXiv 2411.08302): prefix scores -> token rewards.

Pure math on tensors: no I/O, no settings, nothing of the project imported. A causal reward
model read at every position gives ``s[i] = R(tokens[0..i])``. For an item laid out as

    prompt (P tokens) | response (T tokens) | suffix (S tokens, e.g. EOS)

the prefix score after response token ``t`` (0-based) is ``s[P + t]``, except that the last
response token takes the score after the suffix, ``s[P + T + S - 1]``: the suffix is where the
RM was trained to be read, so its increments fold into the last response token and the rewards
still telescope to the holistic score. With ``s_0`` the baseline,

    dense_t  = prefix_t - prefix_{t-1},   prefix_{-1} = s_0
    reward_t = beta_c * dense_t + (1 - beta_c) * [t = T-1] * score        (Eq. 7)

``s_0`` is the score at the last prompt token (``baseline="prompt"``) or 0 (``"zero"``).

The caller's response tokens need not be the RM's: ``read_positions`` then names, per caller
token, the position whose score is the prefix score after it (-1: none yet, ``s_0``), as
:mod:`tokenreward_service.alignment` computes them; the last token still reads the score after
the suffix.
Everything is computed in float64 from the model's float32 scores, so the differences carry no
rounding beyond the scores' own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["Redistribution", "redistribute"]


@dataclass(frozen=True)
class Redistribution:
    """Per-item results, padded to the longest response of the batch (``[B, T]``)."""

    token_rewards: torch.Tensor
    """``[B, T]`` float64; 0 past each item's response."""
    prefix_scores: torch.Tensor
    """``[B, T]`` float64; the score after each response token (suffix folded into the last)."""
    response_mask: torch.Tensor
    """``[B, T]`` bool; True on real response tokens."""
    score: torch.Tensor
    """``[B]`` float64; the holistic score ``R(x, y)``, read after the suffix."""
    prompt_score: torch.Tensor
    """``[B]`` float64; the score at the last prompt token, NaN where the prompt is empty."""


def redistribute(
    scores: torch.Tensor,
    prompt_lens: torch.Tensor,
    response_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    beta_c: float = 1.0,
    baseline: Literal["prompt", "zero"] = "prompt",
    read_positions: torch.Tensor | None = None,
) -> Redistribution:
    """Turn per-position scores ``[B, L]`` into per-token rewards.

    ``prompt_lens``, ``response_lens`` and ``seq_lens`` are ``[B]`` integer tensors;
    ``seq_lens - prompt_lens - response_lens`` is each item's suffix length. Positions at or past
    ``seq_lens`` (padding) are never read, so their values (even NaN) do not matter.
    ``read_positions`` (``[B, T]`` integers, optional) replaces ``prompt_lens + t`` as the
    position read after response token ``t``; ``-1`` reads the baseline ``s_0``.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [batch, length], got shape {tuple(scores.shape)}")
    if not 0.0 <= beta_c <= 1.0:
        raise ValueError(f"beta_c must be in [0, 1], got {beta_c}")
    if baseline not in ("prompt", "zero"):
        raise ValueError(f"baseline must be 'prompt' or 'zero', got {baseline!r}")
    batch, length = scores.shape
    device = scores.device
    prompt_lens = prompt_lens.to(device=device, dtype=torch.long)
    response_lens = response_lens.to(device=device, dtype=torch.long)
    seq_lens = seq_lens.to(device=device, dtype=torch.long)
    if not (prompt_lens.shape == response_lens.shape == seq_lens.shape == (batch,)):
        raise ValueError("prompt_lens, response_lens and seq_lens must each have shape [batch]")
    if bool((response_lens < 1).any()):
        raise ValueError("every response needs at least one token")
    covered = prompt_lens + response_lens if read_positions is None else prompt_lens.clamp(min=1)
    if bool((prompt_lens < 0).any()) or bool((seq_lens < covered).any()):
        raise ValueError("seq_lens must cover prompt and response")
    if bool((seq_lens > length).any()):
        raise ValueError("seq_lens exceed the scores' length")
    if baseline == "prompt" and bool((prompt_lens < 1).any()):
        raise ValueError("baseline 'prompt' needs a non-empty prompt")

    s = scores.to(torch.float64)
    width = int(response_lens.max())
    t = torch.arange(width, device=device).unsqueeze(0)  # [1, T]
    mask = t < response_lens.unsqueeze(1)  # [B, T]
    is_last = t == (response_lens - 1).unsqueeze(1)
    last_pos = seq_lens - 1  # where the holistic score is read

    score = s.gather(1, last_pos.unsqueeze(1)).squeeze(1)
    has_prompt = prompt_lens > 0
    prompt_read = s.gather(1, (prompt_lens - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    prompt_score = torch.where(has_prompt, prompt_read, torch.full_like(prompt_read, float("nan")))
    s0 = prompt_score if baseline == "prompt" else torch.zeros_like(prompt_score)

    if read_positions is None:
        reads = prompt_lens.unsqueeze(1) + t
    else:
        reads = read_positions.to(device=device, dtype=torch.long)[:, :width]
        if reads.shape != (batch, width):
            raise ValueError(f"read_positions must have shape [batch, {width}]")
        if bool((mask & ((reads < -1) | (reads >= seq_lens.unsqueeze(1)))).any()):
            raise ValueError("read_positions must lie in [-1, seq_lens)")
    positions = torch.where(is_last, last_pos.unsqueeze(1), reads)
    baseline_read = mask & (positions < 0)
    positions = torch.where(mask & ~baseline_read, positions, torch.zeros_like(positions))
    prefix = torch.where(
        baseline_read,
        s0.unsqueeze(1).expand(-1, width),
        torch.where(mask, s.gather(1, positions), torch.zeros((), dtype=s.dtype, device=device)),
    )

    previous = torch.cat([s0.unsqueeze(1), prefix[:, :-1]], dim=1)
    zero = torch.zeros((), dtype=s.dtype, device=device)
    dense = torch.where(mask, prefix - previous, zero)
    if beta_c == 1.0:
        rewards = dense
    else:
        sparse = torch.where(is_last, score.unsqueeze(1), zero)
        rewards = beta_c * dense + (1.0 - beta_c) * sparse
    return Redistribution(
        token_rewards=rewards,
        prefix_scores=prefix,
        response_mask=mask,
        score=score,
        prompt_score=prompt_score,
    )
