"""Example adapter: per-position scores of a gated multi-objective RM.

For the model code in :mod:`tokenreward_service.adapters.modeling_gated_rm` (ArmoRM-like: K
objective rewards mixed by a softmax gate), served with::

    tokenreward serve --model DIR --trust-remote-code \\
        --adapter tokenreward_service.adapters.gated:scores

One forward pass of the backbone; the gated head is applied to every position's hidden state,
which is what the model's own forward applies to the last one. Copy it as the start of an
adapter for another head.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["scores"]


def scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` float32: at each position, the gate-weighted sum of the objectives."""
    hidden = model.model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    rewards, gate = model.heads(hidden)
    out: torch.Tensor = (rewards * gate).sum(dim=-1)
    return out
