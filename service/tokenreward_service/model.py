"""Read a Hugging Face reward model's score head at every position in one pass.

A sequence-classification RM (``num_labels=1``) is a decoder with a linear ``score`` head that
HF reads at the last token. Running the decoder once and applying that same head (in float32)
to every position's hidden state gives the score of every prefix at the cost of one forward
pass; causality makes position ``i`` see exactly ``tokens[0..i]``, so the result equals running
each prefix separately. Loading and checking a model is :mod:`tokenreward_service.loading`;
this module knows nothing of HTTP or batching.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "MIN_SHARED_PROMPT",
    "BatchScores",
    "ModelSpec",
    "RewardModel",
    "find_shared_prompts",
    "right_pad",
]


@dataclass(frozen=True)
class BatchScores:
    """Per-position scores of a batch, with what computing them cost."""

    scores: list[torch.Tensor]
    computed_tokens: int
    """Positions run through the model, padding included."""
    real_tokens: int
    """Tokens run through the model, padding excluded (a shared prompt counts once)."""
    shared_items: int
    """Items whose prompt was computed once for its whole group."""
    oom_splits: int = 0
    """Times the batch ran out of device memory and was split in two to be retried."""


@dataclass(frozen=True)
class ModelSpec:
    """What is loaded and how it runs; the server reports it at ``GET /v1/model``."""

    id: str
    revision: str
    architecture: str
    vocab_size: int
    max_length: int
    dtype: str
    device: str
    suffix_ids: tuple[int, ...]
    random_weights: bool = False


class RewardModel:
    """A loaded RM: ``score`` returns every position's score for a batch of sequences."""

    def __init__(
        self,
        model: Any,
        spec: ModelSpec,
        tokenizer: Any | None = None,
        *,
        share_prompts: bool = True,
    ) -> None:
        self._model = model
        self.spec = spec
        self.tokenizer = tokenizer
        self.share_prompts = share_prompts
        parameters = inspect.signature(model.base_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        head = model.score
        self._device = torch.device(spec.device)
        self._head_weight = head.weight.detach().to(torch.float32)
        bias = getattr(head, "bias", None)
        self._head_bias = None if bias is None else bias.detach().to(torch.float32)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``[B, L, H]`` of the decoder, in the model's dtype."""
        out = self._model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    def score_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, L]`` in float32 of right-padded ``input_ids``; padded positions are junk."""
        with torch.inference_mode():
            return self._head(self.hidden_states(input_ids, attention_mask))

    def score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per-position float32 scores (on CPU) of each sequence, in one forward pass.

        Sequences are right-padded to the longest with an attention mask, so a sequence's
        scores do not depend on the others in the batch (up to float rounding).
        """
        scores, _ = self._score_padded_batch(sequences)
        return scores

    def score_batch(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> BatchScores:
        """:meth:`score_shared`, splitting the batch in two and retrying each half when the
        device runs out of memory (a batch of one that does not fit is a real error)."""
        try:
            return self.score_shared(sequences, prompt_lens)
        except torch.cuda.OutOfMemoryError:
            if len(sequences) == 1:
                raise
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        mid = len(sequences) // 2
        first = self.score_batch(sequences[:mid], prompt_lens[:mid])
        second = self.score_batch(sequences[mid:], prompt_lens[mid:])
        return BatchScores(
            scores=first.scores + second.scores,
            computed_tokens=first.computed_tokens + second.computed_tokens,
            real_tokens=first.real_tokens + second.real_tokens,
            shared_items=first.shared_items + second.shared_items,
            oom_splits=1 + first.oom_splits + second.oom_splits,
        )

    def score_shared(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> BatchScores:
        """Like :meth:`score`, but items that share a prompt have it computed once.

        Items whose first ``prompt_lens[i]`` tokens are identical (at least two of them, and a
        prompt of at least :data:`MIN_SHARED_PROMPT` tokens) form a group: the prompts run once,
        with their key/value cache, and each response then runs against its prompt's cache.
        Everything else runs as one right-padded batch. The scores are the same either way (up
        to float rounding), since a causal model computes a prompt's positions identically
        whatever follows it.
        """
        groups, singles = (
            find_shared_prompts(sequences, prompt_lens) if self.share_prompts else ([], [])
        )
        if not groups:
            scores, computed = self._score_padded_batch(sequences)
            real = sum(len(seq) for seq in sequences)
            return BatchScores(
                scores=scores, computed_tokens=computed, real_tokens=real, shared_items=0
            )
        out: list[torch.Tensor | None] = [None] * len(sequences)
        computed = 0
        if singles:
            single_scores, computed = self._score_padded_batch([sequences[i] for i in singles])
            for index, row in zip(singles, single_scores, strict=True):
                out[index] = row
        grouped, grouped_computed = self._score_shared(sequences, prompt_lens, groups)
        for index, row in grouped.items():
            out[index] = row
        done = [s for s in out if s is not None]
        assert len(done) == len(sequences)
        real = sum(len(sequences[i]) for i in singles)
        real += sum(prompt_lens[g[0]] for g in groups)  # each shared prompt once
        real += sum(len(sequences[i]) - prompt_lens[i] for g in groups for i in g)
        return BatchScores(
            scores=done,
            computed_tokens=computed + grouped_computed,
            real_tokens=real,
            shared_items=sum(len(g) for g in groups),
        )

    def _score_padded_batch(
        self, sequences: Sequence[Sequence[int]]
    ) -> tuple[list[torch.Tensor], int]:
        lengths = [len(seq) for seq in sequences]
        input_ids, attention_mask = right_pad(sequences)
        scores = self.score_padded(
            input_ids.to(self._device, non_blocking=True),
            attention_mask.to(self._device, non_blocking=True),
        ).cpu()
        return [scores[row, :n] for row, n in enumerate(lengths)], int(input_ids.numel())

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(
            hidden.to(torch.float32), self._head_weight, self._head_bias
        )
        return logits.squeeze(-1)

    def _score_shared(
        self,
        sequences: Sequence[Sequence[int]],
        prompt_lens: Sequence[int],
        groups: list[list[int]],
    ) -> tuple[dict[int, torch.Tensor], int]:
        """Two passes: every group's prompt once (keeping the key/value cache), then every
        grouped item's response against its own prompt's cache rows."""
        prompts = [sequences[group[0]][: prompt_lens[group[0]]] for group in groups]
        prompt_ids, prompt_mask = right_pad(prompts)
        members = [index for group in groups for index in group]
        owner = torch.tensor([g for g, group in enumerate(groups) for _ in group], dtype=torch.long)
        responses = [sequences[index][prompt_lens[index] :] for index in members]
        response_ids, response_mask = right_pad(responses)
        plen = torch.tensor([prompt_lens[index] for index in members], dtype=torch.long)
        positions = plen.unsqueeze(1) + torch.arange(response_ids.shape[1]).unsqueeze(0)
        device = self._device
        with torch.inference_mode():
            first = self._model.base_model(
                input_ids=prompt_ids.to(device),
                attention_mask=prompt_mask.to(device),
                use_cache=True,
            )
            prompt_scores = self._head(first.last_hidden_state).cpu()
            cache = (
                first.cache if getattr(first, "cache", None) is not None else first.past_key_values
            )
            cache.reorder_cache(owner.to(device))  # one row of prompt keys/values per item
            second = self._model.base_model(
                input_ids=response_ids.to(device),
                attention_mask=torch.cat([prompt_mask[owner], response_mask], dim=1).to(device),
                position_ids=positions.to(device),
                use_cache=True,
                **{self._cache_kwarg: cache},
            )
            response_scores = self._head(second.last_hidden_state).cpu()
        out = {}
        for row, index in enumerate(members):
            g = int(owner[row])
            p = prompt_lens[index]
            r = len(sequences[index]) - p
            out[index] = torch.cat([prompt_scores[g, :p], response_scores[row, :r]])
        return out, int(prompt_ids.numel() + response_ids.numel())


MIN_SHARED_PROMPT = 8
"""Shorter prompts are not worth a second forward call: they are recomputed per item."""


def find_shared_prompts(
    sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
) -> tuple[list[list[int]], list[int]]:
    """Indices grouped by identical prompt (groups of two or more), and the indices left alone."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    singles: list[int] = []
    for index, (seq, p) in enumerate(zip(sequences, prompt_lens, strict=True)):
        if p < MIN_SHARED_PROMPT or p >= len(seq):
            singles.append(index)
        else:
            by_prompt.setdefault(tuple(seq[:p]), []).append(index)
    groups = []
    for members in by_prompt.values():
        if len(members) >= 2:
            groups.append(members)
        else:
            singles.extend(members)
    return groups, sorted(singles)


def right_pad(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in sequences)
    input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask
