"""A gated multi-objective reward model: the custom code of the example model folder.

Modelled on ArmoRM (a Llama backbone; a regression layer gives K objective rewards; a gating
network gives a softmax mixture over them; the reward is the mixture), with the gate read at the
same position as the rewards so that the score of every prefix is defined. Its head is not one
linear layer, so the server reads it through an adapter, :mod:`tokenreward_service.adapters.gated`.

The file is copied into a model folder whose ``config.json`` maps ``AutoConfig`` and
``AutoModelForSequenceClassification`` to it (``auto_map``); transformers runs it only with
``trust_remote_code``. It imports nothing but torch and transformers, as such files must.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

__all__ = ["GatedRewardConfig", "GatedRewardModel"]


class GatedRewardConfig(LlamaConfig):  # type: ignore[no-untyped-call]
    """A Llama config; ``num_objectives`` (extra key in config.json) sizes the heads."""

    model_type = "gated_rm"


class GatedRewardModel(LlamaPreTrainedModel):  # type: ignore[no-untyped-call]
    """``forward`` returns the reward of each sequence at its last token as ``logits [B, 1]``;
    :meth:`heads` gives every position's objective rewards and gate."""

    config_class = GatedRewardConfig

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        objectives = int(getattr(config, "num_objectives", 3))
        hidden = int(config.hidden_size)
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(hidden, objectives)
        self.gating = nn.Sequential(
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, objectives)
        )
        self.post_init()  # type: ignore[no-untyped-call]

    def heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective rewards and gate weights ``[..., K]`` of hidden states, in float32."""
        hidden = hidden.to(torch.float32)
        rewards = nn.functional.linear(
            hidden,
            self.regression_layer.weight.to(torch.float32),
            self.regression_layer.bias.to(torch.float32),
        )
        first, last = self.gating[0], self.gating[2]
        assert isinstance(first, nn.Linear)
        assert isinstance(last, nn.Linear)
        gate = nn.functional.linear(
            hidden, first.weight.to(torch.float32), first.bias.to(torch.float32)
        )
        gate = nn.functional.linear(
            nn.functional.silu(gate), last.weight.to(torch.float32), last.bias.to(torch.float32)
        )
        return rewards, torch.softmax(gate, dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if attention_mask is None:
            last = torch.full_like(rows, input_ids.shape[1] - 1)
        else:
            last = attention_mask.sum(dim=-1) - 1  # right padding
        rewards, gate = self.heads(hidden[rows, last])
        return SequenceClassifierOutputWithPast(logits=(rewards * gate).sum(-1, keepdim=True))
